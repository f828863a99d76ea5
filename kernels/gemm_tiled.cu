// gemm_tiled.cu -- the fast matrix products C = op(A) @ op(B): register tiles, deterministic
// split-K.
//
// Compiled once per dtype with -Dscalar_t=float|double (element type) -Dacc_t=float|double (sums).
// Reference: np.matmul, through matmul_tiled in minicnn/fused/gemm.py, which lays out the
// operands as for gemm.cu (ops._gemm_layout) and picks the split of K.
//
// gemm.cu is the readable version: one output per thread, 16x16 tiles. This file is the one the
// fast tier runs (the CUDA-graph step, where cuBLAS cannot be called). Two things make it fast:
//
// - Register tiles. A block of 256 threads computes a BM x BN = 64x64 tile of C, each thread a
//   TM x TN = 4x4 piece of it held in registers. At each k a thread reads 4 values of A and 4 of B
//   from shared memory and does 16 fma with them, where gemm.cu's thread does 1 fma per 2 reads.
//   A thread's rows are ty, ty + 16, ty + 32, ty + 48 of the tile and its columns tx, tx + 16, ...
//   (not 4 adjacent ones), so the 16 threads of a row read 16 consecutive words of shared memory
//   (no bank conflicts) and write 16 consecutive elements of C (coalesced).
// - Split-K. A product with a long K and few tiles of C (a weight gradient such as
//   cols.T @ dy, K = batch * pixels, C of a few hundred elements) would leave most of the GPU
//   idle, each block looping over all of K alone. The launcher cuts K into `splits` slices of
//   k_chunk (a multiple of BK); block (s, tile) sums slice s only and writes its partial tile to
//   a workspace (splits, batch, M, N); gemm_tiled_reduce then adds the slices of each element in
//   a fixed order. The number of slices depends on the shape alone (never on the device or on
//   timing) and there are no atomics, so every run gives the same bits, eager or in a graph.
//
// Shapes (all arrays C-contiguous; b < batch is the index of one product, s < splits of a slice):
//   op(A)  (M, K): A_b = A + b*stride_a holds A (M, K) row-major, or with trans_a its transpose,
//                  stored (K, M) row-major (a transposed view such as w.T, read in place)
//   op(B)  (K, N): B_b = B + b*stride_b holds B (K, N), or with trans_b its transpose (N, K)
//   C      (M, N): C + s*batch*M*N + b*stride_c; slice s sums k in [s*k_chunk, (s+1)*k_chunk)
//   stride 0 gives every product the same operand (np.matmul's broadcasting of a 2-D operand).
//   splits = 1, k_chunk >= K: C is the result itself.
//
// Each step along K: the block copies a BM x BK tile of op(A) and a BK x BN tile of op(B) from
// registers into shared memory (As stored transposed, As[k][i], so that a thread's 4 values of A
// at one k are in one row), waits (barrier 1), starts loading the next step's tiles from global
// memory into registers (they arrive while it computes), adds BK products into each of its 16
// sums, and waits again (barrier 2) before the next copy overwrites the tiles. Every element of C
// is one thread's sum over k in increasing order, written as fma: without a split the bits are
// those of gemm.cu. Elements past M, N or the slice's end of K are loaded as 0 and never written.
// Blocks loop over (slice, product, tile) (tile += gridDim.x); all threads of a block run the
// same iterations, so all of them reach every barrier.

// The loader compiles this file once per dtype with -Dscalar_t=... -Dacc_t=...; on its own
// (nvcc -ptx file.cu) it builds the float version.
#ifndef scalar_t
#define scalar_t float
#endif
#ifndef acc_t
#define acc_t scalar_t
#endif

// The tile sizes, fixed at compile time. minicnn.fused.gemm.Tiling holds the same numbers (and
// can write #defines for another configuration, which the tests build to run smaller shapes).
#ifndef GEMM_BM
#define GEMM_BM 64      // rows of C per block
#endif
#ifndef GEMM_BN
#define GEMM_BN 64      // columns of C per block
#endif
#ifndef GEMM_BK
#define GEMM_BK 16      // k per step through shared memory
#endif
#ifndef GEMM_TM
#define GEMM_TM 4       // rows of C per thread
#endif
#ifndef GEMM_TN
#define GEMM_TN 4       // columns of C per thread
#endif

#define GEMM_THREADS 256                    // the launch's block size (THREADS_PER_BLOCK)
#define GEMM_RM (GEMM_BM / GEMM_TM)         // threads down a tile (ty)
#define GEMM_RN (GEMM_BN / GEMM_TN)         // threads across a tile (tx)
#define GEMM_A_LOADS (GEMM_BM * GEMM_BK / GEMM_THREADS)    // elements of A each thread copies
#define GEMM_B_LOADS (GEMM_BK * GEMM_BN / GEMM_THREADS)    // and of B
// A row of As/Bs is 2 words longer than the tile: the 32 threads of a warp that store
// consecutive k of one operand stored along k then hit 32 different banks, not 2 of them.
#define GEMM_PAD 2

static_assert(GEMM_BM % GEMM_TM == 0 && GEMM_BN % GEMM_TN == 0, "tiles must hold whole threads");
static_assert(GEMM_RM * GEMM_RN == GEMM_THREADS, "(BM / TM) * (BN / TN) must be 256 threads");
static_assert(GEMM_BM * GEMM_BK % GEMM_THREADS == 0 && GEMM_BK * GEMM_BN % GEMM_THREADS == 0,
              "each thread copies the same number of elements of each tile");
static_assert(GEMM_THREADS % GEMM_BM == 0 && GEMM_THREADS % GEMM_BN == 0 &&
              GEMM_THREADS % GEMM_BK == 0, "a block copies whole rows of each tile at a time");

extern "C" __global__ void gemm_tiled(const scalar_t* __restrict__ A,
                                      const scalar_t* __restrict__ B, scalar_t* __restrict__ C,
                                      int batch, int M, int N, int K, long long stride_a,
                                      long long stride_b, long long stride_c, int trans_a,
                                      int trans_b, int splits, int k_chunk) {
    __shared__ scalar_t As[GEMM_BK][GEMM_BM + GEMM_PAD];   // As[k][i] = op(A)[row0 + i, k0 + k]
    __shared__ scalar_t Bs[GEMM_BK][GEMM_BN + GEMM_PAD];   // Bs[k][j] = op(B)[k0 + k, col0 + j]
    const int tx = threadIdx.x % GEMM_RN, ty = threadIdx.x / GEMM_RN;
    const long long tiles_m = (M + GEMM_BM - 1) / GEMM_BM, tiles_n = (N + GEMM_BN - 1) / GEMM_BN;
    const long long tiles = (long long)splits * batch * tiles_m * tiles_n;
    const long long stride_split = (long long)batch * M * N;
    // Which elements of each tile this thread copies: the r-th is element threadIdx.x + r*256 of
    // the tile numbered along the operand as it is stored, so that consecutive threads read
    // consecutive addresses. Of op(A) stored (M, K) that is row ai + r*(256/BK) at k ak; stored
    // transposed, (K, M), row ai at k ak + r*(256/BM). Of op(B) (K, N), row bk + r*(256/BN) at
    // column bj; transposed, (N, K), row bk at column bj + r*(256/BK).
    const int ai = trans_a ? threadIdx.x % GEMM_BM : threadIdx.x / GEMM_BK;
    const int ak = trans_a ? threadIdx.x / GEMM_BM : threadIdx.x % GEMM_BK;
    const int a_di = trans_a ? 0 : GEMM_THREADS / GEMM_BK;
    const int a_dk = trans_a ? GEMM_THREADS / GEMM_BM : 0;
    const int bk = trans_b ? threadIdx.x % GEMM_BK : threadIdx.x / GEMM_BN;
    const int bj = trans_b ? threadIdx.x / GEMM_BK : threadIdx.x % GEMM_BN;
    const int b_dk = trans_b ? 0 : GEMM_THREADS / GEMM_BN;
    const int b_dj = trans_b ? GEMM_THREADS / GEMM_BK : 0;
    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        // tile -> (s, b, tm, tn), tn fastest
        const long long tn = tile % tiles_n;
        const long long tm = (tile / tiles_n) % tiles_m;
        const long long b = (tile / tiles_n / tiles_m) % batch;
        const long long s = tile / tiles_n / tiles_m / batch;
        const scalar_t* Ab = A + b * stride_a;
        const scalar_t* Bb = B + b * stride_b;
        const long long row0 = tm * GEMM_BM, col0 = tn * GEMM_BN;
        const long long k_begin = s * k_chunk;
        const long long k_end = k_begin + k_chunk < K ? k_begin + k_chunk : K;
        scalar_t a_next[GEMM_A_LOADS], b_next[GEMM_B_LOADS];
        auto load = [&](long long k0) {
#pragma unroll
            for (int r = 0; r < GEMM_A_LOADS; ++r) {
                const long long row = row0 + ai + r * a_di, ka = k0 + ak + r * a_dk;
                a_next[r] = (row < M && ka < k_end)
                                ? Ab[trans_a ? ka * M + row : row * K + ka] : (scalar_t)0;
            }
#pragma unroll
            for (int r = 0; r < GEMM_B_LOADS; ++r) {
                const long long kb = k0 + bk + r * b_dk, col = col0 + bj + r * b_dj;
                b_next[r] = (kb < k_end && col < N)
                                ? Bb[trans_b ? col * K + kb : kb * N + col] : (scalar_t)0;
            }
        };
        acc_t sum[GEMM_TM][GEMM_TN];
#pragma unroll
        for (int i = 0; i < GEMM_TM; ++i)
#pragma unroll
            for (int j = 0; j < GEMM_TN; ++j) sum[i][j] = 0;
        load(k_begin);
        for (long long k0 = k_begin; k0 < k_end; k0 += GEMM_BK) {
#pragma unroll
            for (int r = 0; r < GEMM_A_LOADS; ++r) As[ak + r * a_dk][ai + r * a_di] = a_next[r];
#pragma unroll
            for (int r = 0; r < GEMM_B_LOADS; ++r) Bs[bk + r * b_dk][bj + r * b_dj] = b_next[r];
            __syncthreads();    // 1: both tiles are complete before anyone reads them
            if (k0 + GEMM_BK < k_end) load(k0 + GEMM_BK);   // in flight during the sums below
#pragma unroll
            for (int k = 0; k < GEMM_BK; ++k) {
                acc_t a[GEMM_TM], bv[GEMM_TN];
#pragma unroll
                for (int i = 0; i < GEMM_TM; ++i) a[i] = (acc_t)As[k][ty + i * GEMM_RM];
#pragma unroll
                for (int j = 0; j < GEMM_TN; ++j) bv[j] = (acc_t)Bs[k][tx + j * GEMM_RN];
#pragma unroll
                for (int i = 0; i < GEMM_TM; ++i)
#pragma unroll
                    for (int j = 0; j < GEMM_TN; ++j) sum[i][j] = fma(a[i], bv[j], sum[i][j]);
            }
            __syncthreads();    // 2: everyone has read them before the next copy overwrites them
        }
        scalar_t* Cb = C + s * stride_split + b * stride_c;
#pragma unroll
        for (int i = 0; i < GEMM_TM; ++i) {
            const long long row = row0 + ty + i * GEMM_RM;
#pragma unroll
            for (int j = 0; j < GEMM_TN; ++j) {
                const long long col = col0 + tx + j * GEMM_RN;
                if (row < M && col < N) Cb[row * N + col] = (scalar_t)sum[i][j];
            }
        }
    }
}

// C[i] = partial[0][i] + partial[1][i] + ... + partial[splits-1][i], for i < n = batch*M*N: the
// slices of gemm_tiled's split-K summed in a fixed order. A block takes 32 consecutive elements
// (coalesced reads, one warp wide); its 8 groups of 32 threads sum the slices g, g + 8, g + 16, ...
// in increasing order, so that many slices are read at once, and group 0 adds the 8 group sums
// in order g = 0..7. The order depends only on `splits`: the same bits on every run.
#define GEMM_GROUPS (GEMM_THREADS / 32)

extern "C" __global__ void gemm_tiled_reduce(const scalar_t* __restrict__ partial,
                                             scalar_t* __restrict__ C, long long n, int splits) {
    __shared__ acc_t group_sum[GEMM_GROUPS][32];
    const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
    const long long chunks = (n + 31) / 32;
    for (long long chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
        const long long i = chunk * 32 + lane;
        acc_t sum = 0;
        if (i < n) {
#pragma unroll 4
            for (int s = group; s < splits; s += GEMM_GROUPS) sum += (acc_t)partial[s * n + i];
        }
        group_sum[group][lane] = sum;
        __syncthreads();    // 1: every group's sum is written before group 0 adds them
        if (group == 0 && i < n) {
            acc_t total = group_sum[0][lane];
            for (int g = 1; g < GEMM_GROUPS; ++g) total += group_sum[g][lane];
            C[i] = (scalar_t)total;
        }
        __syncthreads();    // 2: group 0 has read them before the next chunk overwrites them
    }
}
