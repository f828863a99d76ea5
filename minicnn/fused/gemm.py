"""The fast tier's matrix product: ``matmul_tiled(a, b)``, ``np.matmul`` by kernels/gemm_tiled.cu.

The contract is that of ``ops.matmul_kernel`` (the readable kernels/gemm.cu): the same shapes,
batches and dtypes, transposed views read in place, a C-contiguous result; the layout of the
operands is shared with it (``ops._gemm_layout``). The kernel is faster in two ways, described
in its header comment and in docs/kernels.md:

- register tiles: a block of 256 threads computes a 64x64 tile of C, each thread 4x4 of it;
- a deterministic split-K for products with a long K and few tiles of C (a convolution's
  weight gradient): K is cut into slices by a rule of the shape alone (``Tiling.split``), each
  slice's partial product goes to a workspace, and ``gemm_tiled_reduce`` adds the slices in a
  fixed order. No atomics: the same bits on every run, eagerly or replayed in a CUDA graph.

The CUDA-graph step (``minicnn.fused.graph.GraphStep``) routes the products of ``ops.matmul`` here
with ``ops.products_by_kernel(matmul_tiled)``.
"""
import math
from dataclasses import dataclass

from .. import cuda, ops
from ..backend import get_array_module

FILE = "gemm_tiled.cu"


@dataclass(frozen=True)
class Tiling:
    """A configuration of kernels/gemm_tiled.cu and the split-K rule that goes with it.

    bm x bn: the tile of C of one block of 256 threads ((bm / tm) * (bn / tn) = 256), each
    thread tm x tn of it; bk: the k of one step through shared memory. ``TILING`` is the
    configuration the GPU runs, the defaults of the kernel's #defines; ``defines()`` gives the
    lines that build another (the tests build a smaller one to run small shapes).

    K is split while a product has fewer than ``split_blocks`` blocks of C, each slice keeping
    at least ``split_min_k`` of K (``split``).
    """
    bm: int = 64
    bn: int = 64
    bk: int = 16
    tm: int = 4
    tn: int = 4
    split_blocks: int = 512
    split_min_k: int = 256

    def __post_init__(self):
        if (self.bm // self.tm) * (self.bn // self.tn) != cuda.THREADS_PER_BLOCK or \
                self.bm % self.tm or self.bn % self.tn:
            raise ValueError(f"Tiling: (bm / tm) * (bn / tn) must be {cuda.THREADS_PER_BLOCK} "
                             f"threads, got bm={self.bm}, tm={self.tm}, bn={self.bn}, tn={self.tn}")

    def defines(self):
        """The ``#define GEMM_BM 64`` lines that compile the kernel with these tile sizes."""
        return "".join(f"#define GEMM_{name.upper()} {getattr(self, name)}\n"
                       for name in ("bm", "bn", "bk", "tm", "tn"))

    def tiles(self, batch, M, N):
        """Tiles of C of a batch of (M, N) products: one block each."""
        return batch * -(-M // self.bm) * -(-N // self.bn)

    def split(self, batch, M, N, K):
        """(splits, k_chunk): K cut into ``splits`` slices of ``k_chunk`` (a multiple of bk, the
        last slice shorter), from the shape alone.

        As many slices as bring the blocks up to ``split_blocks``, but none shorter than
        ``split_min_k``; (1, K) when the product has blocks enough or K is short.
        """
        tiles = self.tiles(batch, M, N)
        splits = min(-(-self.split_blocks // tiles), K // self.split_min_k)
        if splits <= 1:
            return 1, max(K, 1)
        chunk = -(-K // splits)
        chunk = -(-chunk // self.bk) * self.bk
        return -(-K // chunk), chunk


TILING = Tiling()


def matmul_tiled(a, b, launch=None, tiling=TILING, file=FILE):
    """``np.matmul(a, b)`` by kernels/gemm_tiled.cu -> C-contiguous (..., M, N), a's dtype.

    The shapes of ``ops.matmul_kernel``: (M, K) @ (K, N); a batch against a shared 2-D operand;
    two batches of equal dimensions. Both float32 or both float64; transposed views (``w.T``) are
    read in place. Products that split K (``tiling.split``) sum the slices in a workspace, freed
    on return, then in a fixed order: the same bits on every run. ``launch``, ``tiling`` and
    ``file`` are for the tests (the emulator, a smaller build of the kernel).
    """
    g = ops._gemm_layout(a, b)
    xp = get_array_module(a)
    c = xp.empty(g.shape, dtype=a.dtype)
    if c.size == 0:
        return c
    launch = launch or cuda.launch
    splits, chunk = tiling.split(g.batch, g.M, g.N, g.K)
    # with a split, the kernel writes slice s of every product to partial[s]: (splits, ..., M, N)
    out = c if splits == 1 else xp.empty((splits,) + g.shape, dtype=a.dtype)
    threads = splits * tiling.tiles(g.batch, g.M, g.N) * cuda.THREADS_PER_BLOCK
    launch(file, "gemm_tiled", threads, g.a, g.b, out, g.batch, g.M, g.N, g.K, g.stride_a,
           g.stride_b, g.M * g.N, g.trans_a, g.trans_b, splits, chunk)
    if splits > 1:
        n = c.size
        launch(file, "gemm_tiled_reduce", math.ceil(n / 32) * cuda.THREADS_PER_BLOCK, out, c, n,
               splits)                                          # 32 elements of C per block
    return c
