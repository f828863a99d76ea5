// fused.cu -- fused kernels for the GPU training step: bias + ReLU, ReLU backward, softmax
// cross-entropy (loss, gradient and accuracy in one pass), and Adam over every parameter at once.
//
// Compiled once per dtype with -Dscalar_t=float|double (element type) -Dacc_t=float|double (sums).
// Reference: the NumPy paths of bias_relu, relu_backward and softmax_cross_entropy in
// minicnn/fused/ops.py; for adam_multi_tensor (launched by minicnn/fused/adam.py), optim.Adam.
// At batch 128 a GPU step is launch-bound, so each kernel here replaces several elementwise
// launches.
//
// bias_relu_forward: y (rows, channels), in place: y = relu(y + bias[c]), bias (channels,).
//   One thread per element, idx = row*channels + c. relu(v) is np.maximum(v, 0): NaN stays NaN
//   (CUDA's fmax would turn it into 0) and -0.0 becomes +0.0.
// relu_backward: dy, y, dx (n,) flat, one memory layout: dx = dy * (y > 0), y the ReLU's output.
//   One thread per element. Written as a product, like the NumPy reference, so the two agree bit
//   for bit, -0.0 and a NaN dy where y <= 0 included.
// softmax_cross_entropy: logits, grad (batch, classes); targets int64, loss, correct int32
//   (batch,); invalid int32 (1,). One thread per row b (batch is small: 128 rows of 10 classes
//   are 1280 elements, too few to be worth splitting a row between threads). In acc_t:
//     m = max_k z_k,  lse = m + log(sum_k exp(z_k - m)),  logp_k = z_k - lse
//     q = (1 - e)*onehot(t) + e/K                                     (label smoothing e)
//     loss[b]    = -sum_k q_k logp_k = (1 - e)*(-logp_t) - e*mean_k(logp_k)
//     grad[b, k] = (exp(logp_k) - q_k) * grad_scale                  (1/B for a mean loss)
//     correct[b] = 1 if the first index of the row's maximum is t    (np.argmax; a NaN wins)
//   A target outside [0, K) makes loss[b] and the grad row NaN, correct[b] = 0, invalid[0] = 1.
// adam_multi_tensor: one launch updates every parameter tensor of a model (PyTorch's
//   multi-tensor apply). pointers (4*tensors,) uint64: for tensor j, the device addresses of its
//   param, grad, exp_avg, exp_avg_sq, each a contiguous scalar_t array of the same size;
//   offsets (tensors+1,) int64: prefix sums of the sizes (offsets[0] = 0, offsets[tensors] =
//   total). One thread per element of the concatenation, idx in [0, total): binary search in
//   offsets for its tensor j, then element idx - offsets[j] of that tensor.
//   hyper (8,), read by every thread, so a CUDA graph replays with new values without re-capture
//   (AdamConstants in minicnn/fused/adam.py, the same names in the same order):
//     [0] 1 - beta1   [1] beta2   [2] 1 - beta2   [3] eps
//     [4] weight_decay (L2, Adam; 0 for AdamW)    [5] step_size = lr / (1 - beta1^t)
//     [6] bias2_sqrt = sqrt(1 - beta2^t)          [7] decay = 1 - lr*weight_decay (AdamW; else 1)
//   Each is computed on the host in double and rounded once to scalar_t: exactly the constants
//   optim.Adam's array arithmetic uses (it multiplies a float32 array by float32(1 - beta1), not
//   by 1 - float32(beta1)). The update repeats optim.Adam.apply_step operation for operation, in
//   scalar_t, each product rounded on its own (no fma: see mul_rn), so it is bit-identical to it.
// All kernels loop grid-stride over a 64-bit index, so a grid of any size covers everything.
// No shared memory, no atomics: every output element is written by one thread.

// The loader compiles this file once per dtype with -Dscalar_t=... -Dacc_t=...; on its own
// (nvcc -ptx file.cu) it builds the float version.
#ifndef scalar_t
#define scalar_t float
#endif
#ifndef acc_t
#define acc_t scalar_t
#endif

// The float functions for float and the double ones for double, in CUDA and in the emulator alike
// (plain exp(x) of a float would run in double on the CPU).
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
// A product rounded on its own. nvcc fuses a*b + c into one fma (one rounding) wherever it can;
// NumPy rounds the product first, and Adam must match it bit for bit.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

extern "C" __global__ void bias_relu_forward(scalar_t* __restrict__ y,
                                             const scalar_t* __restrict__ bias,
                                             long long rows, int channels) {
    const long long total = rows * channels;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const scalar_t v = y[idx] + bias[idx % channels];
        y[idx] = (v > 0 || v != v) ? v : (scalar_t)0;                // np.maximum(v, 0)
    }
}

extern "C" __global__ void relu_backward(const scalar_t* __restrict__ dy,
                                         const scalar_t* __restrict__ y,
                                         scalar_t* __restrict__ dx, long long n) {
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (long long)blockDim.x * gridDim.x) {
        dx[idx] = dy[idx] * (scalar_t)(y[idx] > 0);
    }
}

extern "C" __global__ void softmax_cross_entropy(const scalar_t* __restrict__ logits,
                                                 const long long* __restrict__ targets,
                                                 scalar_t* __restrict__ loss,
                                                 scalar_t* __restrict__ grad,
                                                 int* __restrict__ correct,
                                                 int* __restrict__ invalid,
                                                 int batch, int classes,
                                                 scalar_t smoothing, scalar_t grad_scale) {
    for (long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; b < batch;
         b += (long long)blockDim.x * gridDim.x) {
        const scalar_t* z = logits + b * classes;                     // row b, (classes,)
        scalar_t* d = grad + b * classes;
        const long long t = targets[b];
        if (t < 0 || t >= classes) {
            const scalar_t not_a_number = (scalar_t)nan("");
            loss[b] = not_a_number;
            for (int k = 0; k < classes; ++k) d[k] = not_a_number;
            correct[b] = 0;
            // Every thread that meets a bad target stores the same 1 (and none stores 0: the
            // caller zeroed the flag), so whichever store lands last, the flag reads 1.
            invalid[0] = 1;
            continue;
        }
        // The maximum and the first index of it; a NaN wins and stays, as in np.max/np.argmax.
        scalar_t m = z[0];
        int arg = 0;
        for (int k = 1; k < classes; ++k) {
            const scalar_t v = z[k];
            if (v > m || (v != v && m == m)) {
                m = v;
                arg = k;
            }
        }
        acc_t sum = 0, zsum = 0;                                      // of exp(z - m) and z - m
        for (int k = 0; k < classes; ++k) {
            const acc_t zk = (acc_t)z[k] - m;
            sum += exp_(zk);
            zsum += zk;
        }
        const acc_t log_sum = log_(sum);                              // lse - m
        const acc_t e = smoothing;
        const acc_t nll = log_sum - ((acc_t)z[t] - m);                // -logp_t
        // e == 0 skips the mean, which is -inf (and 0 * -inf NaN) when a logit is -inf
        loss[b] = (scalar_t)(e != 0 ? (1 - e) * nll - e * (zsum / classes - log_sum) : nll);
        const acc_t uniform = e / classes;                            // q_k off the target
        for (int k = 0; k < classes; ++k) {
            acc_t g = exp_((acc_t)z[k] - m - log_sum) - uniform;      // softmax_k - e/K
            if (k == t) g -= 1 - e;
            d[k] = (scalar_t)(g * grad_scale);
        }
        correct[b] = arg == t;
    }
}

extern "C" __global__ void adam_multi_tensor(const unsigned long long* __restrict__ pointers,
                                             const long long* __restrict__ offsets, int tensors,
                                             const scalar_t* __restrict__ hyper,
                                             long long total) {
    const scalar_t one_minus_beta1 = hyper[0], beta2 = hyper[1], one_minus_beta2 = hyper[2];
    const scalar_t eps = hyper[3], weight_decay = hyper[4], step_size = hyper[5];
    const scalar_t bias2_sqrt = hyper[6], decay = hyper[7];
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        // the tensor j with offsets[j] <= idx < offsets[j + 1] (empty tensors are skipped over)
        int lo = 0, hi = tensors;
        while (hi - lo > 1) {
            const int mid = (lo + hi) / 2;
            if (offsets[mid] <= idx) lo = mid; else hi = mid;
        }
        const long long i = idx - offsets[lo];
        // Raw addresses: the emulator cannot guard these arrays as it guards the arguments.
        scalar_t* param = (scalar_t*)pointers[4 * lo];
        const scalar_t* grad = (const scalar_t*)pointers[4 * lo + 1];
        scalar_t* exp_avg = (scalar_t*)pointers[4 * lo + 2];
        scalar_t* exp_avg_sq = (scalar_t*)pointers[4 * lo + 3];

        // optim.Adam.apply_step, one operation per array operation there, in the same order
        scalar_t p = mul_rn(param[i], decay);             // AdamW: p *= 1 - lr*wd (else p*1 == p)
        scalar_t g = grad[i];
        if (weight_decay != 0) g = mul_rn(p, weight_decay) + g;       // Adam: g = p*wd + grad
        scalar_t m = exp_avg[i];
        m = m + mul_rn(g - m, one_minus_beta1);                       // m += (1-b1)*(g - m)
        const scalar_t v = mul_rn(exp_avg_sq[i], beta2) + mul_rn(mul_rn(g, g), one_minus_beta2);
        const scalar_t denom = sqrt_(v) / bias2_sqrt + eps;
        p = p - mul_rn(m / denom, step_size);
        param[i] = p;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
    }
}
