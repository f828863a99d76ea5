"""Array operations behind the layers: matrix products, im2col/col2im, max and average pooling.

One function per operation, with the same semantics and layout on every backend, so layers never
branch on the backend. The NumPy code here is also the reference the CUDA kernels are checked
against. Shapes: B batch, C channels, H,W input size, OH,OW output size, K = C*kh*kw.

Each op takes its backend from its input: NumPy arrays run the NumPy code below, CuPy arrays run
the CUDA kernel named in the op's ``*_kernel`` function (``kernels/<file>.cu``), which computes the
same values in the same layout (outputs C-contiguous; max-pool argmax as int32 there).

Spatial positions are visited through strided window views (``sliding_window_view``), so there
are Python loops over kernel offsets (kh*kw of them) but never over pixels. Arrays are NCHW by
shape; the arrays these ops create are channels-last in memory (NCHW views of NHWC buffers),
because channels-last keeps the C values of a pixel together for im2col and the strided adds.
Large elementwise work is split over the batch between threads (NumPy releases the GIL inside its
loops, so each slice runs on its own core); matrix products are left whole to BLAS's own threads.
"""
import contextlib
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import cuda
from .backend import get_array_module


_THREADS = min(os.cpu_count() or 1, 8)
_PARALLEL_MIN = 1 << 19      # elements; below this, handing work to threads costs more than it saves
_pool = None


def over_batch(work, batch, size):
    """Call ``work(lo, hi)`` on slices [lo, hi) that together cover the batch [0, ``batch``).

    When the work touches at least ``_PARALLEL_MIN`` elements (``size``), the slices run at once
    on a small thread pool, one per core; otherwise ``work(0, batch)`` runs here.
    """
    global _pool
    n = min(_THREADS, batch) if size >= _PARALLEL_MIN else 1
    if n <= 1:
        work(0, batch)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="minicnn")
    bounds = [batch * t // n for t in range(n + 1)]
    for f in [_pool.submit(work, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        f.result()


def out_size(size, k, stride, pad):
    """Output length of a window of ``k`` sliding with ``stride`` over ``size + 2*pad`` (floor)."""
    return (size + 2 * pad - k) // stride + 1


def _pad(x, pad, value):
    """x (B,C,H,W) -> (B,C,H+2ph,W+2pw) filled with ``value`` around; keeps x's memory order."""
    ph, pw = pad
    if ph == 0 and pw == 0:
        return x
    B, C, H, W = x.shape
    out = np.full_like(x, value, shape=(B, C, H + 2 * ph, W + 2 * pw))
    out[:, :, ph:ph + H, pw:pw + W] = x
    return out


def _windows(xpad, kh, kw, stride):
    """Strided view (B,C,OH,OW,kh,kw) of every window of a padded input; no copy."""
    sh, sw = stride
    return sliding_window_view(xpad, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


def _channels_last_zeros(B, C, H, W, dtype):
    """Zeros of shape (B,C,H,W) laid out in memory as (B,H,W,C)."""
    return np.zeros((B, H, W, C), dtype=dtype).transpose(0, 3, 1, 2)


def _used_windows(x_shape, kh, kw, stride, pad, used):
    """(OH, OW): the output size, or ``used`` where given, the leading part of it that a
    convolution computes when the layer after it reads no further (``Conv2d.forward``)."""
    full = out_size(x_shape[2], kh, stride[0], pad[0]), out_size(x_shape[3], kw, stride[1], pad[1])
    if used is None:
        return full
    if not (0 < used[0] <= full[0] and 0 < used[1] <= full[1]):
        raise ValueError(f"used windows {tuple(used)} must lie within the output size {full}")
    return tuple(used)


def _add_windows(piece, x_shape, kh, kw, stride, pad, dtype, threads=True, used=None):
    """The adjoint of cutting windows: add ``piece(i, j, lo, hi)`` (hi-lo,C,OH,OW), the values
    that kernel offset (i, j) of the windows of samples lo..hi-1 took, back onto the input
    pixels they came from.

    Overlapping windows add up at the pixels they share; padding is cut off. -> (B,C,H,W).
    This is the one backward of col2im, average pooling and max pooling. With ``threads``
    the batch is split over threads (``over_batch``); a ``piece`` that runs a matrix product
    passes False, as BLAS threads itself. ``used`` (OH, OW): only the leading windows (see
    ``_used_windows``); pixels no window reaches get 0.
    """
    B, C, H, W = x_shape
    (sh, sw), (ph, pw) = stride, pad
    OH, OW = _used_windows(x_shape, kh, kw, stride, pad, used)
    Hp, Wp = H + 2 * ph, W + 2 * pw
    overlap = sh < kh or sw < kw
    # Windows that tile the input exactly write every pixel once: no zeros needed underneath.
    tiles = (sh, sw) == (kh, kw) and (Hp, Wp) == (sh * OH, sw * OW)
    dxp = np.empty((B, Hp, Wp, C), dtype).transpose(0, 3, 1, 2) if tiles else \
        _channels_last_zeros(B, C, Hp, Wp, dtype)

    def add(lo, hi):
        for i in range(kh):
            for j in range(kw):
                dst = dxp[lo:hi, :, i:i + sh * (OH - 1) + 1:sh, j:j + sw * (OW - 1) + 1:sw]
                if overlap:
                    dst += piece(i, j, lo, hi)
                else:
                    dst[...] = piece(i, j, lo, hi)     # one window per pixel: nothing to add to
    if threads:
        over_batch(add, B, dxp.size)
    else:
        add(0, B)
    return dxp[:, :, ph:ph + H, pw:pw + W]


_products_by_kernel = 0     # depth of the products_by_kernel() blocks being run


def matmul(a, b):
    """The matrix product of the layers: a (..., M, K) @ b (..., K, N) -> (..., M, N).

    NumPy arrays: ``np.matmul(a, b)``, the reference. CuPy arrays: ``a @ b`` (cuBLAS), or, inside
    ``products_by_kernel()``, ``matmul_kernel(a, b)`` (kernels/gemm.cu), which takes the shapes
    listed there.
    """
    if get_array_module(a) is np:
        return np.matmul(a, b)
    if _products_by_kernel:
        return matmul_kernel(a, b)
    return a @ b


@contextlib.contextmanager
def products_by_kernel():
    """Within this block, ``matmul`` of CuPy arrays runs minicnn's GEMM kernel, not cuBLAS.

    The CUDA-graph training step (minicnn/graph.py) runs inside it: CuPy refuses every cuBLAS
    call while a stream is being captured, and the kernel is an ordinary launch. Blocks nest.
    """
    global _products_by_kernel
    _products_by_kernel += 1
    try:
        yield
    finally:
        _products_by_kernel -= 1


def im2col(x, kh, kw, stride=(1, 1), pad=(0, 0), used=None, blocks=None):
    """Unfold every (kh, kw) window of x into one row.

    x (B,C,H,W) -> cols (B*OH*OW, kh*kw*C); rows ordered (b, oh, ow), columns (i, j, c), so a
    convolution is ``cols @ weight.transpose(0, 2, 3, 1).reshape(O, -1).T``. Zero padding.
    Columns run over channels fastest because then each row is kh runs of kw*C neighbours in a
    channels-last input: the copy reads memory in order. ``used`` (OH', OW'): only the windows
    of the first OH' output rows and OW' columns.

    ``blocks`` (th, tw), dividing (OH, OW): rows ordered (p, q, b, oh2, ow2) for output pixel
    (oh2*th + p, ow2*tw + q) instead, so that the convolution's output holds, for each offset
    (p, q) of a th x tw pooling window that tiles it, one block of B*OH/th*OW/tw contiguous rows
    (``maxpool_blocks``).

    On the CPU the memory layout follows x's, so that the copy reads x in order: a channels-last
    x (every layer's output) gives C-ordered rows; a C-contiguous NCHW x (the data, at the first
    layer) gives the transposed layout, each column one window-strided plane of x, and ``cols``
    is the (B*OH*OW, K) view of that (K, B*OH*OW) array (6x faster for one channel).
    """
    if get_array_module(x) is not np:
        return im2col_kernel(x, kh, kw, stride, pad, used, blocks)
    B, C = x.shape[:2]
    OH, OW = _used_windows(x.shape, kh, kw, stride, pad, used)
    th, tw = _blocks(OH, OW, blocks)
    win = _windows(_pad(x, pad, 0), kh, kw, stride)[:, :, :OH, :OW]             # B,C,OH,OW,kh,kw
    win = win.reshape(B, C, OH // th, th, OW // tw, tw, kh, kw)
    if x.flags.c_contiguous:
        win = win.transpose(6, 7, 1, 3, 5, 0, 2, 4)                     # kh,kw,C,th,tw,B,OH2,OW2
        cols = np.empty(win.shape, dtype=x.dtype)
        over_batch(lambda lo, hi: np.copyto(cols[..., lo:hi, :, :], win[..., lo:hi, :, :]), B,
                   cols.size)
        return cols.reshape(kh * kw * C, B * OH * OW).T
    win = win.transpose(3, 5, 0, 2, 4, 6, 7, 1)                         # th,tw,B,OH2,OW2,kh,kw,C
    cols = np.empty(win.shape, dtype=x.dtype)
    over_batch(lambda lo, hi: np.copyto(cols[:, :, lo:hi], win[:, :, lo:hi]), B, cols.size)
    return cols.reshape(B * OH * OW, kh * kw * C)


def _blocks(OH, OW, blocks):
    """(th, tw) of ``im2col``'s row blocks, (1, 1) for none; they must tile (OH, OW)."""
    th, tw = blocks or (1, 1)
    if OH % th or OW % tw:
        raise ValueError(f"blocks {(th, tw)} must divide the output size {(OH, OW)}")
    return th, tw


def col2im(cols, x_shape, kh, kw, stride=(1, 1), pad=(0, 0), used=None):
    """Adjoint of ``im2col``: cols (B*OH*OW, kh*kw*C) -> (B,C,H,W), overlapping windows add."""
    if get_array_module(cols) is not np:
        return col2im_kernel(cols, x_shape, kh, kw, stride, pad, used)
    B, C = x_shape[:2]
    OH, OW = _used_windows(x_shape, kh, kw, stride, pad, used)
    cols6 = cols.reshape(B, OH, OW, kh, kw, C).transpose(0, 5, 1, 2, 3, 4)   # B,C,OH,OW,kh,kw
    return _add_windows(lambda i, j, lo, hi: cols6[lo:hi, ..., i, j], x_shape, kh, kw, stride, pad,
                        cols.dtype, used=used)


def col2im_matmul(dy2, w, x_shape, kh, kw, stride=(1, 1), pad=(0, 0), used=None):
    """``col2im(dy2 @ w, ...)``, a convolution's input gradient, without the (B*OH*OW, K) product.

    dy2 (B*OH*OW, O), w (O, kh*kw*C) -> dx (B,C,H,W). On the CPU each kernel offset takes its C
    columns of the product, (B*OH*OW, C), and adds them onto the input at once: per offset one
    matrix product and one strided add whose rows are OW*C long. On the GPU: one product, then the
    col2im gather kernel.
    """
    if get_array_module(dy2) is not np:
        return col2im_kernel(matmul(dy2, w), x_shape, kh, kw, stride, pad, used)
    B, C = x_shape[:2]
    OH, OW = _used_windows(x_shape, kh, kw, stride, pad, used)
    part = np.empty((B, OH, OW, C), dtype=dy2.dtype)

    def piece(i, j, lo, hi):                       # always the whole batch: threads=False below
        k = (i * kw + j) * C
        np.matmul(dy2, w[:, k:k + C], out=part.reshape(-1, C))
        return part.transpose(0, 3, 1, 2)
    return _add_windows(piece, x_shape, kh, kw, stride, pad, dy2.dtype, threads=False, used=used)


def add_bias(y, bias):
    """y (N, C) += bias (C,) on every row, in place; y C-contiguous. Returns y.

    A convolution's output has millions of rows of C channels, and NumPy's broadcast add would
    loop over them one short row at a time: adding a tiled bias over rows of r*C values instead
    (r a power of two that divides N, up to 256) costs several times less.
    """
    if get_array_module(y) is not np:
        y += bias
        return y
    r = math.gcd(y.shape[0], 256)
    rows = y.reshape(-1, r * bias.size)
    np.add(rows, np.tile(bias, r), out=rows)
    return y


def relu(x):
    """max(x, 0) and the mask x > 0 that its backward needs; any shape, the batch first."""
    xp = get_array_module(x)
    if xp is not np:
        y = xp.maximum(x, 0)
        return y, y > 0
    y, mask = np.empty_like(x), np.empty_like(x, dtype=bool)

    def run(lo, hi):
        np.maximum(x[lo:hi], 0, out=y[lo:hi])
        np.greater(y[lo:hi], 0, out=mask[lo:hi])
    over_batch(run, x.shape[0], x.size)
    return y, mask


def relu_backward(dy, mask):
    """dy where the input was positive, else 0: dy * mask."""
    xp = get_array_module(dy)
    if xp is not np:
        return dy * mask
    dx = np.empty_like(mask, dtype=dy.dtype)
    over_batch(lambda lo, hi: np.multiply(dy[lo:hi], mask[lo:hi], out=dx[lo:hi]), dy.shape[0], dy.size)
    return dx


def maxpool2d(x, kh, kw, stride, pad, relu=False):
    """Max over each window; padding is -inf so it never wins; the first maximum wins ties.

    x (B,C,H,W) -> y (B,C,OH,OW) and argmax (B,C,OH,OW), the offset i*kw + j of the winner inside
    its window, in the smallest signed type that holds kh*kw (int8 for kernels up to 11x11).
    A running maximum over the kh*kw offsets (``_running_max``): no window is ever copied.

    ``relu=True`` gives relu(max(window)) = max(0, window) by starting the running maximum at 0
    instead of at the first offset: a ReLU after the pool for free. Where no value beats 0 the
    argmax is -1, and backward sends nothing, as the ReLU's backward would.
    """
    if get_array_module(x) is not np:
        return maxpool2d_kernel(x, kh, kw, stride, pad, relu)
    win = _windows(_pad(x, pad, -np.inf), kh, kw, stride)
    return _running_max(lambda k: win[..., k // kw, k % kw], kh * kw, relu)


def _running_max(offset, K, relu):
    """Max over ``offset(k)``, k < K, arrays of one shape whose first axis is the batch; the
    first maximum wins ties, a NaN propagates into the maximum. -> (max, argmax k).

    Offsets are visited in ascending order and a later one wins only when strictly greater.
    ``relu``: the maximum starts at 0, held by no offset (argmax -1).
    """
    first = offset(0)
    index_type = np.result_type(np.int8, np.min_scalar_type(K))
    y = np.zeros_like(first) if relu else np.copy(first, order="K")
    # The running argmax holds winner + 1, 0 for none yet: offsets only grow, so a maximum with
    # (k + 1) where offset k wins puts it exactly there (far cheaper than a masked copy).
    argmax = np.full_like(y, 0 if relu else 1, dtype=index_type)
    better = np.empty_like(y, dtype=bool)
    step = np.empty_like(argmax)

    def run(lo, hi):
        ys, am, bt, st = y[lo:hi], argmax[lo:hi], better[lo:hi], step[lo:hi]
        for k in range(0 if relu else 1, K):
            v = offset(k)[lo:hi]
            np.greater(v, ys, out=bt)             # strictly greater: an equal later value loses
            np.maximum(ys, v, out=ys)             # NaN propagates into y
            np.multiply(bt, index_type.type(k + 1), out=st)
            np.maximum(am, st, out=am)
        am -= 1
    over_batch(run, first.shape[0], first.size * K)
    return y, argmax


def maxpool_blocks(x, relu=False):
    """Max pooling of windows laid out as blocks: x (K, M, ...), x[k] the k-th value of every
    window -> y, argmax (M, ...), as ``maxpool2d`` (first maximum wins, NaN propagates, ``relu``
    starts at 0 with argmax -1; argmax int8 on the CPU, int32 on a GPU).

    A convolution whose rows ``im2col(..., blocks=)`` ordered window by window hands its output
    to a tiling max pool this way: every operand is contiguous, where ``maxpool2d`` would read
    strided windows.
    """
    if get_array_module(x) is not np:
        return maxpool_blocks_kernel(x, relu)
    return _running_max(lambda k: x[k], x.shape[0], relu)


def maxpool_blocks_backward(dy, argmax, K):
    """Backward of ``maxpool_blocks``: dy, argmax (M, ...) -> dx (K, M, ...), dx[k] = dy where
    offset k won, else 0."""
    if get_array_module(dy) is not np:
        return maxpool_blocks_backward_kernel(dy, argmax, K)
    dx = np.empty((K,) + dy.shape, dtype=dy.dtype)

    def run(lo, hi):
        for k in range(K):
            np.multiply(dy[lo:hi], argmax[lo:hi] == k, out=dx[k, lo:hi])
    over_batch(run, dy.shape[0], dx.size)
    return dx


def maxpool2d_backward(dy, argmax, x_shape, kh, kw, stride, pad):
    """Route each dy (B,C,OH,OW) to the input pixel that won its window -> dx (B,C,H,W)."""
    if get_array_module(dy) is not np:
        return maxpool2d_backward_kernel(dy, argmax, x_shape, kh, kw, stride, pad)
    like_argmax = np.empty_like(argmax, dtype=dy.dtype)
    if like_argmax.strides != dy.strides:
        # Elementwise work over arrays of different memory orders crawls: match argmax's first.
        like_argmax[...] = dy
        dy = like_argmax
    return _add_windows(lambda i, j, lo, hi: dy[lo:hi] * (argmax[lo:hi] == i * kw + j), x_shape,
                        kh, kw, stride, pad, dy.dtype)


def avgpool2d(x, kh, kw, stride, pad):
    """Mean over each window of the zero-padded input, padding counted (count_include_pad=True).

    x (B,C,H,W) -> y (B,C,OH,OW).
    """
    if get_array_module(x) is not np:
        return avgpool2d_kernel(x, kh, kw, stride, pad)
    win = _windows(_pad(x, pad, 0), kh, kw, stride)
    return win.mean(axis=(4, 5), dtype=x.dtype)


def avgpool2d_backward(dy, x_shape, kh, kw, stride, pad):
    """Spread each dy (B,C,OH,OW) evenly over its window -> dx (B,C,H,W)."""
    if get_array_module(dy) is not np:
        return avgpool2d_backward_kernel(dy, x_shape, kh, kw, stride, pad)
    share = dy / (kh * kw)
    return _add_windows(lambda i, j, lo, hi: share[lo:hi], x_shape, kh, kw, stride, pad, dy.dtype)


# --- CUDA paths ----------------------------------------------------------------------------------
# Each allocates its output on the input's device and launches one thread per output element of
# the kernel named; ``launch`` is minicnn.cuda.launch on a GPU (the emulator's in the tests).

def _geometry(x_shape, kh, kw, stride, pad, used=None):
    """The int arguments every window kernel takes: B, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW."""
    OH, OW = _used_windows(x_shape, kh, kw, stride, pad, used)
    return (*x_shape, kh, kw, stride[0], stride[1], pad[0], pad[1], OH, OW)


GEMM_TILE = 16      # kernels/gemm.cu: one block of GEMM_TILE**2 threads per tile of C


def _gemm_operand(x):
    """(memory, trans) for one operand of kernels/gemm.cu: x itself when C-contiguous; when x
    is a transposed view of C-contiguous memory (``w.T``, the usual weight operand), that memory
    with trans=1, read in place; otherwise a C-contiguous copy."""
    if x.flags.c_contiguous:
        return x, 0
    swapped = x.swapaxes(-1, -2)
    if swapped.flags.c_contiguous:
        return swapped, 1
    return get_array_module(x).ascontiguousarray(x), 0


def matmul_kernel(a, b, launch=None):
    """``np.matmul(a, b)`` by kernels/gemm.cu -> C-contiguous (..., M, N), a's dtype.

    Shapes: (M, K) @ (K, N); (..., M, K) @ (K, N) and (M, K) @ (..., K, N), the 2-D operand
    shared by every product of the batch; (..., M, K) @ (..., K, N) with equal batch dimensions.
    Both float32 or both float64. Each element of C is summed by one thread over k in
    increasing order: the same bits on every run.
    """
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2] or (
            a.ndim > 2 and b.ndim > 2 and a.shape[:-2] != b.shape[:-2]):
        raise ValueError(f"matmul: cannot multiply arrays of shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}: expected (..., M, K) and (..., K, N), the batch "
                         "dimensions equal or one operand 2-D")
    if a.dtype != b.dtype:
        raise TypeError(f"matmul: both operands must have one dtype, got {a.dtype} and {b.dtype}")
    (M, K), N = a.shape[-2:], b.shape[-1]
    batch_shape = a.shape[:-2] if a.ndim > 2 else b.shape[:-2]
    batch = math.prod(batch_shape)
    c = get_array_module(a).empty(batch_shape + (M, N), dtype=a.dtype)
    if c.size == 0:
        return c
    (a_mem, trans_a), (b_mem, trans_b) = _gemm_operand(a), _gemm_operand(b)
    tiles = batch * -(-M // GEMM_TILE) * -(-N // GEMM_TILE)
    # stride 0: a 2-D operand is the same matrix for every product of the batch
    (launch or cuda.launch)("gemm.cu", "gemm", tiles * cuda.THREADS_PER_BLOCK, a_mem, b_mem, c,
                            batch, M, N, K, M * K if a.ndim > 2 else 0,
                            K * N if b.ndim > 2 else 0, M * N, trans_a, trans_b)
    return c


def im2col_kernel(x, kh, kw, stride=(1, 1), pad=(0, 0), used=None, blocks=None, launch=None):
    """im2col by kernels/im2col.cu: x (B,C,H,W) -> cols (B*OH*OW, kh*kw*C)."""
    xp = get_array_module(x)
    g = _geometry(x.shape, kh, kw, stride, pad, used)
    B, C, OH, OW = g[0], g[1], g[10], g[11]
    cols = xp.empty((B * OH * OW, kh * kw * C), dtype=x.dtype)
    (launch or cuda.launch)("im2col.cu", "im2col", cols.size, x, cols, *g,
                            *_blocks(OH, OW, blocks))
    return cols


def col2im_kernel(cols, x_shape, kh, kw, stride=(1, 1), pad=(0, 0), used=None, launch=None):
    """col2im by kernels/im2col.cu, a gather: one thread per input pixel -> (B,C,H,W)."""
    x = get_array_module(cols).empty(x_shape, dtype=cols.dtype)
    (launch or cuda.launch)("im2col.cu", "col2im", x.size, cols, x,
                            *_geometry(x_shape, kh, kw, stride, pad, used))
    return x


def _in_place(x):
    """(an array the launcher takes without copying that holds x's memory, x's element strides
    (b, c, h, w)): x itself when C-contiguous, its NHWC view when x is a channels-last NCHW view
    (a convolution's output), else a C-contiguous copy."""
    if not x.flags.c_contiguous and not x.transpose(0, 2, 3, 1).flags.c_contiguous:
        x = get_array_module(x).ascontiguousarray(x)
    memory = x if x.flags.c_contiguous else x.transpose(0, 2, 3, 1)
    return memory, tuple(s // x.itemsize for s in x.strides)


def maxpool2d_kernel(x, kh, kw, stride, pad, relu=False, launch=None):
    """Max pooling by kernels/pool.cu: x (B,C,H,W) -> y, argmax (B,C,OH,OW), argmax int32.
    x may be channels-last (read in place)."""
    xp = get_array_module(x)
    g = _geometry(x.shape, kh, kw, stride, pad)
    shape = x.shape[:2] + g[10:]
    y, argmax = xp.empty(shape, dtype=x.dtype), xp.empty(shape, dtype=np.int32)
    memory, strides = _in_place(x)
    (launch or cuda.launch)("pool.cu", "maxpool2d_forward", y.size, memory, y, argmax, *g,
                            int(relu), *strides)
    return y, argmax


def maxpool_blocks_kernel(x, relu=False, launch=None):
    """``maxpool_blocks`` by kernels/pool.cu: x (K, M, ...) -> y, argmax (M, ...), argmax int32."""
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    y, argmax = xp.empty(x.shape[1:], dtype=x.dtype), xp.empty(x.shape[1:], dtype=np.int32)
    (launch or cuda.launch)("pool.cu", "maxpool_blocks_forward", y.size, x, y, argmax, y.size,
                            x.shape[0], int(relu))
    return y, argmax


def maxpool_blocks_backward_kernel(dy, argmax, K, launch=None):
    """``maxpool_blocks_backward`` by kernels/pool.cu: one thread per element of dx (K, M, ...)."""
    xp = get_array_module(dy)
    dx = xp.empty((K,) + dy.shape, dtype=dy.dtype)
    (launch or cuda.launch)("pool.cu", "maxpool_blocks_backward", dx.size, dy,
                            argmax.astype(np.int32, copy=False), dx, dy.size, K)
    return dx


def maxpool2d_backward_kernel(dy, argmax, x_shape, kh, kw, stride, pad, launch=None):
    """Max-pool backward by kernels/pool.cu, a gather: one thread per input pixel -> dx."""
    xp = get_array_module(dy)
    dx = xp.empty(x_shape, dtype=dy.dtype)
    (launch or cuda.launch)("pool.cu", "maxpool2d_backward", dx.size, dy,
                            argmax.astype(np.int32, copy=False), dx,
                            *_geometry(x_shape, kh, kw, stride, pad))
    return dx


def avgpool2d_kernel(x, kh, kw, stride, pad, launch=None):
    """Average pooling by kernels/pool.cu: x (B,C,H,W) -> y (B,C,OH,OW); x may be channels-last."""
    g = _geometry(x.shape, kh, kw, stride, pad)
    y = get_array_module(x).empty(x.shape[:2] + g[10:], dtype=x.dtype)
    memory, strides = _in_place(x)
    (launch or cuda.launch)("pool.cu", "avgpool2d_forward", y.size, memory, y, *g, *strides)
    return y


def avgpool2d_backward_kernel(dy, x_shape, kh, kw, stride, pad, launch=None):
    """Average-pool backward by kernels/pool.cu, a gather: one thread per input pixel -> dx."""
    dx = get_array_module(dy).empty(x_shape, dtype=dy.dtype)
    (launch or cuda.launch)("pool.cu", "avgpool2d_backward", dx.size, dy, dx,
                            *_geometry(x_shape, kh, kw, stride, pad))
    return dx
