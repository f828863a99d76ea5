// gemm.cu -- matrix products C = op(A) @ op(B), a batch of them, tiled in shared memory.
//
// Compiled once per dtype with -Dscalar_t=float|double (element type) -Dacc_t=float|double (sums).
// Reference: np.matmul, through matmul / matmul_kernel in minicnn/ops.py (which picks the
// operands' layouts and strides from the arrays' shapes).
//
// Why it exists: a GPU training step recorded as a CUDA graph (minicnn/graph.py) cannot contain
// cuBLAS calls, because CuPy refuses every cuBLAS call while a stream is capturing. Inside such a
// step, ops.products_by_kernel() sends the products here instead. It is also deterministic: each
// element of C is summed by one thread, over k in increasing order, with no atomics, so two runs
// give the same bits. The sums are written as explicit fma, one rounding per step, as the GPU
// computes them, so the emulator (this file run on the CPU) gives those bits too, but for float32
// subnormals, which CuPy's NVRTC option -ftz=true flushes to zero on the GPU.
//
// Shapes (all arrays C-contiguous; b < batch is the index of one product):
//   op(A)  (M, K): A_b = A + b*stride_a holds A (M, K) row-major, or with trans_a its transpose,
//                  stored (K, M) row-major (a transposed view such as w.T, read in place)
//   op(B)  (K, N): B_b = B + b*stride_b holds B (K, N), or with trans_b its transpose (N, K)
//   C      (M, N): C_b = C + b*stride_c
//   stride 0 gives every product the same operand (np.matmul's broadcasting of a 2-D operand).
//
// Tiling: C is cut into 16x16 tiles, one block of 256 threads per tile (the launcher's
// THREADS_PER_BLOCK, as a 16x16 square: tx = threadIdx.x % 16, ty = threadIdx.x / 16); thread
// (ty, tx) computes C[row0 + ty, col0 + tx]. The block walks along K 16 at a time: its threads
// copy a 16x16 tile of op(A) and one of op(B) into shared memory, one element each, wait for one
// another (barrier 1), each adds the 16 products of its row of the A tile and its column of the
// B tile, and wait again (barrier 2) before the next copy overwrites the tiles. Each element of A
// and B is read from global memory once per tile instead of 16 times.
// Blocks loop over tiles (tile += gridDim.x) through every product of the batch, so a grid of
// any size covers every tile; all the threads of a block run the same iterations, so all of
// them reach every barrier. Tiles that stick out past M, N or K are filled with 0, which adds
// nothing, and their out-of-range elements of C are not written.

// The loader compiles this file once per dtype with -Dscalar_t=... -Dacc_t=...; on its own
// (nvcc -ptx file.cu) it builds the float version.
#ifndef scalar_t
#define scalar_t float
#endif
#ifndef acc_t
#define acc_t scalar_t
#endif

#define TILE 16     // TILE * TILE must be the launch's block size (THREADS_PER_BLOCK = 256)

extern "C" __global__ void gemm(const scalar_t* __restrict__ A, const scalar_t* __restrict__ B,
                                scalar_t* __restrict__ C, int batch, int M, int N, int K,
                                long long stride_a, long long stride_b, long long stride_c,
                                int trans_a, int trans_b) {
    __shared__ scalar_t As[TILE][TILE];     // As[i][k] = op(A)[row0 + i, k0 + k]
    __shared__ scalar_t Bs[TILE][TILE];     // Bs[k][j] = op(B)[k0 + k, col0 + j]
    const int tx = threadIdx.x % TILE, ty = threadIdx.x / TILE;
    const long long tiles_m = (M + TILE - 1) / TILE, tiles_n = (N + TILE - 1) / TILE;
    const long long tiles = (long long)batch * tiles_m * tiles_n;
    // Which element of each tile this thread copies: consecutive threads (tx) read consecutive
    // addresses of the operand as it is stored (coalesced loads), transposed or not.
    const int ai = trans_a ? tx : ty, ak = trans_a ? ty : tx;      // As[ai][ak]
    const int bk = trans_b ? tx : ty, bj = trans_b ? ty : tx;      // Bs[bk][bj]
    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        // tile -> (b, tm, tn), tn fastest
        const long long tn = tile % tiles_n;
        const long long tm = (tile / tiles_n) % tiles_m;
        const long long b = tile / tiles_n / tiles_m;
        const scalar_t* Ab = A + b * stride_a;
        const scalar_t* Bb = B + b * stride_b;
        const long long row0 = tm * TILE, col0 = tn * TILE;
        acc_t sum = 0;
        for (int k0 = 0; k0 < K; k0 += TILE) {
            const long long r = row0 + ai, ka = k0 + ak;            // op(A)[r, ka]
            As[ai][ak] = (r < M && ka < K) ? Ab[trans_a ? ka * M + r : r * K + ka] : (scalar_t)0;
            const long long kb = k0 + bk, c = col0 + bj;            // op(B)[kb, c]
            Bs[bk][bj] = (kb < K && c < N) ? Bb[trans_b ? c * K + kb : kb * N + c] : (scalar_t)0;
            __syncthreads();    // 1: both tiles are complete before anyone reads them
            for (int k = 0; k < TILE; ++k)
                sum = fma((acc_t)As[ty][k], (acc_t)Bs[k][tx], sum);
            __syncthreads();    // 2: everyone has read them before the next copy overwrites them
        }
        const long long row = row0 + ty, col = col0 + tx;
        if (row < M && col < N) C[b * stride_c + row * N + col] = (scalar_t)sum;
    }
}
