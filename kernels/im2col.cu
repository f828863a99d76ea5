// im2col.cu -- unfold the windows of a convolution into rows (im2col), and its adjoint (col2im).
//
// Compiled once per dtype with -Dscalar_t=float|double (element type) -Dacc_t=float|double (sums).
// Reference: im2col / col2im in minicnn/ops.py; same layout, same values, same summation order.
// The leading windows only (OH, OW less than the full output) and the block order below are the
// fast path's (minicnn/fused/windows.py); the plain ops pass the full output and th = tw = 1.
//
// Shapes (all arrays C-contiguous):
//   x     (B, C, H, W)              NCHW input
//   cols  (B*OH*OW, K)              K = kh*kw*C; one row per output pixel
//   OH = (H + 2*ph - kh) / sh + 1,  OW = (W + 2*pw - kw) / sw + 1   (computed by the caller),
//   or less: only the leading OH x OW windows, when the layer after the convolution reads no more
// Row r = (b*OH + oh)*OW + ow and column k = (i*kw + j)*C + c of cols hold
//   x[b, c, oh*sh - ph + i, ow*sw - pw + j]      (kernel offset (i, j), channel c fastest)
// or 0 where that position lies in the zero padding.
// im2col can order its rows in blocks instead (th, tw > 1, dividing OH, OW): row
//   r = (((p*tw + q)*B + b)*OH2 + oh2)*OW2 + ow2,   OH2 = OH/th, OW2 = OW/tw,
// for output pixel (oh, ow) = (oh2*th + p, ow2*tw + q): one block of rows per offset (p, q) of a
// th x tw pooling window (maxpool_blocks in minicnn/fused/windows.py). th = tw = 1 is the order
// above.
//
// im2col: one thread per element of cols, flat index idx = r*K + k
//         = ((((b*OH + oh)*OW + ow)*kh + i)*kw + j)*C + c   (th = tw = 1).
// col2im: one thread per element of x, flat index idx = ((b*C + c)*H + h)*W + w. A gather: the
//         thread adds up every cols entry that im2col copied from its pixel, kernel offsets
//         (i, j) in ascending order, starting from 0 -- exactly the order in which the NumPy
//         col2im adds, so the results are bit-identical. (The scatter alternative, one thread per
//         cols entry with atomicAdd, would add in a different order on every run.)
// Both loop grid-stride over a 64-bit flat index, so a grid of any size covers every element.

// The loader compiles this file once per dtype with -Dscalar_t=... -Dacc_t=...; on its own
// (nvcc -ptx file.cu) it builds the float version.
#ifndef scalar_t
#define scalar_t float
#endif
#ifndef acc_t
#define acc_t scalar_t
#endif

extern "C" __global__ void im2col(const scalar_t* __restrict__ x, scalar_t* __restrict__ cols,
                                  int B, int C, int H, int W, int kh, int kw, int sh, int sw,
                                  int ph, int pw, int OH, int OW, int th, int tw) {
    const long long total = (long long)B * OH * OW * kh * kw * C;     // elements of cols
    const int OH2 = OH / th, OW2 = OW / tw;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        // idx -> (p, q, b, oh2, ow2, i, j, c), c fastest
        long long t = idx;
        const int c = (int)(t % C);     t /= C;
        const int j = (int)(t % kw);    t /= kw;
        const int i = (int)(t % kh);    t /= kh;
        const int ow2 = (int)(t % OW2); t /= OW2;
        const int oh2 = (int)(t % OH2); t /= OH2;
        const long long b = t % B;      t /= B;
        const int q = (int)(t % tw);
        const int p = (int)(t / tw);
        const int oh = oh2 * th + p, ow = ow2 * tw + q;
        // the input pixel that kernel offset (i, j) of window (oh, ow) lands on
        const int h = oh * sh - ph + i;
        const int w = ow * sw - pw + j;
        const bool inside = h >= 0 && h < H && w >= 0 && w < W;
        cols[idx] = inside ? x[((b * C + c) * H + h) * W + w] : (scalar_t)0;
    }
}

extern "C" __global__ void col2im(const scalar_t* __restrict__ cols, scalar_t* __restrict__ x,
                                  int B, int C, int H, int W, int kh, int kw, int sh, int sw,
                                  int ph, int pw, int OH, int OW) {
    const long long total = (long long)B * C * H * W;                 // elements of x
    const long long K = (long long)kh * kw * C;                       // columns of cols
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        // idx -> (b, c, h, w), w fastest
        long long t = idx;
        const int w = (int)(t % W); t /= W;
        const int h = (int)(t % H); t /= H;
        const int c = (int)(t % C);
        const long long b = t / C;
        acc_t sum = 0;
        for (int i = 0; i < kh; ++i) {
            // kernel row i of window row oh lands on h when oh*sh - ph + i == h
            const int hs = h + ph - i;                                 // = oh*sh
            if (hs < 0 || hs % sh != 0 || hs / sh >= OH) continue;     // no such window row
            const int oh = hs / sh;
            for (int j = 0; j < kw; ++j) {
                const int ws = w + pw - j;                             // = ow*sw
                if (ws < 0 || ws % sw != 0 || ws / sw >= OW) continue;
                const int ow = ws / sw;
                sum += cols[((b * OH + oh) * OW + ow) * K + (i * kw + j) * C + c];
            }
        }
        x[idx] = (scalar_t)sum;
    }
}
