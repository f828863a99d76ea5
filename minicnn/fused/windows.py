"""The fast variants of the window operations of ``minicnn.ops``, for the fused modules.

Each computes what its plain twin in ``minicnn.ops`` computes (the same values, and the same
layout where the plain op defines one), and adds what a fused module needs or what makes a CPU
step fast:

- ``used=(OH', OW')``: only the leading windows, the ones a pool after the convolution reads;
- ``blocks=(th, tw)``: im2col's rows in window order, so that a tiling max pool after the
  convolution runs over contiguous blocks (``maxpool_blocks``);
- ``relu=True``: a ReLU folded into the max pool (its running maximum starts at 0);
- ``col2im_matmul``: a convolution's input gradient without the (B*OH*OW, K) product;
- on the CPU, copies that read memory in order (arrays made here are channels-last: NCHW views
  of NHWC buffers), and large elementwise work split over the batch between threads (NumPy
  releases the GIL inside its loops, so each slice runs on its own core; matrix products are
  left whole to BLAS's own threads).

The CUDA paths launch the kernels of ``minicnn.ops`` with these arguments (``kernels/im2col.cu``,
``kernels/pool.cu``), and the ``maxpool_blocks`` kernels.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import cuda, ops
from ..backend import get_array_module

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


def used_windows(x_shape, kh, kw, stride, pad, used):
    """(OH, OW): the output size, or ``used`` where given, the leading part of it that a
    convolution computes when the layer after it reads no further (``FusedConv2d``)."""
    full = ops._geometry(x_shape, kh, kw, stride, pad)[10:]
    if used is None:
        return full
    if not (0 < used[0] <= full[0] and 0 < used[1] <= full[1]):
        raise ValueError(f"used windows {tuple(used)} must lie within the output size {full}")
    return tuple(used)


def _add_windows(piece, x_shape, kh, kw, stride, pad, dtype, threads=True, used=None):
    """``ops._add_windows`` for ``piece(i, j, lo, hi)``, the values of samples lo..hi-1 only,
    into a channels-last result, the batch split over threads (``over_batch``) with ``threads``
    (a ``piece`` that runs a matrix product passes False: BLAS threads itself), over the
    ``used`` windows only (pixels no window reaches get 0). -> (B,C,H,W).
    """
    B, C, H, W = x_shape
    (sh, sw), (ph, pw) = stride, pad
    OH, OW = used_windows(x_shape, kh, kw, stride, pad, used)
    Hp, Wp = H + 2 * ph, W + 2 * pw
    overlap = sh < kh or sw < kw
    # Windows that tile the input exactly write every pixel once: no zeros needed underneath.
    tiles = (sh, sw) == (kh, kw) and (Hp, Wp) == (sh * OH, sw * OW)
    dxp = np.empty((B, Hp, Wp, C), dtype) if tiles else np.zeros((B, Hp, Wp, C), dtype)
    dxp = dxp.transpose(0, 3, 1, 2)

    def add(lo, hi):
        for i in range(kh):
            for j in range(kw):
                dst = dxp[lo:hi][ops._offset_slice(i, j, stride, OH, OW)]
                if overlap:
                    dst += piece(i, j, lo, hi)
                else:
                    dst[...] = piece(i, j, lo, hi)     # one window per pixel: nothing to add to
    if threads:
        over_batch(add, B, dxp.size)
    else:
        add(0, B)
    return dxp[:, :, ph:ph + H, pw:pw + W]


def im2col(x, kh, kw, stride=(1, 1), pad=(0, 0), used=None, blocks=None):
    """``ops.im2col`` with the ``used`` windows only and rows optionally in window order.

    x (B,C,H,W) -> cols (B*OH*OW, kh*kw*C), columns (i, j, c). ``blocks`` (th, tw), dividing
    (OH, OW): rows ordered (p, q, b, oh2, ow2) for output pixel (oh2*th + p, ow2*tw + q) instead
    of (b, oh, ow), so that the convolution's output holds, for each offset (p, q) of a th x tw
    pooling window that tiles it, one block of B*OH/th*OW/tw contiguous rows (``maxpool_blocks``).

    On the CPU the memory layout follows x's, so that the copy reads x in order: a channels-last
    x (every layer's output) gives C-ordered rows; a C-contiguous NCHW x (the data, at the first
    layer) gives the transposed layout, each column one window-strided plane of x, and ``cols``
    is the (B*OH*OW, K) view of that (K, B*OH*OW) array.
    """
    if get_array_module(x) is not np:
        return im2col_kernel(x, kh, kw, stride, pad, used, blocks)
    B, C = x.shape[:2]
    OH, OW = used_windows(x.shape, kh, kw, stride, pad, used)
    th, tw = _blocks(OH, OW, blocks)
    win = ops._windows(ops._pad(x, pad, 0), kh, kw, stride)[:, :, :OH, :OW]     # B,C,OH,OW,kh,kw
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
    """``ops.col2im`` of the ``used`` windows' rows: cols (B*OH'*OW', kh*kw*C) -> (B,C,H,W)."""
    if get_array_module(cols) is not np:
        return col2im_kernel(cols, x_shape, kh, kw, stride, pad, used)
    B, C = x_shape[:2]
    OH, OW = used_windows(x_shape, kh, kw, stride, pad, used)
    cols6 = cols.reshape(B, OH, OW, kh, kw, C).transpose(0, 5, 1, 2, 3, 4)   # B,C,OH,OW,kh,kw
    return _add_windows(lambda i, j, lo, hi: cols6[lo:hi, ..., i, j], x_shape, kh, kw, stride, pad,
                        cols.dtype, used=used)


def col2im_matmul(dy2, w, x_shape, kh, kw, stride=(1, 1), pad=(0, 0), used=None,
                  matmul=ops.matmul):
    """``col2im(matmul(dy2, w), ...)``, a convolution's input gradient, without the (B*OH*OW, K)
    product. dy2 (B*OH*OW, O), w (O, kh*kw*C) -> dx (B,C,H,W).

    On the CPU each kernel offset takes its C columns of the product, (B*OH*OW, C), and adds them
    onto the input at once: per offset one matrix product and one strided add whose rows are
    OW*C long. On the GPU: one product by ``matmul`` (a precision policy's, ``amp.policy``), then
    the col2im gather kernel.
    """
    if get_array_module(dy2) is not np:
        return col2im_kernel(matmul(dy2, w), x_shape, kh, kw, stride, pad, used)
    B, C = x_shape[:2]
    OH, OW = used_windows(x_shape, kh, kw, stride, pad, used)
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


def maxpool2d(x, kh, kw, stride, pad, relu=False):
    """``ops.maxpool2d``, with an optional ReLU after it, and argmax in the smallest signed type
    that holds kh*kw on the CPU (int8 for kernels up to 11x11; int32 on a GPU).

    ``relu=True`` gives relu(max(window)) = max(0, window) by starting the running maximum at 0
    instead of at the first offset: a ReLU after the pool for free. Where no value beats 0 the
    argmax is -1, and ``ops.maxpool2d_backward`` sends nothing, as the ReLU's backward would.
    """
    if get_array_module(x) is not np:
        return maxpool2d_kernel(x, kh, kw, stride, pad, relu)
    win = ops._windows(ops._pad(x, pad, -np.inf), kh, kw, stride)
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


# --- CUDA paths: the kernels of minicnn.ops with this module's arguments -------------------------

def _geometry(x_shape, kh, kw, stride, pad, used):
    """``ops._geometry`` with OH, OW the ``used`` windows."""
    return ops._geometry(x_shape, kh, kw, stride, pad)[:10] + used_windows(x_shape, kh, kw,
                                                                          stride, pad, used)


def im2col_kernel(x, kh, kw, stride=(1, 1), pad=(0, 0), used=None, blocks=None, launch=None):
    """``im2col`` by kernels/im2col.cu: x (B,C,H,W) -> cols (B*OH*OW, kh*kw*C)."""
    g = _geometry(x.shape, kh, kw, stride, pad, used)
    B, C, OH, OW = g[0], g[1], g[10], g[11]
    cols = get_array_module(x).empty((B * OH * OW, kh * kw * C), dtype=x.dtype)
    (launch or cuda.launch)("im2col.cu", "im2col", cols.size, x, cols, *g,
                            *_blocks(OH, OW, blocks))
    return cols


def col2im_kernel(cols, x_shape, kh, kw, stride=(1, 1), pad=(0, 0), used=None, launch=None):
    """``col2im`` by kernels/im2col.cu, a gather: one thread per input pixel -> (B,C,H,W)."""
    x = get_array_module(cols).empty(x_shape, dtype=cols.dtype)
    (launch or cuda.launch)("im2col.cu", "col2im", x.size, cols, x,
                            *_geometry(x_shape, kh, kw, stride, pad, used))
    return x


def maxpool2d_kernel(x, kh, kw, stride, pad, relu=False, launch=None):
    """``maxpool2d`` by kernels/pool.cu: x (B,C,H,W) -> y, argmax (B,C,OH,OW), argmax int32.
    x may be channels-last (read in place)."""
    xp = get_array_module(x)
    g = ops._geometry(x.shape, kh, kw, stride, pad)
    shape = x.shape[:2] + g[10:]
    y, argmax = xp.empty(shape, dtype=x.dtype), xp.empty(shape, dtype=np.int32)
    memory, strides = ops._in_place(x)
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
