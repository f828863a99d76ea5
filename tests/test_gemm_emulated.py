"""kernels/gemm.cu run on the CPU by the emulator's cooperative blocks, against np.matmul.

- The kernel against np.matmul in float64 for random shapes (fixed seed: M, N, K in 1..70, many
  not multiples of 16, K = 1 among them), all four transpose combinations, batches with a 2-D
  operand broadcast (stride 0) or with both operands batched. Tolerances are relative to the
  size of the terms summed, S = |op(A)| @ |op(B)| (the sum can cancel to near 0 where the terms
  do not): float64 |C - ref| <= 1e-12 * S; float32 |C - ref| <= 2 * K * 2^-24 * S, twice the
  rounding-error bound of a K-term sum of float32 fma steps.
- A grid smaller than the tile count (MAX_BLOCKS capped), and threads run last to first: the
  same bits.
- ``ops.matmul_kernel`` through ``emulator.launch`` equals ``ops.matmul`` on NumPy for the shapes
  it takes; a transposed view is read in place (the launcher receives its memory, no copy).
- Mutations of gemm.cu, compiled from tmp_path, give wrong results: either barrier removed, and
  a tile stored with its indexes swapped. Barrier divergence raises ``EmulatorError``.
- The cooperative runtime itself: shared memory is shared by a block, poisoned (NaN) before each
  block, and files without shared memory or barriers keep the one-thread-at-a-time path.
"""
import re

import numpy as np
import pytest

import minicnn.cuda
from minicnn import ops
from minicnn.cuda import Launcher
from minicnn.testing import emulator

pytestmark = [pytest.mark.emulated,
              pytest.mark.skipif(not emulator.available(), reason="CUDA emulator unavailable: "
                                 f"{emulator.unavailable_reason()}")]

DTYPES = [np.float32, np.float64]
GEMM = minicnn.cuda.kernel_dir() / "gemm.cu"


def random_case(rng, dtype, trans_a=False, trans_b=False, batch_a=(), batch_b=()):
    """Operands (A, B) as the kernel takes them (stored transposed where asked) and op(A), op(B)."""
    M, N, K = (int(v) for v in rng.integers(1, 71, size=3))
    a = rng.standard_normal(batch_a + ((K, M) if trans_a else (M, K))).astype(dtype)
    b = rng.standard_normal(batch_b + ((N, K) if trans_b else (K, N))).astype(dtype)
    op_a = a.swapaxes(-1, -2) if trans_a else a
    op_b = b.swapaxes(-1, -2) if trans_b else b
    return a, b, op_a, op_b


def run_gemm(a, b, op_a, op_b, launch=emulator.launch, file="gemm.cu"):
    """C = op(A) @ op(B) by the kernel, straight through a launcher: C starts as NaN."""
    M, K = op_a.shape[-2:]
    N = op_b.shape[-1]
    batch_shape = op_a.shape[:-2] or op_b.shape[:-2]
    batch = int(np.prod(batch_shape))
    c = np.full(batch_shape + (M, N), np.nan, dtype=a.dtype)
    tiles = batch * -(-M // 16) * -(-N // 16)
    launch(str(file), "gemm", tiles * minicnn.cuda.THREADS_PER_BLOCK, a, b, c, batch, M, N, K,
           M * K if a.ndim > 2 else 0, K * N if b.ndim > 2 else 0, M * N,
           int(op_a is not a), int(op_b is not b))
    return c


def assert_matmul_close(got, op_a, op_b, what):
    """got == np.matmul(op_a, op_b) in float64 within the tolerances of the module docstring."""
    a64, b64 = op_a.astype(np.float64), op_b.astype(np.float64)
    want, scale = np.matmul(a64, b64), np.matmul(np.abs(a64), np.abs(b64))
    K = op_a.shape[-1]
    rtol = 1e-12 if got.dtype == np.float64 else 2 * K * 2.0**-24
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert got.flags.c_contiguous and got.dtype == op_a.dtype, what
    assert not np.isnan(got).any(), f"{what}: {np.isnan(got).sum()} elements NaN (never written?)"
    err = np.abs(got - want)
    bad = err > rtol * scale
    if bad.any():
        at = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {bad.sum()} of {got.size} elements off by more than "
                             f"{rtol:.3g} * sum|a||b|; first at {list(at)}: got {got[at]!r}, "
                             f"expected {want[at]!r}")


def assert_same_bits(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    bits = np.dtype(f"u{got.dtype.itemsize}")
    differ = got.view(bits) != want.view(bits)
    assert not differ.any(), f"{what}: {differ.sum()} of {got.size} elements differ"


# --- the kernel against np.matmul -----------------------------------------------------------------

TRANSPOSES = [(False, False), (True, False), (False, True), (True, True)]
TRANSPOSE_IDS = ["nn", "tn", "nt", "tt"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("trans", TRANSPOSES, ids=TRANSPOSE_IDS)
@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed, trans, dtype):
    rng = np.random.default_rng(1000 + seed)
    a, b, op_a, op_b = random_case(rng, dtype, *trans)
    assert_matmul_close(run_gemm(a, b, op_a, op_b), op_a, op_b, f"{op_a.shape} @ {op_b.shape}")


# (M, N, K): multiples of 16, one past, one short, K = 1 and single rows/columns
EDGE_SHAPES = [(16, 16, 16), (17, 33, 15), (1, 1, 1), (1, 70, 1), (70, 1, 33), (32, 48, 1),
               (5, 3, 64), (15, 17, 31)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("trans", TRANSPOSES, ids=TRANSPOSE_IDS)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=["M{}N{}K{}".format(*s) for s in EDGE_SHAPES])
def test_edge_shapes(shape, trans, dtype):
    M, N, K = shape
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal((K, M) if trans[0] else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if trans[1] else (K, N)).astype(dtype)
    op_a, op_b = (a.T if trans[0] else a), (b.T if trans[1] else b)
    assert_matmul_close(run_gemm(a, b, op_a, op_b), op_a, op_b, f"{shape} {trans}")


BATCHES = [((3,), ()), ((), (4,)), ((2,), (2,)), ((2, 3), ())]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("trans", TRANSPOSES, ids=TRANSPOSE_IDS)
@pytest.mark.parametrize("batches", BATCHES, ids=["A3", "B4", "both2", "A2x3"])
def test_batched(batches, trans, dtype):
    """A 2-D operand is shared by every product (stride 0); batched ones have their own."""
    rng = np.random.default_rng(len(batches[0]) * 10 + len(batches[1]))
    a, b, op_a, op_b = random_case(rng, dtype, *trans, *batches)
    assert_matmul_close(run_gemm(a, b, op_a, op_b), op_a, op_b,
                        f"{op_a.shape} @ {op_b.shape}")


def test_the_training_product():
    """(800, 288) @ (288, 64): a convolution's product of the emulated training tests."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((800, 288)), rng.standard_normal((288, 64))
    assert_matmul_close(run_gemm(a, b, a, b), a, b, "(800, 288) @ (288, 64)")


# --- launches that differ from the plain one ------------------------------------------------------

def test_grid_smaller_than_the_tile_count(monkeypatch):
    """3 blocks for 2 * 5 * 4 = 40 tiles: each block loops over tiles of both products."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((2, 40, 70))          # op(A) (2, 70, 40): 5 x 4 tiles per product
    b = rng.standard_normal((40, 60))
    op_a, op_b = a.swapaxes(-1, -2), b
    full = run_gemm(a, b, op_a, op_b)
    monkeypatch.setattr(minicnn.cuda, "MAX_BLOCKS", 3)
    assert minicnn.cuda.grid_for(40 * minicnn.cuda.THREADS_PER_BLOCK) == 3
    capped = run_gemm(a, b, op_a, op_b)
    assert_same_bits(capped, full, "gemm on 3 blocks")
    assert_matmul_close(capped, op_a, op_b, "gemm on 3 blocks")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("trans", TRANSPOSES, ids=TRANSPOSE_IDS)
def test_results_do_not_depend_on_thread_order(trans, dtype):
    """Blocks and the threads of each phase run last to first: the same bits (deterministic)."""
    rng = np.random.default_rng(8)
    a, b, op_a, op_b = random_case(rng, dtype, *trans, (2,), ())
    forward = run_gemm(a, b, op_a, op_b)
    backward = run_gemm(a, b, op_a, op_b, launch=emulator.launch_reversed)
    assert_same_bits(backward, forward, "gemm, threads run last to first")


# --- ops.matmul_kernel ----------------------------------------------------------------------------

class Recording:
    """emulator.launch that keeps the arguments of each launch."""

    def __init__(self):
        self.calls = []

    def __call__(self, file, name, n, *args):
        self.calls.append((file, name, n, args))
        return emulator.launch(file, name, n, *args)


def _op_shapes():
    # (a's shape, b's shape, which operands are transposed views)
    return [((17, 40), (40, 9), ""), ((17, 40), (40, 9), "a"), ((17, 40), (40, 9), "b"),
            ((17, 40), (40, 9), "ab"), ((3, 20, 18), (18, 5), ""), ((20, 18), (2, 3, 18, 5), ""),
            ((2, 7, 33), (2, 33, 19), "ab"), ((1, 1), (1, 1), ""), ((6, 1), (1, 8), "ab")]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", _op_shapes(), ids=lambda c: f"{c[0]}@{c[1]}{c[2] and '_T' + c[2]}")
def test_matmul_kernel_equals_the_numpy_op(case, dtype):
    a_shape, b_shape, views = case
    rng = np.random.default_rng(9)

    def operand(shape, view):
        if not view:
            return rng.standard_normal(shape).astype(dtype)
        stored = rng.standard_normal(shape[:-2] + (shape[-1], shape[-2])).astype(dtype)
        return stored.swapaxes(-1, -2)              # a transposed view, as w.T is
    a, b = operand(a_shape, "a" in views), operand(b_shape, "b" in views)
    launch = Recording()
    got = ops.matmul_kernel(a, b, launch=launch)
    want = ops.matmul(a, b)
    assert got.flags.c_contiguous and got.dtype == dtype
    assert_matmul_close(got, a, b, f"matmul_kernel {a.shape} @ {b.shape}")
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    ((file, name, n, args),) = launch.calls
    assert (file, name) == ("gemm.cu", "gemm")
    for given, passed, trans in ((a, args[0], args[10]), (b, args[1], args[11])):
        assert np.shares_memory(given, passed), "the operand was copied"
        assert passed.flags.c_contiguous
        # a transposed view goes in as its memory with the trans flag (only when it is not
        # C-contiguous as it is: a (6, 1) view of a (1, 6) row is both)
        assert trans == int(not given.flags.c_contiguous)


def test_matmul_kernel_copies_other_layouts():
    """An operand neither C-contiguous nor a transposed view is made contiguous first."""
    rng = np.random.default_rng(10)
    a = rng.standard_normal((20, 30))[::2]          # every other row: (10, 30)
    b = rng.standard_normal((30, 7))
    launch = Recording()
    got = ops.matmul_kernel(a, b, launch=launch)
    assert_matmul_close(got, a, b, "strided rows")
    passed = launch.calls[0][3][0]
    assert passed.flags.c_contiguous and not np.shares_memory(passed, a)


@pytest.mark.parametrize("a_shape, b_shape", [((3, 4), (5, 6)), ((2, 3, 4), (3, 4, 5)),
                                              ((4,), (4, 2)), ((2, 1, 3, 4), (3, 4, 5))])
def test_matmul_kernel_names_shapes_it_cannot_take(a_shape, b_shape):
    a, b = np.ones(a_shape), np.ones(b_shape)
    with pytest.raises(ValueError, match=re.escape(f"matmul: cannot multiply arrays of shapes "
                                                   f"{a_shape} and {b_shape}")):
        ops.matmul_kernel(a, b, launch=emulator.launch)


def test_matmul_kernel_empty_and_k0():
    got = ops.matmul_kernel(np.ones((0, 3)), np.ones((3, 4)), launch=emulator.launch)
    assert got.shape == (0, 4)
    got = ops.matmul_kernel(np.ones((2, 0)), np.ones((0, 4)), launch=emulator.launch)
    assert got.shape == (2, 4) and (got == 0).all()


def test_matmul_dispatch(monkeypatch):
    """NumPy arrays: np.matmul. Others: ``@``, or inside products_by_kernel() the function that
    block names: matmul_kernel when it names none; an inner block without one keeps the outer's."""
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 2))
    assert np.array_equal(ops.matmul(a, b), a @ b)
    with ops.products_by_kernel():
        assert np.array_equal(ops.matmul(a, b), a @ b)       # NumPy stays on NumPy
    calls = []
    monkeypatch.setattr(ops, "get_array_module", lambda x: "not numpy")
    monkeypatch.setattr(ops, "matmul_kernel", lambda x, y: calls.append("kernel") or x @ y)

    def tiled(x, y):
        calls.append("tiled")
        return x @ y
    ops.matmul(a, b)
    assert calls == []
    with ops.products_by_kernel():
        with ops.products_by_kernel():
            ops.matmul(a, b)
        ops.matmul(a, b)
        with ops.products_by_kernel(tiled):
            ops.matmul(a, b)
    assert calls == ["kernel", "kernel", "tiled"]
    calls.clear()
    with ops.products_by_kernel(tiled):
        with ops.products_by_kernel():                   # keeps the enclosing block's
            ops.matmul(a, b)
        with ops.products_by_kernel(ops.matmul_kernel):
            ops.matmul(a, b)
        ops.matmul(a, b)
    assert calls == ["tiled", "kernel", "tiled"]
    with pytest.raises(RuntimeError), ops.products_by_kernel(tiled):
        raise RuntimeError
    calls.clear()
    ops.matmul(a, b)
    assert calls == [] and ops._kernel_products == []


def test_one_block_of_threads_is_one_tile():
    assert ops.GEMM_TILE ** 2 == minicnn.cuda.THREADS_PER_BLOCK


# --- mutations of gemm.cu must be caught ----------------------------------------------------------

def mutant(tmp_path, name, old, new, count=1):
    """gemm.cu with the `count`-th occurrence of `old` replaced by `new`, written to tmp_path."""
    source = GEMM.read_text()
    at = -1
    for _ in range(count):
        at = source.index(old, at + 1)
    path = tmp_path / f"gemm_{name}.cu"          # a new name: launchers cache modules by file
    path.write_text(source[:at] + new + source[at + len(old):])
    return path


MUTATIONS = {
    "no_barrier_1": ("__syncthreads();    // 1", "/* removed */;    // 1", 1),
    "no_barrier_2": ("__syncthreads();    // 2", "/* removed */;    // 2", 1),
    "tile_indexes_swapped": ("As[ai][ak] =", "As[ak][ai] =", 1),
}


@pytest.mark.parametrize("launch", [emulator.launch, emulator.launch_reversed],
                         ids=["forward", "reversed"])
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_mutations_give_wrong_results(tmp_path, mutation, launch):
    old, new, count = MUTATIONS[mutation]
    path = mutant(tmp_path, mutation, old, new, count)
    assert path.read_text() != GEMM.read_text()
    rng = np.random.default_rng(12)
    a, b = rng.standard_normal((40, 50)), rng.standard_normal((50, 30))    # K: 4 tiles of 16
    right = run_gemm(a, b, a, b, launch=launch)
    assert_matmul_close(right, a, b, "the real kernel")
    wrong = run_gemm(a, b, a, b, launch=launch, file=path)
    with pytest.raises(AssertionError):
        assert_matmul_close(wrong, a, b, f"gemm.cu with {mutation}")


DIVERGENT = r"""
extern "C" __global__ void half_wait(const scalar_t* __restrict__ x, scalar_t* __restrict__ y) {
    __shared__ scalar_t s[256];
    s[threadIdx.x] = x[threadIdx.x];
    if (threadIdx.x < 128) __syncthreads();     // the other half returns: divergence
    y[threadIdx.x] = s[255 - threadIdx.x];
}

extern "C" __global__ void two_barriers(const scalar_t* __restrict__ x, scalar_t* __restrict__ y) {
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    y[threadIdx.x] = x[threadIdx.x];
}
"""


def test_barrier_divergence_raises(tmp_path):
    path = tmp_path / "divergent.cu"
    path.write_text(DIVERGENT)
    x, y = np.arange(256.0), np.zeros(256)
    with pytest.raises(emulator.EmulatorError,
                       match=r"half_wait .*barrier divergence in block 0: 128 of its 256 threads "
                             r"returned .* thread 0 .*__syncthreads\(\) on line 5"):
        emulator.launch(str(path), "half_wait", 256, x, y)
    with pytest.raises(emulator.EmulatorError,
                       match=r"thread 0 waits at __syncthreads\(\) on line 11, thread 1 at the "
                             r"one on line 13"):
        emulator.launch(str(path), "two_barriers", 256, x, y)
    # the fibers left inside the kernel are remade: the next launches run normally
    rng = np.random.default_rng(13)
    a, b = rng.standard_normal((20, 30)), rng.standard_normal((30, 10))
    assert_matmul_close(run_gemm(a, b, a, b), a, b, "gemm after a divergent launch")


# --- the cooperative runtime ----------------------------------------------------------------------

SHARED = r"""
// Reverses each block's 256 values through shared memory.
extern "C" __global__ void reverse_blocks(const scalar_t* __restrict__ x,
                                          scalar_t* __restrict__ y) {
    __shared__ scalar_t s[256];
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    s[threadIdx.x] = x[i];
    __syncthreads();
    y[i] = s[blockDim.x - 1 - threadIdx.x];
}

// Block 0 writes shared memory; every block reads it: only block 0 finds values there.
extern "C" __global__ void read_unwritten(scalar_t* __restrict__ y, int* __restrict__ flags) {
    __shared__ scalar_t s[256];
    __shared__ int marks[256];
    if (blockIdx.x == 0) {
        s[threadIdx.x] = (scalar_t)threadIdx.x;
        marks[threadIdx.x] = 7;
    }
    __syncthreads();
    y[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
    flags[blockIdx.x * blockDim.x + threadIdx.x] = marks[threadIdx.x];
}
"""


@pytest.mark.parametrize("launch", [emulator.launch, emulator.launch_reversed],
                         ids=["forward", "reversed"])
def test_shared_memory_is_shared_by_a_block_and_poisoned_between_blocks(tmp_path, launch):
    path = tmp_path / "shared.cu"
    path.write_text(SHARED)
    x = np.arange(3 * 256.0)
    y = np.zeros_like(x)
    launch(str(path), "reverse_blocks", x.size, x, y)
    assert np.array_equal(y, x.reshape(3, 256)[:, ::-1].reshape(-1))
    y, flags = np.zeros(3 * 256, np.float32), np.zeros(3 * 256, np.int32)
    launch(str(path), "read_unwritten", y.size, y, flags)
    assert np.array_equal(y[:256], np.arange(256.0)) and (flags[:256] == 7).all()
    assert np.isnan(y[256:]).all() and (flags[256:] == -1).all()     # 0xff bytes


def test_files_without_shared_memory_keep_the_fast_path(tmp_path):
    """Cooperative blocks only for files that use __shared__ or __syncthreads, outside comments;
    a plain kernel still runs one thread at a time and gives its results."""
    im2col = minicnn.cuda.read_source("im2col.cu")
    assert not emulator.cooperative(im2col)
    assert emulator.cooperative(GEMM.read_text())
    assert not emulator.cooperative("// no __syncthreads() here\n/* nor __shared__ */ int x;")
    sigs = minicnn.cuda.parse_signatures(im2col)
    assert "run_cooperative" not in emulator.wrapper_source(sigs, False)
    assert not emulator.compile_module("pool.cu", np.float64).cooperative
    assert emulator.compile_module("gemm.cu", np.float64).cooperative
    x = np.random.default_rng(14).permutation(np.arange(12.0)).reshape(3, 4)
    y, argmax = np.empty(4), np.empty(4, np.int32)
    emulator.launch("pool.cu", "maxpool_blocks_forward", 4, x, y, argmax, 4, 3, 0)
    assert np.array_equal(y, x.max(axis=0)) and np.array_equal(argmax, x.argmax(axis=0))


def test_barriers_without_shared_memory(tmp_path):
    """A cooperative file with no __shared__ variable: nothing to poison; barriers still hold."""
    path = tmp_path / "barriers_only.cu"
    path.write_text('extern "C" __global__ void copy_twice(const scalar_t* __restrict__ x, '
                    "scalar_t* __restrict__ y, long long n) {\n"
                    "    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
                    "    __syncthreads();\n"
                    "    if (i < n) y[i] = x[i];\n"
                    "    __syncthreads();\n"
                    "}\n")
    x = np.arange(300.0)
    y = np.full_like(x, np.nan)
    emulator.launch(str(path), "copy_twice", x.size, x, y, x.size)
    assert np.array_equal(y, x)


def test_launches_from_two_host_threads():
    """Each OS thread has its own fibers; the block-shared memory is used by one launch at a
    time (ctypes lets both threads into the library at once)."""
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(15)
    cases = [(rng.standard_normal((60, 50)), rng.standard_normal((50, 40))) for _ in range(6)]
    want = [run_gemm(a, b, a, b) for a, b in cases]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda ab: run_gemm(*ab, *ab), cases))
    for g, w in zip(got, want):
        assert_same_bits(g, w, "gemm launched from two threads")
