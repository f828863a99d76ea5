"""Array operations behind the layers: matrix products, im2col/col2im, max and average pooling.

One function per operation, with the same semantics and layout on every backend, so layers never
branch on the backend. The NumPy code here is also the reference the CUDA kernels are checked
against. Shapes: B batch, C channels, H,W input size, OH,OW output size, K = C*kh*kw.

Each op takes its backend from its input: NumPy arrays run the NumPy code below, CuPy arrays run
the CUDA kernel named in the op's ``*_kernel`` function (``kernels/<file>.cu``), which computes the
same values in the same layout (outputs C-contiguous; max-pool argmax int32 on both).

These are the textbook versions. Spatial positions are visited through strided window views
(``sliding_window_view``): Python loops run over kernel offsets (kh*kw of them), never over
pixels; col2im is the adjoint of im2col, and the backward of both poolings has its shape. The
variants that make a training step fast (rows in window order, only the windows a pool reads, a
ReLU folded into the pool, work split between threads) are in ``minicnn/fused/windows.py``.
"""
import contextlib
import math
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import cuda
from .backend import get_array_module


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


def _offset_slice(i, j, stride, OH, OW):
    """The index of the padded input's pixels that kernel offset (i, j) of OH x OW windows covers:
    ``xpad[_offset_slice(...)]`` is (B, C, OH, OW), one pixel per window."""
    sh, sw = stride
    return (slice(None), slice(None), slice(i, i + sh * (OH - 1) + 1, sh),
            slice(j, j + sw * (OW - 1) + 1, sw))


def _add_windows(piece, x_shape, kh, kw, stride, pad, dtype):
    """The adjoint of cutting windows: add ``piece(i, j)`` (B,C,OH,OW), the values that kernel
    offset (i, j) of every window took, back onto the input pixels they came from.

    Overlapping windows add up at the pixels they share; padding is cut off. -> (B,C,H,W).
    The one backward of col2im, max pooling and average pooling.
    """
    B, C, H, W = x_shape
    (ph, pw) = pad
    OH, OW = out_size(H, kh, stride[0], ph), out_size(W, kw, stride[1], pw)
    dxp = np.zeros((B, C, H + 2 * ph, W + 2 * pw), dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[_offset_slice(i, j, stride, OH, OW)] += piece(i, j)
    return dxp[:, :, ph:ph + H, pw:pw + W]


_kernel_products = []      # the function of each products_by_kernel() block run, innermost last


def matmul(a, b):
    """The matrix product of the layers: a (..., M, K) @ b (..., K, N) -> (..., M, N).

    NumPy arrays: ``np.matmul(a, b)``, the reference. CuPy arrays: ``a @ b`` (cuBLAS), or, inside
    ``products_by_kernel()``, the GEMM kernel that block names: ``matmul_kernel(a, b)``
    (kernels/gemm.cu) unless it names another; both take the shapes listed there.
    """
    if get_array_module(a) is np:
        return np.matmul(a, b)
    if _kernel_products:
        return (_kernel_products[-1] or matmul_kernel)(a, b)
    return a @ b


@contextlib.contextmanager
def products_by_kernel(matmul=None):
    """Within this block, ``matmul`` of CuPy arrays runs a GEMM kernel of minicnn, not cuBLAS.

    ``matmul(a, b)`` is the function that runs the products: the fast tier passes its own
    (``minicnn.fused.gemm.matmul_tiled``); None keeps the enclosing block's, or, outside any,
    ``matmul_kernel`` (kernels/gemm.cu). The CUDA-graph training step (minicnn/fused/graph.py)
    runs inside such a block: CuPy refuses every cuBLAS call while a stream is being captured,
    and a kernel is an ordinary launch. Blocks nest; the innermost one's function is used.
    """
    if matmul is None and _kernel_products:
        matmul = _kernel_products[-1]
    _kernel_products.append(matmul)
    try:
        yield
    finally:
        _kernel_products.pop()


def im2col(x, kh, kw, stride=(1, 1), pad=(0, 0)):
    """Unfold every (kh, kw) window of x into one row.

    x (B,C,H,W) -> cols (B*OH*OW, kh*kw*C); rows ordered (b, oh, ow), columns (i, j, c), so a
    convolution is ``cols @ weight.transpose(0, 2, 3, 1).reshape(O, -1).T``. Zero padding.
    """
    if get_array_module(x) is not np:
        return im2col_kernel(x, kh, kw, stride, pad)
    B, C = x.shape[:2]
    win = _windows(_pad(x, pad, 0), kh, kw, stride)             # B,C,OH,OW,kh,kw: a view
    OH, OW = win.shape[2:4]
    return win.transpose(0, 2, 3, 4, 5, 1).reshape(B * OH * OW, kh * kw * C)     # the copy


def col2im(cols, x_shape, kh, kw, stride=(1, 1), pad=(0, 0)):
    """Adjoint of ``im2col``: cols (B*OH*OW, kh*kw*C) -> (B,C,H,W); overlapping windows add."""
    if get_array_module(cols) is not np:
        return col2im_kernel(cols, x_shape, kh, kw, stride, pad)
    B, C, H, W = x_shape
    OH, OW = out_size(H, kh, stride[0], pad[0]), out_size(W, kw, stride[1], pad[1])
    cols6 = cols.reshape(B, OH, OW, kh, kw, C).transpose(0, 5, 1, 2, 3, 4)   # B,C,OH,OW,kh,kw
    return _add_windows(lambda i, j: cols6[..., i, j], x_shape, kh, kw, stride, pad, cols.dtype)


def relu(x):
    """max(x, 0) and the mask x > 0 that its backward needs; any shape."""
    y = get_array_module(x).maximum(x, 0)
    return y, y > 0


def relu_backward(dy, mask):
    """dy where the input was positive, else 0: dy * mask."""
    return dy * mask


def maxpool2d(x, kh, kw, stride, pad):
    """Max over each window; padding is -inf so it never wins; the first maximum wins ties.

    x (B,C,H,W) -> y (B,C,OH,OW) and argmax (B,C,OH,OW) int32, the offset i*kw + j of the winner
    inside its window. A running maximum over the kh*kw offsets of a strided view: offsets in
    ascending order, a later one winning only when strictly greater; a NaN propagates into y.
    """
    if get_array_module(x) is not np:
        return maxpool2d_kernel(x, kh, kw, stride, pad)
    win = _windows(_pad(x, pad, -np.inf), kh, kw, stride)        # B,C,OH,OW,kh,kw
    y = win[..., 0, 0].copy()
    argmax = np.zeros(y.shape, dtype=np.int32)
    for k in range(1, kh * kw):
        v = win[..., k // kw, k % kw]
        argmax[v > y] = k                     # strictly greater: an equal later value loses
        y = np.maximum(y, v)                  # NaN propagates
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape, kh, kw, stride, pad):
    """Route each dy (B,C,OH,OW) to the input pixel that won its window -> dx (B,C,H,W)."""
    if get_array_module(dy) is not np:
        return maxpool2d_backward_kernel(dy, argmax, x_shape, kh, kw, stride, pad)
    return _add_windows(lambda i, j: dy * (argmax == i * kw + j), x_shape, kh, kw, stride, pad,
                        dy.dtype)


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
    return _add_windows(lambda i, j: share, x_shape, kh, kw, stride, pad, dy.dtype)


# --- CUDA paths ----------------------------------------------------------------------------------
# Each allocates its output on the input's device and launches one thread per output element of
# the kernel named; ``launch`` is minicnn.cuda.launch on a GPU (the emulator's in the tests). The
# window kernels also serve the fast path (minicnn/fused/windows.py), which passes them more:
# only the leading windows, rows in window order, a ReLU folded into the max pool. Here those
# arguments are the ones that change nothing: every window, rows in (b, oh, ow) order, no ReLU.

def _geometry(x_shape, kh, kw, stride, pad):
    """The int arguments every window kernel takes: B, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW."""
    OH = out_size(x_shape[2], kh, stride[0], pad[0])
    OW = out_size(x_shape[3], kw, stride[1], pad[1])
    return (*x_shape, kh, kw, stride[0], stride[1], pad[0], pad[1], OH, OW)


GEMM_TILE = 16      # kernels/gemm.cu: one block of GEMM_TILE**2 threads per tile of C


def _gemm_operand(x):
    """(memory, trans) for one operand of the GEMM kernels: x itself when C-contiguous; when x
    is a transposed view of C-contiguous memory (``w.T``, the usual weight operand), that memory
    with trans=1, read in place; otherwise a C-contiguous copy."""
    if x.flags.c_contiguous:
        return x, 0
    swapped = x.swapaxes(-1, -2)
    if swapped.flags.c_contiguous:
        return swapped, 1
    return get_array_module(x).ascontiguousarray(x), 0


class _GemmLayout(NamedTuple):
    """np.matmul(a, b) as the GEMM kernels (kernels/gemm.cu, kernels/gemm_tiled.cu) take it."""
    shape: tuple            # C's: batch dimensions + (M, N)
    batch: int
    M: int
    N: int
    K: int
    a: object               # the memory of each operand (``_gemm_operand``) ...
    b: object
    stride_a: int           # ... its elements between products: 0 for a shared 2-D operand
    stride_b: int
    trans_a: int
    trans_b: int


def _gemm_layout(a, b):
    """Check that the GEMM kernels take ``a @ b`` (raising what ``matmul_kernel`` documents)
    and lay it out for them: a ``_GemmLayout``."""
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2] or (
            a.ndim > 2 and b.ndim > 2 and a.shape[:-2] != b.shape[:-2]):
        raise ValueError(f"matmul: cannot multiply arrays of shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}: expected (..., M, K) and (..., K, N), the batch "
                         "dimensions equal or one operand 2-D")
    if a.dtype != b.dtype:
        raise TypeError(f"matmul: both operands must have one dtype, got {a.dtype} and {b.dtype}")
    (M, K), N = a.shape[-2:], b.shape[-1]
    batch_shape = a.shape[:-2] if a.ndim > 2 else b.shape[:-2]
    (a_mem, trans_a), (b_mem, trans_b) = _gemm_operand(a), _gemm_operand(b)
    # stride 0: a 2-D operand is the same matrix for every product of the batch
    return _GemmLayout(batch_shape + (M, N), math.prod(batch_shape), M, N, K, a_mem, b_mem,
                       M * K if a.ndim > 2 else 0, K * N if b.ndim > 2 else 0, trans_a, trans_b)


def matmul_kernel(a, b, launch=None):
    """``np.matmul(a, b)`` by kernels/gemm.cu -> C-contiguous (..., M, N), a's dtype.

    Shapes: (M, K) @ (K, N); (..., M, K) @ (K, N) and (M, K) @ (..., K, N), the 2-D operand
    shared by every product of the batch; (..., M, K) @ (..., K, N) with equal batch dimensions.
    Both float32 or both float64. Each element of C is summed by one thread over k in
    increasing order: the same bits on every run.
    """
    g = _gemm_layout(a, b)
    c = get_array_module(a).empty(g.shape, dtype=a.dtype)
    if c.size == 0:
        return c
    tiles = g.batch * -(-g.M // GEMM_TILE) * -(-g.N // GEMM_TILE)
    (launch or cuda.launch)("gemm.cu", "gemm", tiles * cuda.THREADS_PER_BLOCK, g.a, g.b, c,
                            g.batch, g.M, g.N, g.K, g.stride_a, g.stride_b, g.M * g.N,
                            g.trans_a, g.trans_b)
    return c


def im2col_kernel(x, kh, kw, stride=(1, 1), pad=(0, 0), launch=None):
    """im2col by kernels/im2col.cu: x (B,C,H,W) -> cols (B*OH*OW, kh*kw*C)."""
    g = _geometry(x.shape, kh, kw, stride, pad)
    B, C, OH, OW = g[0], g[1], g[10], g[11]
    cols = get_array_module(x).empty((B * OH * OW, kh * kw * C), dtype=x.dtype)
    (launch or cuda.launch)("im2col.cu", "im2col", cols.size, x, cols, *g, 1, 1)    # th = tw = 1
    return cols


def col2im_kernel(cols, x_shape, kh, kw, stride=(1, 1), pad=(0, 0), launch=None):
    """col2im by kernels/im2col.cu, a gather: one thread per input pixel -> (B,C,H,W)."""
    x = get_array_module(cols).empty(x_shape, dtype=cols.dtype)
    (launch or cuda.launch)("im2col.cu", "col2im", x.size, cols, x,
                            *_geometry(x_shape, kh, kw, stride, pad))
    return x


def _in_place(x):
    """(an array the launcher takes without copying that holds x's memory, x's element strides
    (b, c, h, w)): x itself when C-contiguous, its NHWC view when x is a channels-last NCHW view
    (a convolution's output), else a C-contiguous copy."""
    if not x.flags.c_contiguous and not x.transpose(0, 2, 3, 1).flags.c_contiguous:
        x = get_array_module(x).ascontiguousarray(x)
    memory = x if x.flags.c_contiguous else x.transpose(0, 2, 3, 1)
    return memory, tuple(s // x.itemsize for s in x.strides)


def maxpool2d_kernel(x, kh, kw, stride, pad, launch=None):
    """Max pooling by kernels/pool.cu: x (B,C,H,W) -> y, argmax (B,C,OH,OW), argmax int32.
    x may be channels-last (read in place)."""
    xp = get_array_module(x)
    g = _geometry(x.shape, kh, kw, stride, pad)
    shape = x.shape[:2] + g[10:]
    y, argmax = xp.empty(shape, dtype=x.dtype), xp.empty(shape, dtype=np.int32)
    memory, strides = _in_place(x)
    (launch or cuda.launch)("pool.cu", "maxpool2d_forward", y.size, memory, y, argmax, *g,
                            0, *strides)                                         # relu = 0
    return y, argmax


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
