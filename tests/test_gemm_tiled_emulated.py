"""kernels/gemm_tiled.cu (``minicnn.fused.gemm.matmul_tiled``) run on the CPU by the emulator.

Most tests build the kernel with smaller tiles (``SMALL``: 32x32 tiles of C, 2x2 per thread, 16
k per step, K split into slices of 16 or more while a product has fewer than 8 blocks; the same
256 threads), so that shapes of a few tens cover every
edge quickly: M, N, K multiples of the tiles, one past, one short, 1; tall and skinny; K long
enough to be split; batches with a shared operand; all four transposes. The configuration the
GPU runs (``TILING``, the file's defaults) is tested on a few shapes too, split-K included.
Shared memory is poisoned (NaN) before each block, and C starts as NaN, so an element read
before it is written, or never written, shows.

Tolerances, against np.matmul in float64, relative to the size of the terms summed,
S = |op(A)| @ |op(B)|: float64 |C - ref| <= 1e-12 * S; float32 |C - ref| <= 2 * K * 2^-24 * S,
twice the rounding-error bound of a K-term sum of float32 fma steps (a split adds its slices'
sums: at most K + splits <= 2K roundings still). Where a product is not split, the tiled
kernel sums each element as gemm.cu does (k in increasing order, fma from 0): the same bits.
Split-K gives the same bits on every run, in both thread orders and on a capped grid.
Mutations of the kernel (a barrier removed, a wrong tile or fragment index, the prefetch of the
wrong step, a slice running past its end, the reduction's barrier removed) give wrong results.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minicnn.cuda
from minicnn import ops
from minicnn.fused import gemm
from minicnn.fused.gemm import TILING, Tiling, matmul_tiled
from minicnn.testing import emulator
from test_gemm_emulated import assert_matmul_close, assert_same_bits

ROOT = Path(__file__).resolve().parents[1]
SOURCE = minicnn.cuda.kernel_dir() / "gemm_tiled.cu"
SMALL = Tiling(bm=32, bn=32, bk=16, tm=2, tn=2, split_blocks=8, split_min_k=16)
DTYPES = [np.float32, np.float64]
TRANSPOSES = [(False, False), (True, False), (False, True), (True, True)]
TRANSPOSE_IDS = ["nn", "tn", "nt", "tt"]

needs_emulator = pytest.mark.skipif(not emulator.available(), reason="CUDA emulator "
                                    f"unavailable: {emulator.unavailable_reason()}")
emulated = [pytest.mark.emulated, needs_emulator]


def build(directory, tiling, source=None, name="gemm_tiled_small.cu"):
    """The kernel file with ``tiling``'s #defines first, written to ``directory``."""
    path = Path(directory) / name
    path.write_text(tiling.defines() + (source if source is not None else SOURCE.read_text()))
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gemm_tiled"), SMALL)


def operands(rng, shape, trans, dtype, batch_a=(), batch_b=()):
    """op(A), op(B) for (M, N, K) = shape; a transposed operand is a view of stored memory."""
    M, N, K = shape

    def one(batch, rows, cols, t):
        if t:
            return rng.standard_normal(batch + (cols, rows)).astype(dtype).swapaxes(-1, -2)
        return rng.standard_normal(batch + (rows, cols)).astype(dtype)
    return one(batch_a, M, K, trans[0]), one(batch_b, K, N, trans[1])


def tiled(a, b, file, tiling=SMALL, launch=emulator.launch):
    return matmul_tiled(a, b, launch=launch, tiling=tiling, file=str(file))


def test_the_gpu_configuration_is_the_kernels_default():
    """TILING holds the numbers of the file's #defines (the launcher sizes the grid by them)."""
    defaults = dict(re.findall(r"^#define GEMM_(B[MNK]|T[MN]) (\d+)", SOURCE.read_text(), re.M))
    assert {k: int(v) for k, v in defaults.items()} == {
        "BM": TILING.bm, "BN": TILING.bn, "BK": TILING.bk, "TM": TILING.tm, "TN": TILING.tn}
    assert (TILING.bm // TILING.tm) * (TILING.bn // TILING.tn) == minicnn.cuda.THREADS_PER_BLOCK
    with pytest.raises(ValueError, match=r"\(bm / tm\) \* \(bn / tn\) must be 256 threads"):
        Tiling(bm=64, tm=8)


@pytest.mark.parametrize("tiling", [TILING, SMALL], ids=["gpu", "small"])
def test_split_k_depends_on_the_shape_only(tiling):
    """Slices of k_chunk, a multiple of bk, none empty, covering K; no split when the product
    has blocks enough or K is short."""
    for batch, M, N, K in [(1, 288, 64, 12800), (1, 9, 32, 86528), (1, 1, 32, 86528),
                           (1, 128, 128, 1600), (3, 5, 7, 1100), (1, 5, 7, 40), (1, 1, 1, 0),
                           (1, 100000, 64, 10000), (2, 40, 40, 9)]:
        splits, chunk = tiling.split(batch, M, N, K)
        assert (splits, chunk) == tiling.split(batch, M, N, K)
        if splits == 1:
            assert chunk >= K
            continue
        assert chunk % tiling.bk == 0 and chunk >= tiling.split_min_k
        assert (splits - 1) * chunk < K <= splits * chunk, (splits, chunk, K)
        assert tiling.tiles(batch, M, N) < tiling.split_blocks
    # the weight gradients of the example network at batch 128, on the GPU configuration
    assert TILING.split(1, 288, 64, 12800) == (50, 256)
    assert TILING.split(1, 9, 32, 86528) == (338, 256)
    assert TILING.split(1, 12800, 64, 288) == (1, 288)          # 200 blocks of C: no split


# --- the kernel against np.matmul ----------------------------------------------------------------

# (M, N, K) for the 32x32x16 build: multiples of the tiles, one past, one short, 1s, tall and
# skinny both ways, and K long enough to be split (5 x 7 x 100: 1 block, 4 slices of 32)
EDGE_SHAPES = [(32, 32, 16), (33, 65, 17), (31, 63, 15), (1, 1, 1), (1, 70, 1), (70, 1, 9),
               (150, 3, 6), (3, 150, 7), (5, 7, 100), (40, 33, 77), (64, 2, 41)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("trans", TRANSPOSES, ids=TRANSPOSE_IDS)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=["M{}N{}K{}".format(*s) for s in EDGE_SHAPES])
@pytest.mark.emulated
@needs_emulator
def test_edge_shapes(small, shape, trans, dtype):
    a, b = operands(np.random.default_rng(sum(shape)), shape, trans, dtype)
    assert_matmul_close(tiled(a, b, small), a, b, f"{shape} {trans}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.emulated
@needs_emulator
def test_random_shapes(small, seed, dtype):
    rng = np.random.default_rng(2000 + seed)
    for trans in TRANSPOSES:
        shape = tuple(int(v) for v in rng.integers(1, 71, size=3))
        a, b = operands(rng, shape, trans, dtype)
        assert_matmul_close(tiled(a, b, small), a, b, f"{shape} {trans}")


BATCHES = [((3,), ()), ((), (4,)), ((2,), (2,)), ((2, 3), ())]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("trans", TRANSPOSES, ids=TRANSPOSE_IDS)
@pytest.mark.parametrize("batches", BATCHES, ids=["A3", "B4", "both2", "A2x3"])
@pytest.mark.emulated
@needs_emulator
def test_batched(small, batches, trans, dtype):
    """A 2-D operand is shared by every product (stride 0). K = 50 is split in 2 where the
    batch has fewer than 8 blocks: the slices of every product go to the workspace."""
    rng = np.random.default_rng(len(batches[0]) * 10 + len(batches[1]))
    for shape in ((9, 40, 50), (35, 6, 13)):
        a, b = operands(rng, shape, trans, dtype, *batches)
        assert_matmul_close(tiled(a, b, small), a, b, f"{a.shape} @ {b.shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.emulated
@needs_emulator
def test_the_gpu_configuration(dtype):
    """The 64x64x16 build that runs on the GPU: edges, a batch, and a K of 1100 split in 4."""
    rng = np.random.default_rng(21)
    cases = [((70, 130, 40), (False, True), (), ()), ((130, 70, 33), (True, True), (), ()),
             ((64, 64, 16), (True, False), (), ()), ((1, 3, 1), (False, False), (), ()),
             ((20, 9, 17), (False, True), (2,), ()), ((5, 7, 1100), (True, False), (), ())]
    assert TILING.split(1, 5, 7, 1100)[0] == 4
    for shape, trans, batch_a, batch_b in cases:
        a, b = operands(rng, shape, trans, dtype, batch_a, batch_b)
        assert_matmul_close(matmul_tiled(a, b, launch=emulator.launch), a, b, f"{shape} {trans}")


# --- the same bits --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("trans", TRANSPOSES, ids=TRANSPOSE_IDS)
@pytest.mark.emulated
@needs_emulator
def test_split_k_gives_the_same_bits_every_run_in_both_thread_orders(small, trans, dtype,
                                                                    monkeypatch):
    """(2, 30, 100) @ (100, 20), K split in 4: twice, threads last to first, and on a grid of 3
    blocks (each loops over several tiles and chunks of the reduction)."""
    rng = np.random.default_rng(22)
    a, b = operands(rng, (30, 20, 100), trans, dtype, (2,), ())
    assert SMALL.split(2, 30, 20, 100) == (4, 32)
    first = tiled(a, b, small)
    assert_matmul_close(first, a, b, "split-K")
    assert_same_bits(tiled(a, b, small), first, "split-K, again")
    assert_same_bits(tiled(a, b, small, launch=emulator.launch_reversed), first,
                     "split-K, threads last to first")
    monkeypatch.setattr(minicnn.cuda, "MAX_BLOCKS", 3)
    assert_same_bits(tiled(a, b, small), first, "split-K on 3 blocks")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("trans", TRANSPOSES, ids=TRANSPOSE_IDS)
@pytest.mark.emulated
@needs_emulator
def test_without_a_split_the_bits_of_the_reference_kernel(small, trans, dtype):
    """Each element summed over k in increasing order by fma from 0, as gemm.cu does."""
    rng = np.random.default_rng(23)
    for shape in ((45, 50, 7), (3, 70, 20)):
        a, b = operands(rng, shape, trans, dtype, (2,), ())
        assert SMALL.split(2, *shape)[0] == 1 and TILING.split(2, *shape)[0] == 1
        reference = ops.matmul_kernel(a, b, launch=emulator.launch)
        assert_same_bits(tiled(a, b, small), reference, f"{shape} small build")
        assert_same_bits(matmul_tiled(a, b, launch=emulator.launch), reference,
                         f"{shape} GPU build")


# --- matmul_tiled ---------------------------------------------------------------------------------

class Recording:
    """emulator.launch that keeps the arguments of each launch."""

    def __init__(self):
        self.calls = []

    def __call__(self, file, name, n, *args):
        self.calls.append((Path(file).name, name, n, args))
        return emulator.launch(file, name, n, *args)


@pytest.mark.emulated
@needs_emulator
def test_transposed_views_are_read_in_place_and_the_workspace_is_summed(small):
    rng = np.random.default_rng(24)
    a, b = operands(rng, (6, 9, 100), (True, True), np.float64)       # 4 slices of 32
    launch = Recording()
    c = tiled(a, b, small, launch=launch)
    assert_matmul_close(c, a, b, "w.T-style operands")
    (_, name1, n1, args1), (_, name2, n2, args2) = launch.calls
    assert (name1, name2) == ("gemm_tiled", "gemm_tiled_reduce")
    for given, passed, trans in ((a, args1[0], args1[10]), (b, args1[1], args1[11])):
        assert np.shares_memory(given, passed) and passed.flags.c_contiguous and trans == 1
    splits, chunk = args1[12:]
    assert (splits, chunk) == SMALL.split(1, 6, 9, 100) == (4, 32)
    assert args1[2].shape == (4, 6, 9) and n1 == 4 * SMALL.tiles(1, 6, 9) * 256
    assert args2[0] is args1[2] and args2[1] is c and args2[2:] == (54, 4)
    launch.calls.clear()
    tiled(a[:, :8], b[:8], small, launch=launch)                       # no split: C directly
    ((_, name, _, args),) = launch.calls
    assert name == "gemm_tiled" and args[12:] == (1, 8)


@pytest.mark.emulated
@needs_emulator
def test_other_layouts_are_copied_and_bad_shapes_named(small):
    rng = np.random.default_rng(25)
    a = rng.standard_normal((20, 30))[::2]                  # every other row: neither layout
    b = rng.standard_normal((30, 7))
    assert_matmul_close(tiled(a, b, small), a, b, "strided rows")
    with pytest.raises(ValueError, match=re.escape("matmul: cannot multiply arrays of shapes "
                                                   "(3, 4) and (5, 6)")):
        matmul_tiled(np.ones((3, 4)), np.ones((5, 6)), launch=emulator.launch)
    with pytest.raises(TypeError, match="both operands must have one dtype"):
        matmul_tiled(np.ones((3, 4)), np.ones((4, 5), np.float32), launch=emulator.launch)
    assert matmul_tiled(np.ones((0, 3)), np.ones((3, 4)), launch=emulator.launch).shape == (0, 4)
    c = matmul_tiled(np.ones((2, 0)), np.ones((0, 4)), launch=emulator.launch)      # K = 0
    assert c.shape == (2, 4) and (c == 0).all()


# --- mutations of gemm_tiled.cu must be caught ----------------------------------------------------

def _no_barrier(comment):
    return ("__syncthreads();    " + comment, "/* removed */;    " + comment, 1)


MUTATIONS = {   # name: (text, its replacement, which occurrence)
    "no_barrier_1": _no_barrier("// 1: both tiles"),
    "no_barrier_2": _no_barrier("// 2: everyone"),
    "fragment_of_adjacent_rows": ("As[k][ty + i * GEMM_RM]", "As[k][ty * GEMM_TM + i]", 1),
    "tile_copied_to_the_wrong_row": ("As[ak + r * a_dk][ai + r * a_di]", "As[ak + r * a_dk][ai]",
                                     1),
    "prefetch_of_the_same_step": ("load(k0 + GEMM_BK);", "load(k0);", 1),
    "slice_past_its_end": ("k_begin + k_chunk < K ? k_begin + k_chunk : K", "K", 1),
    "reduce_without_barrier_1": _no_barrier("// 1: every group"),
    "reduce_without_barrier_2": _no_barrier("// 2: group 0"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@pytest.mark.emulated
@needs_emulator
def test_mutations_give_wrong_results(tmp_path, mutation, monkeypatch):
    """Each mutation gives wrong results in at least one of the two thread orders (the emulator's
    schedules); the real kernel is right in both. Grids of 2 blocks, so each block loops."""
    old, new, count = MUTATIONS[mutation]
    source = SOURCE.read_text()
    at = -1
    for _ in range(count):
        at = source.index(old, at + 1)
    path = build(tmp_path, SMALL, source[:at] + new + source[at + len(old):],
                 f"gemm_tiled_{mutation}.cu")            # a new name: launchers cache by file
    real = build(tmp_path, SMALL)
    monkeypatch.setattr(minicnn.cuda, "MAX_BLOCKS", 2)
    rng = np.random.default_rng(26)
    a, b = operands(rng, (40, 70, 30), (False, False), np.float64)     # 2x3 tiles, 2 steps
    a2, b2 = operands(rng, (5, 40, 150), (False, True), np.float64)    # 4 slices, 7 chunks of C
    assert SMALL.split(1, 40, 70, 30)[0] == 1 and SMALL.split(1, 5, 40, 150)[0] == 4
    caught = []
    for launch in (emulator.launch, emulator.launch_reversed):
        for x, y in ((a, b), (a2, b2)):
            assert_matmul_close(tiled(x, y, real, launch=launch), x, y, "the real kernel")
            try:
                assert_matmul_close(tiled(x, y, path, launch=launch), x, y, mutation)
            except (AssertionError, emulator.EmulatorError):
                caught.append(launch)
    assert caught, f"gemm_tiled.cu with {mutation} still gives the right results"


# --- the benchmark script, without a GPU ----------------------------------------------------------

def _dependencies_only_env():
    """An environment where Python finds numpy and tqdm but not an installed minicnn."""
    import tqdm
    paths = {str(Path(np.__file__).parents[1]), str(Path(tqdm.__file__).parents[1])}
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.pathsep.join(paths)}


def test_the_benchmark_explains_itself_without_a_gpu(tmp_path):
    """Run as on a GPU machine without the project installed (``python -S``: no .pth files, so
    only the checkout's minicnn): here, with no GPU, it says why and exits 0."""
    from minicnn import backend
    if backend.cuda_unavailable_reason() is None:
        pytest.skip("a usable GPU is here: the script would benchmark it")
    run = subprocess.run([sys.executable, "-S", str(ROOT / "benchmarks" / "gemm.py")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env=_dependencies_only_env())
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("benchmarks/gemm.py needs a usable CUDA GPU: "), run.stdout


def test_the_benchmark_finds_the_products_of_a_training_step():
    """The shapes it times come from one step of the fused example network (here on the CPU)."""
    import runpy
    bench = runpy.run_path(str(ROOT / "benchmarks" / "gemm.py"))
    products = bench["step_products"](2, "cpu")
    assert len(products) >= 10
    for a_shape, b_shape, la, lb in products:
        assert a_shape[-1] == b_shape[-2] and {la, lb} <= {"C", "T", "strided"}
    # the second convolution's product: the 10x10 outputs its pool reads, of 2 images
    assert ((200, 288), (288, 64)) in [p[:2] for p in products]
    assert gemm.FILE in {p.name for p in minicnn.cuda.kernel_files()}


# --- on a real GPU (python -m pytest -m gpu) ------------------------------------------------------

def _gpu_or_skip():
    from minicnn import backend
    reason = backend.cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no usable GPU: {reason}")
    import cupy
    return cupy


# the products of a training step of the fused example network at batch 128 (benchmarks/gemm.py
# lists them): (M, N, K), which operands are transposed views, and edges
GPU_SHAPES = [((86528, 32, 9), (False, True)), ((12800, 64, 288), (False, True)),
              ((128, 128, 1600), (False, True)), ((288, 64, 12800), (True, False)),
              ((9, 32, 86528), (True, False)), ((1, 32, 86528), (False, False)),
              ((128, 1600, 128), (False, False)), ((12800, 288, 64), (False, False)),
              ((1, 1, 1), (False, False)), ((65, 129, 1000), (True, True)),
              ((3, 5, 7), (True, False))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_on_the_gpu_against_cupy_and_twice_the_same_bits(dtype):
    """The tolerances of the module docstring, against CuPy's float64 product; a second run of
    each product gives the same bits (split-K included)."""
    cupy = _gpu_or_skip()
    rng = np.random.default_rng(30)
    for shape, trans in GPU_SHAPES:
        a, b = (cupy.asarray(x) for x in operands(rng, shape, trans, dtype))
        got = matmul_tiled(a, b)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        want, scale = a64 @ b64, cupy.abs(a64) @ cupy.abs(b64)
        rtol = 1e-12 if dtype == np.float64 else 2 * shape[2] * 2.0**-24
        bad = int((cupy.abs(got - want) > rtol * scale).sum())
        assert bad == 0, f"{shape} {trans}: {bad} elements off by more than {rtol:.3g} * S"
        assert got.flags.c_contiguous and got.dtype == dtype
        assert_same_bits(matmul_tiled(a, b).get(), got.get(), f"{shape} {trans}, again")


@pytest.mark.gpu
def test_on_the_gpu_recorded_in_a_cuda_graph():
    """A split-K product recorded by CudaRecorder (the workspace from the graph's allocator) and
    replayed gives the eager bits."""
    cupy = _gpu_or_skip()
    from minicnn.fused.graph import CudaRecorder
    rng = np.random.default_rng(31)
    a, b = (cupy.asarray(x) for x in operands(rng, (288, 64, 12800), (True, False), np.float32))
    assert TILING.split(1, 288, 64, 12800)[0] > 1
    eager = matmul_tiled(a, b).get()
    out = cupy.empty((288, 64), dtype=np.float32)

    def step():
        out[...] = matmul_tiled(a, b)
    recorder = CudaRecorder()
    recorder.warm(step)
    out.fill(np.nan)
    graph = recorder.record(step)
    graph.launch()
    cupy.cuda.Device().synchronize()
    assert_same_bits(out.get(), eager, "replayed")
