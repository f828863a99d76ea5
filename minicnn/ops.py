"""Array operations behind the layers: im2col/col2im, max and average pooling.

One function per operation, with the same semantics and layout on every backend, so layers never
branch on the backend. The NumPy code here is also the reference the CUDA kernels are checked
against. Shapes: B batch, C channels, H,W input size, OH,OW output size, K = C*kh*kw.

Spatial positions are visited through strided window views (``sliding_window_view``), so there
are Python loops over kernel offsets (kh*kw of them) but never over pixels. Arrays are NCHW by
shape; the arrays these ops create are channels-last in memory (NCHW views of NHWC buffers),
because channels-last keeps the C values of a pixel together for im2col and the strided adds.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


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


def _add_windows(piece, x_shape, kh, kw, stride, pad, dtype):
    """The adjoint of cutting windows: add ``piece(i, j)`` (B,C,OH,OW), the values that kernel
    offset (i, j) of every window took, back onto the input pixels they came from.

    Overlapping windows add up at the pixels they share; padding is cut off. -> (B,C,H,W).
    This is the one backward of col2im, average pooling and max pooling.
    """
    B, C, H, W = x_shape
    (sh, sw), (ph, pw) = stride, pad
    OH, OW = out_size(H, kh, sh, ph), out_size(W, kw, sw, pw)
    dxp = _channels_last_zeros(B, C, H + 2 * ph, W + 2 * pw, dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + sh * (OH - 1) + 1:sh, j:j + sw * (OW - 1) + 1:sw] += piece(i, j)
    return dxp[:, :, ph:ph + H, pw:pw + W]


def im2col(x, kh, kw, stride=(1, 1), pad=(0, 0)):
    """Unfold every (kh, kw) window of x into one row.

    x (B,C,H,W) -> cols (B*OH*OW, kh*kw*C); rows ordered (b, oh, ow), columns (i, j, c), so a
    convolution is ``cols @ weight.transpose(0, 2, 3, 1).reshape(O, -1).T``. Zero padding.
    Columns run over channels fastest because then each row is kh runs of kw*C neighbours in a
    channels-last input: the copy reads memory in order.
    """
    B, C = x.shape[:2]
    win = _windows(_pad(x, pad, 0), kh, kw, stride)          # B,C,OH,OW,kh,kw
    OH, OW = win.shape[2:4]
    return win.transpose(0, 2, 3, 4, 5, 1).reshape(B * OH * OW, kh * kw * C)


def col2im(cols, x_shape, kh, kw, stride=(1, 1), pad=(0, 0)):
    """Adjoint of ``im2col``: cols (B*OH*OW, kh*kw*C) -> (B,C,H,W), overlapping windows add."""
    B, C, H, W = x_shape
    OH, OW = out_size(H, kh, stride[0], pad[0]), out_size(W, kw, stride[1], pad[1])
    cols6 = cols.reshape(B, OH, OW, kh, kw, C).transpose(0, 5, 1, 2, 3, 4)   # B,C,OH,OW,kh,kw
    return _add_windows(lambda i, j: cols6[..., i, j], x_shape, kh, kw, stride, pad, cols.dtype)


def maxpool2d(x, kh, kw, stride, pad):
    """Max over each window; padding is -inf so it never wins; the first maximum wins ties.

    x (B,C,H,W) -> y (B,C,OH,OW) and argmax (B,C,OH,OW), the offset i*kw + j of the winner inside
    its window, in the smallest unsigned type that holds kh*kw - 1 (uint8 for kernels up to 16x16).
    A running maximum over the kh*kw offsets: no window is ever copied.
    """
    win = _windows(_pad(x, pad, -np.inf), kh, kw, stride)
    index_type = np.min_scalar_type(kh * kw - 1)
    y = np.copy(win[..., 0, 0], order="K")
    argmax = np.zeros_like(y, dtype=index_type)
    better = np.empty_like(y, dtype=bool)
    offset = np.empty_like(argmax)
    for k in range(1, kh * kw):
        v = win[..., k // kw, k % kw]
        np.greater(v, y, out=better)              # strictly greater: an equal later value loses
        np.maximum(y, v, out=y)                   # NaN propagates into y
        # k exceeds every earlier offset, so a max puts k exactly where this offset won
        np.multiply(better, index_type.type(k), out=offset)
        np.maximum(argmax, offset, out=argmax)
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape, kh, kw, stride, pad):
    """Route each dy (B,C,OH,OW) to the input pixel that won its window -> dx (B,C,H,W)."""
    return _add_windows(lambda i, j: dy * (argmax == i * kw + j), x_shape, kh, kw, stride, pad,
                        dy.dtype)


def avgpool2d(x, kh, kw, stride, pad):
    """Mean over each window of the zero-padded input, padding counted (count_include_pad=True).

    x (B,C,H,W) -> y (B,C,OH,OW).
    """
    win = _windows(_pad(x, pad, 0), kh, kw, stride)
    return win.mean(axis=(4, 5), dtype=x.dtype)


def avgpool2d_backward(dy, x_shape, kh, kw, stride, pad):
    """Spread each dy (B,C,OH,OW) evenly over its window -> dx (B,C,H,W)."""
    share = dy / (kh * kw)
    return _add_windows(lambda i, j: share, x_shape, kh, kw, stride, pad, dy.dtype)
