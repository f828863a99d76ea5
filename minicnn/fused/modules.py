"""Fused modules: one module doing the work of a run of plain layers, as ``minicnn.fuse`` puts
them in place of those layers.

Each is made from the plain layers it replaces and holds their very Parameter objects as its own
``weight`` and ``bias``, so an optimizer made before fusing keeps training them and
``state_dict`` keys do not change. Outputs and gradients are those of the plain layers run one
by one (tests/test_fusion.py says how close).

- ``FusedConv2d(conv, relu, pool)``: y = pool(relu(conv(x))), the ReLU and the pool optional;
- ``FusedLinear(linear, relu)``: y = relu(linear(x));
- ``FusedMaxPool2d(pool, relu)``: y = relu(pool(x)) = pool(relu(x)).
"""
from .. import amp, ops
from ..backend import get_array_module
from ..layers import Conv2d, Linear, MaxPool2d, _Pool2d, check_input
from ..module import Module
from .windows import (add_bias, col2im_matmul, im2col, maxpool2d, maxpool_blocks,
                      maxpool_blocks_backward)
from .ops import bias_relu, relu_backward

_ONES = {}      # (array type, length, dtype) -> a (1, length) row of ones, made once and reused


def column_sums(a):
    """a (N, M) -> (M,) sums over rows, as the product of a row of ones with a: on BLAS that is
    several times faster than a.sum(axis=0) for the tall matrices of a convolution's backward
    (and faster as a (1, N) matrix than as a vector). The row of ones is kept between steps (one
    launch less per layer on a GPU, and fixed memory for a recorded CUDA graph)."""
    key = (type(a), a.shape[0], a.dtype.str)
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = get_array_module(a).ones((1, a.shape[0]), dtype=a.dtype)
    return ops.matmul(ones, a).reshape(-1)


def bias_then_relu(layer, y, relu):
    """y (N, out) += the layer's bias, in place; with ``relu`` also y = max(y, 0), in the same
    pass as the bias (``bias_relu``)."""
    if relu and layer.bias is not None:
        return bias_relu(y, layer.bias.data)
    if layer.bias is not None:
        add_bias(y, layer.bias.data)
    if relu:
        get_array_module(y).maximum(y, 0, out=y)
    return y


def reach(pool, size):
    """(H', W') <= size: the leading rows and columns of an input of spatial ``size`` (H, W)
    that the windows of ``pool`` (a pooling layer) read. Less than ``size`` where the floor in
    the output size leaves the last rows or columns out (a 2x2 pool over 11x11 reads 10x10)."""
    # The last window ends at padded index s*(windows-1)+k-1. Cutting the input there keeps
    # the same windows: it happens only when p < s, and then the floor gives `windows` again.
    return tuple(min(n, s * (ops.out_size(n, k, s, p) - 1) + k - p)
                 for n, k, s, p in zip(size, pool.kernel_size, pool.stride, pool.padding))


def tiles(pool):
    """Whether a convolution right before ``pool`` applies it itself, over blocks of rows in
    window order: a MaxPool2d whose windows tile what they read (stride = kernel, no padding)."""
    return type(pool) is MaxPool2d and pool.stride == pool.kernel_size and pool.padding == (0, 0)


def _copy_settings(module, layer, names):
    for name in names:
        setattr(module, name, getattr(layer, name))


class FusedConv2d(Module):
    """y = pool(relu(conv(x))): a Conv2d, an optional ReLU and an optional pooling layer (``pool``:
    a MaxPool2d, AvgPool2d or FusedMaxPool2d, kept as the child ``pool``), in one module.

    What runs:

    - with a pool, the convolution computes only the outputs its windows read (``reach``): a 2x2
      pool over an 11x11 output reads 10x10 of it;
    - a max pool whose windows tile those (``tiles``) is applied by the convolution itself: its
      im2col orders the rows window by window, so the pool is a running maximum over contiguous
      blocks of the product (``maxpool_blocks``), and a ReLU starts that maximum at 0;
    - otherwise a ReLU is applied in the bias's pass (``bias_relu``) and the pool runs its own
      forward on the convolution's output;
    - on the CPU, im2col copies in the input's memory order and the input gradient is
      ``col2im_matmul``, which never makes the (B*OH*OW, K) product.
    """

    _conv_output_shape = Conv2d.output_shape      # the convolution's shape check and messages
    _weight_matrix = Conv2d._weight_matrix

    def __init__(self, conv, relu=False, pool=None):
        if type(conv) is not Conv2d:
            raise TypeError(f"FusedConv2d: conv must be a Conv2d, got {type(conv).__name__}")
        if pool is not None and not isinstance(pool, _Pool2d):
            raise TypeError(f"FusedConv2d: pool must be a MaxPool2d, AvgPool2d, FusedMaxPool2d or "
                            f"None, got {type(pool).__name__}")
        _copy_settings(self, conv, ("in_channels", "out_channels", "kernel_size", "stride",
                                    "padding", "weight", "bias", "training"))
        self.relu = bool(relu)
        self.pool = pool

    def output_shape(self, in_shape):
        shape = self._conv_output_shape(in_shape)
        return shape if self.pool is None else self.pool.output_shape(shape)

    def forward(self, x):
        check_input(self, x, 4, "(B, C, H, W)")
        B, O, OH, OW = self._conv_output_shape(x.shape)
        used = blocks = None
        if self.pool is not None:
            self.pool.output_shape((B, O, OH, OW))          # the pool's own check and message
            OH, OW = used = reach(self.pool, (OH, OW))
            blocks = self.pool.kernel_size if tiles(self.pool) else None
        window = (*self.kernel_size, self.stride, self.padding, used)
        prec = amp.policy(self.weight.dtype)     # how to multiply: float16 operands in autocast
        x = x.astype(self.weight.dtype, copy=False)
        cols = prec.operand(im2col(x, *window, blocks))                       # B*OH*OW, K
        w = prec.operand(self._weight_matrix())                               # O, K
        y = prec.matmul(cols, w.T)                                            # B*OH*OW, O
        relu_out = argmax = None
        if blocks:              # the pool, over the th*tw blocks of the window-ordered rows
            th, tw = blocks
            y = bias_then_relu(self, y, False).reshape(th * tw, -1, O)
            y, argmax = maxpool_blocks(y, self.relu)        # the ReLU, if any, in here
            OH, OW = OH // th, OW // tw
        else:
            y = bias_then_relu(self, y, self.relu)
            relu_out = y if self.relu else None
        if self.training:
            self._cache = (cols, w, prec, x.shape, window, relu_out, argmax)
        # The product comes out channels-last; hand back an NCHW view instead of copying it.
        y = y.reshape(B, OH, OW, O).transpose(0, 3, 1, 2)
        return self.pool.forward(y) if self.pool is not None and not blocks else y

    def backward(self, dy, input_grad=True):
        cols, w, prec, x_shape, window, relu_out, argmax = self._pop_cache()
        O = self.out_channels
        if self.pool is not None and argmax is None:
            dy = self.pool.backward(dy)      # onto the outputs the pool read
        dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, O)                          # B*OH*OW, O
        if argmax is not None:               # dy is the pool's: to the winners, block by block
            th, tw = self.pool.kernel_size
            dy2 = maxpool_blocks_backward(dy2, argmax, th * tw).reshape(-1, O)
        if relu_out is not None:
            dy2 = relu_backward(dy2, relu_out)
        if self.bias is not None:
            self.bias.grad += column_sums(dy2)           # from the float32 dy2 in autocast too
        dy2 = prec.operand(dy2)
        # cols.T @ dy2 rather than dy2.T @ cols: as fast or faster with either layout of cols.
        dw = prec.matmul(cols.T, dy2)                                          # K, O
        kh, kw = self.kernel_size
        self.weight.grad += dw.reshape(kh, kw, self.in_channels, -1).transpose(3, 2, 0, 1)
        if not input_grad:
            return None
        if argmax is not None:               # back from window order to col2im's (b, oh, ow)
            OH, OW = window[-1]
            dy2 = dy2.reshape(th, tw, x_shape[0], OH // th, OW // tw, O)
            dy2 = dy2.transpose(2, 3, 0, 4, 1, 5).reshape(-1, O)
        return col2im_matmul(dy2, w, x_shape, *window, matmul=prec.matmul)

    def extra_repr(self):
        return (Conv2d.extra_repr(self) + f", relu={self.relu}"
                + ("" if self.pool is None else f", pool={self.pool!r}"))

    def __repr__(self):         # one line: the pool is a setting of this module, shown inline
        return f"{type(self).__name__}({self.extra_repr()})"


class FusedLinear(Linear):
    """y = relu(linear(x)) with ``relu``: Linear's forward, then the ReLU in place, whose output
    is the mask of its backward (``relu_backward``: no mask array, one pass), then Linear's
    backward."""

    def __init__(self, linear, relu=False):
        if type(linear) is not Linear:
            raise TypeError(f"FusedLinear: linear must be a Linear, got {type(linear).__name__}")
        _copy_settings(self, linear, ("in_features", "out_features", "weight", "bias",
                                      "training"))
        self.relu = bool(relu)
        self._relu_out = None

    def forward(self, x):
        y = super().forward(x)                                  # the product and the bias
        if self.relu:
            get_array_module(y).maximum(y, 0, out=y)
        self._relu_out = y if self.relu and self.training else None
        return y

    def backward(self, dy, input_grad=True):
        if self._relu_out is not None:
            dy, self._relu_out = relu_backward(dy, self._relu_out), None
        return super().backward(dy, input_grad)

    def extra_repr(self):
        return super().extra_repr() + f", relu={self.relu}"


class FusedMaxPool2d(MaxPool2d):
    """y = relu(pool(x)) with ``relu``, else pool(x), for a MaxPool2d ``pool``: the ReLU folded
    into the running maximum, which starts at 0, and the work split between threads on the CPU
    (``maxpool2d``). Backward is MaxPool2d's: where no value beat 0 the argmax is -1 and
    nothing is sent back, as the ReLU's backward would."""

    def __init__(self, pool, relu=False):
        if type(pool) is not MaxPool2d:
            raise TypeError(f"FusedMaxPool2d: pool must be a MaxPool2d, got "
                            f"{type(pool).__name__}")
        _copy_settings(self, pool, ("kernel_size", "stride", "padding", "training"))
        self.relu = bool(relu)

    def forward(self, x):
        y, argmax = maxpool2d(x, *self.window(x), self.relu)
        if self.training:
            self._cache = (argmax, x.shape)
        return y

    def extra_repr(self):
        return super().extra_repr() + f", relu={self.relu}"
