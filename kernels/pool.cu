// pool.cu -- 2-D max and average pooling, forward and backward.
//
// Compiled once per dtype with -Dscalar_t=float|double (element type) -Dacc_t=float|double (sums).
// Reference: maxpool2d, maxpool2d_backward, avgpool2d, avgpool2d_backward in minicnn/ops.py;
// maxpool2d with relu, maxpool_blocks and maxpool_blocks_backward in minicnn/fused/windows.py
// (the plain maxpool2d passes relu = 0).
//
// Shapes (all arrays C-contiguous, except x in the forward kernels: they take its element strides
// xb, xc, xh, xw, so that a convolution's output, an NCHW view of a channels-last buffer, is read
// where it lies instead of being copied first):
//   x, dx         (B, C, H, W)      input and its gradient
//   y, dy, argmax (B, C, OH, OW)    output, its gradient, and (max) the winner of each window
//   OH = (H + 2*ph - kh) / sh + 1,  OW = (W + 2*pw - kw) / sw + 1   (computed by the caller)
// Window (oh, ow) covers input rows oh*sh - ph + i, i < kh, and columns ow*sw - pw + j, j < kw;
// (i, j) is the kernel offset, numbered k = i*kw + j.
//
// Forward kernels: one thread per output element, idx = ((b*C + c)*OH + oh)*OW + ow.
//   maxpool2d_forward: y = the largest value of the window, argmax = its offset k (int32).
//     Padding positions are skipped (never compared), so padding never wins. Offsets are scanned
//     in ascending k and only a strictly greater value replaces the best, so the first maximum
//     wins ties; a NaN becomes y but does not move argmax. This matches the NumPy running max.
//     (The caller keeps ph <= kh/2 and pw <= kw/2, so every window holds a real value.)
//     relu != 0: a ReLU after the pool, folded in. The best starts at 0 with no offset, so
//     y = max(0, window) and argmax = -1 where no value beats 0 (the backward sends nothing).
//   avgpool2d_forward: y = sum of the window over the zero-padded input / (kh*kw)
//     (padding counts: count_include_pad=True).
//   maxpool_blocks_forward: the same maximum over windows laid out as blocks, x (K, M): x[k*M + m]
//     is value k of window m (a convolution's output in im2col's block order); y, argmax (M).
// Backward kernels: gathers, one thread per input element, idx = ((b*C + c)*H + h)*W + w. The
//   thread visits every window that covers its pixel, offsets (i, j) ascending, and adds
//   (from 0) what that window sends back:
//   maxpool2d_backward: dy of the window if the window's argmax is the pixel's offset in it;
//   avgpool2d_backward: dy of the window / (kh*kw).
//   maxpool_blocks_backward: one thread per element of dx (K, M): dy[m] if offset k won window m.
//   No atomicAdd: each dx element is written by one thread, in a fixed order, so the results are
//   deterministic and bit-identical to the NumPy ops, which add offset by offset in this order.
// All kernels loop grid-stride over a 64-bit flat index, so a grid of any size covers everything.

// The loader compiles this file once per dtype with -Dscalar_t=... -Dacc_t=...; on its own
// (nvcc -ptx file.cu) it builds the float version.
#ifndef scalar_t
#define scalar_t float
#endif
#ifndef acc_t
#define acc_t scalar_t
#endif

// One step of the running maximum of the max-pool forward kernels: offset k holds value v.
__device__ __forceinline__ void running_max(scalar_t v, int k, scalar_t& best, int& arg,
                                            bool& seen) {
    if (!seen || v > best) {          // strictly greater: the first maximum wins
        best = v;
        arg = k;
        seen = true;
    } else if (v != v) {              // NaN: propagates into y, argmax stays
        best = v;
    }
}

extern "C" __global__ void maxpool2d_forward(const scalar_t* __restrict__ x,
                                             scalar_t* __restrict__ y, int* __restrict__ argmax,
                                             int B, int C, int H, int W, int kh, int kw,
                                             int sh, int sw, int ph, int pw, int OH, int OW,
                                             int relu, long long xb, long long xc, long long xh,
                                             long long xw) {
    const long long total = (long long)B * C * OH * OW;               // elements of y
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        // idx -> (bc, oh, ow) with bc = b*C + c
        const int ow = (int)(idx % OW);
        const int oh = (int)(idx / OW % OH);
        const long long bc = idx / ((long long)OH * OW);
        const scalar_t* plane = x + bc / C * xb + bc % C * xc;        // x[b, c], (H, W)
        scalar_t best = 0;
        bool seen = relu != 0;          // with the ReLU, 0 is the value to beat, held by no offset
        int arg = -1;
        for (int i = 0; i < kh; ++i) {
            const int h = oh * sh - ph + i;
            if (h < 0 || h >= H) continue;                            // padding row
            for (int j = 0; j < kw; ++j) {
                const int w = ow * sw - pw + j;
                if (w < 0 || w >= W) continue;                        // padding column
                running_max(plane[h * xh + w * xw], i * kw + j, best, arg, seen);
            }
        }
        y[idx] = best;
        argmax[idx] = arg;
    }
}

extern "C" __global__ void maxpool_blocks_forward(const scalar_t* __restrict__ x,
                                                  scalar_t* __restrict__ y,
                                                  int* __restrict__ argmax, long long M, int K,
                                                  int relu) {
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < M;
         idx += (long long)blockDim.x * gridDim.x) {
        scalar_t best = 0;
        bool seen = relu != 0;          // with the ReLU, 0 is the value to beat, held by no offset
        int arg = -1;
        for (int k = 0; k < K; ++k) running_max(x[k * M + idx], k, best, arg, seen);
        y[idx] = best;
        argmax[idx] = arg;
    }
}

extern "C" __global__ void maxpool_blocks_backward(const scalar_t* __restrict__ dy,
                                                   const int* __restrict__ argmax,
                                                   scalar_t* __restrict__ dx, long long M, int K) {
    const long long total = M * K;                                    // elements of dx
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long m = idx % M;
        dx[idx] = argmax[m] == (int)(idx / M) ? dy[m] : (scalar_t)0;
    }
}

extern "C" __global__ void maxpool2d_backward(const scalar_t* __restrict__ dy,
                                              const int* __restrict__ argmax,
                                              scalar_t* __restrict__ dx,
                                              int B, int C, int H, int W, int kh, int kw,
                                              int sh, int sw, int ph, int pw, int OH, int OW) {
    const long long total = (long long)B * C * H * W;                 // elements of dx
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        // idx -> (bc, h, w) with bc = b*C + c
        const int w = (int)(idx % W);
        const int h = (int)(idx / W % H);
        const long long bc = idx / ((long long)H * W);
        const long long plane = bc * OH * OW;                         // dy[b, c], argmax[b, c]
        acc_t sum = 0;
        for (int i = 0; i < kh; ++i) {
            const int hs = h + ph - i;                                // = oh*sh if row i of
            if (hs < 0 || hs % sh != 0 || hs / sh >= OH) continue;    // window row oh is h
            const int oh = hs / sh;
            for (int j = 0; j < kw; ++j) {
                const int ws = w + pw - j;                            // = ow*sw
                if (ws < 0 || ws % sw != 0 || ws / sw >= OW) continue;
                const int ow = ws / sw;
                const long long o = plane + (long long)oh * OW + ow;      // window (oh, ow)
                if (argmax[o] == i * kw + j) sum += dy[o];            // this pixel won window o
            }
        }
        dx[idx] = (scalar_t)sum;
    }
}

extern "C" __global__ void avgpool2d_forward(const scalar_t* __restrict__ x,
                                             scalar_t* __restrict__ y,
                                             int B, int C, int H, int W, int kh, int kw,
                                             int sh, int sw, int ph, int pw, int OH, int OW,
                                             long long xb, long long xc, long long xh,
                                             long long xw) {
    const long long total = (long long)B * C * OH * OW;               // elements of y
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        // idx -> (bc, oh, ow) with bc = b*C + c
        const int ow = (int)(idx % OW);
        const int oh = (int)(idx / OW % OH);
        const long long bc = idx / ((long long)OH * OW);
        const scalar_t* plane = x + bc / C * xb + bc % C * xc;        // x[b, c], (H, W)
        acc_t sum = 0;                                                // padding adds 0
        for (int i = 0; i < kh; ++i) {
            const int h = oh * sh - ph + i;
            if (h < 0 || h >= H) continue;
            for (int j = 0; j < kw; ++j) {
                const int w = ow * sw - pw + j;
                if (w < 0 || w >= W) continue;
                sum += plane[h * xh + w * xw];
            }
        }
        y[idx] = (scalar_t)(sum / (acc_t)(kh * kw));                 // padding counted
    }
}

extern "C" __global__ void avgpool2d_backward(const scalar_t* __restrict__ dy,
                                              scalar_t* __restrict__ dx,
                                              int B, int C, int H, int W, int kh, int kw,
                                              int sh, int sw, int ph, int pw, int OH, int OW) {
    const long long total = (long long)B * C * H * W;                 // elements of dx
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        // idx -> (bc, h, w) with bc = b*C + c
        const int w = (int)(idx % W);
        const int h = (int)(idx / W % H);
        const long long bc = idx / ((long long)H * W);
        const long long plane = bc * OH * OW;                         // dy[b, c]
        const acc_t n = (acc_t)(kh * kw);
        acc_t sum = 0;
        for (int i = 0; i < kh; ++i) {
            const int hs = h + ph - i;                                // = oh*sh if row i of
            if (hs < 0 || hs % sh != 0 || hs / sh >= OH) continue;    // window row oh is h
            const int oh = hs / sh;
            for (int j = 0; j < kw; ++j) {
                const int ws = w + pw - j;                            // = ow*sw
                if (ws < 0 || ws % sw != 0 || ws / sw >= OW) continue;
                const int ow = ws / sw;
                sum += (acc_t)dy[plane + (long long)oh * OW + ow] / n;    // its share
            }
        }
        dx[idx] = (scalar_t)sum;
    }
}
