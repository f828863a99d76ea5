"""Layers: each one's forward and hand-written backward side by side (NCHW layout).

Names, arguments, weight shapes and default initialisation follow PyTorch's documentation, so a
model ported from PyTorch computes the same numbers. The array work is in ``ops`` (one function
per operation, same semantics on every backend).
"""
import math

from . import amp, ops
from .backend import device_of, get_array_module, rng
from .module import Module, ShapeError, new_param


def _pair(v, name, layer, minimum):
    """An int or a pair of ints -> (a, b), each >= minimum."""
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(a, int) and a >= minimum for a in pair):
        raise ValueError(f"{layer}: {name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return pair


def _uniform(shape, bound):
    return rng().uniform(-bound, bound, size=shape)


def check_input(layer, x, ndim, what):
    """Raise unless ``x`` is a floating array of rank ``ndim`` on the layer's device."""
    name = type(layer).__name__
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array {what}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ShapeError(f"{name}: expected a {ndim}-D input {what}, got shape {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point input, got dtype {x.dtype}")
    params = layer.parameters()
    if params and device_of(x) != params[0].device:
        raise ValueError(f"{name}: input is on {device_of(x)} but the layer's parameters are on "
                         f"{params[0].device}; move one of them (minicnn.to_device / model.to)")


def _spatial_out(layer, in_shape, kernel, stride, pad, channels=None):
    """Shared shape check of conv and pooling: (B,C,H,W) -> (OH, OW), naming the layer."""
    name = type(layer).__name__
    if len(in_shape) != 4:
        raise ShapeError(f"{name}: expected a 4-D input (B, C, H, W), got shape {tuple(in_shape)}")
    if channels is not None and in_shape[1] != channels:
        raise ShapeError(f"{name}: expected {channels} input channels (B, {channels}, H, W), "
                         f"got shape {tuple(in_shape)}")
    size = [ops.out_size(n, k, s, p) for n, k, s, p in zip(in_shape[2:], kernel, stride, pad)]
    if min(size) < 1:
        raise ShapeError(f"{name}: input {tuple(in_shape)} is smaller than the kernel {kernel} "
                         f"with padding {pad}")
    return tuple(size)


class Conv2d(Module):
    """2-D convolution (cross-correlation, as PyTorch) by im2col + one matrix product.

    x (B, in_channels, H, W) -> y (B, out_channels, OH, OW); weight (out, in, kh, kw), bias (out,).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        name = "Conv2d"
        for arg, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size", name, 1)
        self.stride = _pair(stride, "stride", name, 1)
        self.padding = _pair(padding, "padding", name, 0)
        kh, kw = self.kernel_size
        fan_in = in_channels * kh * kw
        # PyTorch's default: kaiming_uniform(a=sqrt(5)) for the weight, which is U(+-1/sqrt(fan_in)),
        # and the same bound for the bias.
        bound = 1 / math.sqrt(fan_in)
        self.weight = new_param(_uniform((out_channels, in_channels, kh, kw), bound))
        self.bias = new_param(_uniform((out_channels,), bound)) if bias else None

    def output_shape(self, in_shape):
        oh, ow = _spatial_out(self, in_shape, self.kernel_size, self.stride, self.padding,
                              self.in_channels)
        return (in_shape[0], self.out_channels, oh, ow)

    def forward(self, x):
        check_input(self, x, 4, "(B, C, H, W)")
        B, O, OH, OW = self.output_shape(x.shape)
        prec = amp.policy(self.weight.dtype)     # how to multiply: float16 operands in autocast
        x = x.astype(self.weight.dtype, copy=False)
        cols = prec.operand(ops.im2col(x, *self.kernel_size, self.stride, self.padding))
        w = prec.operand(self._weight_matrix())                            # O, K = kh*kw*C
        y = prec.matmul(cols, w.T)                           # cols (B*OH*OW, K) -> B*OH*OW, O
        if self.bias is not None:
            y += self.bias.data
        if self.training:
            self._cache = (cols, w, prec, x.shape)
        # The product comes out channels-last; hand back an NCHW view instead of copying it.
        return y.reshape(B, OH, OW, O).transpose(0, 3, 1, 2)

    def backward(self, dy, input_grad=True):
        cols, w, prec, x_shape = self._pop_cache()
        dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, self.out_channels)            # B*OH*OW, O
        if self.bias is not None:
            self.bias.grad += dy2.sum(axis=0)
        dy2 = prec.operand(dy2)
        dw = prec.matmul(dy2.T, cols)                                            # O, K
        kh, kw = self.kernel_size
        self.weight.grad += dw.reshape(-1, kh, kw, self.in_channels).transpose(0, 3, 1, 2)
        if not input_grad:
            return None
        return ops.col2im(prec.matmul(dy2, w), x_shape, kh, kw, self.stride, self.padding)

    def _weight_matrix(self):
        """weight (O,C,kh,kw) as (O, kh*kw*C), matching im2col's (i, j, c) column order."""
        return self.weight.data.transpose(0, 2, 3, 1).reshape(self.out_channels, -1)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")


class Linear(Module):
    """y = x @ weight.T + bias.  x (B, in_features) -> y (B, out_features); weight (out, in)."""

    def __init__(self, in_features, out_features, bias=True):
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Linear: {arg} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        bound = 1 / math.sqrt(in_features)        # PyTorch's default, as in Conv2d
        self.weight = new_param(_uniform((out_features, in_features), bound))
        self.bias = new_param(_uniform((out_features,), bound)) if bias else None

    def output_shape(self, in_shape):
        if len(in_shape) != 2 or in_shape[1] != self.in_features:
            raise ShapeError(f"{type(self).__name__}: expected input shape "
                             f"(B, {self.in_features}), got {tuple(in_shape)}")
        return (in_shape[0], self.out_features)

    def forward(self, x):
        check_input(self, x, 2, f"(B, {self.in_features})")
        self.output_shape(x.shape)
        prec = amp.policy(self.weight.dtype)     # how to multiply: float16 operands in autocast
        x = prec.operand(x.astype(self.weight.dtype, copy=False))
        w = prec.operand(self.weight.data)
        y = prec.matmul(x, w.T)
        if self.bias is not None:
            y += self.bias.data
        if self.training:
            self._cache = (x, w, prec)
        return y

    def backward(self, dy, input_grad=True):
        x, w, prec = self._pop_cache()
        if self.bias is not None:
            self.bias.grad += dy.sum(axis=0)
        dy = prec.operand(dy)
        self.weight.grad += prec.matmul(dy.T, x)
        if not input_grad:
            return None
        return prec.matmul(dy, w)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class _Pool2d(Module):
    """Shared arguments and shape check of the 2-D pooling layers (stride defaults to kernel)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        name = type(self).__name__
        self.kernel_size = _pair(kernel_size, "kernel_size", name, 1)
        self.stride = _pair(self.kernel_size if stride is None else stride, "stride", name, 1)
        self.padding = _pair(padding, "padding", name, 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            # As PyTorch: more padding would make windows of padding alone.
            raise ValueError(f"{name}: padding {self.padding} must be at most half of "
                             f"kernel_size {self.kernel_size}")

    def output_shape(self, in_shape):
        return tuple(in_shape[:2]) + _spatial_out(self, in_shape, self.kernel_size, self.stride,
                                                  self.padding)

    def window(self, x):
        """Check ``x`` (an array (B, C, H, W) the windows fit) and return the window arguments of
        the pooling ops: kh, kw, stride, padding."""
        check_input(self, x, 4, "(B, C, H, W)")
        self.output_shape(x.shape)
        return (*self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Max over each window; the first maximum wins ties; padding never wins.

    x (B,C,H,W) -> y (B,C,OH,OW). Backward routes dy to the recorded winners.
    """

    def forward(self, x):
        y, argmax = ops.maxpool2d(x, *self.window(x))
        if self.training:
            self._cache = (argmax, x.shape)
        return y

    def backward(self, dy, input_grad=True):
        argmax, x_shape = self._pop_cache()
        return ops.maxpool2d_backward(dy, argmax, x_shape, *self.kernel_size, self.stride,
                                      self.padding)


class AvgPool2d(_Pool2d):
    """Mean over each window, padding counted as zeros (PyTorch's count_include_pad=True).

    x (B,C,H,W) -> y (B,C,OH,OW).
    """

    def forward(self, x):
        y = ops.avgpool2d(x, *self.window(x))
        if self.training:
            self._cache = x.shape
        return y

    def backward(self, dy, input_grad=True):
        return ops.avgpool2d_backward(dy, self._pop_cache(), *self.kernel_size, self.stride,
                                      self.padding)


class ReLU(Module):
    """y = max(x, 0), elementwise; dx = dy where x > 0, else 0."""

    def forward(self, x):
        y, mask = ops.relu(x)
        if self.training:
            self._cache = mask
        return y

    def backward(self, dy, input_grad=True):
        return ops.relu_backward(dy, self._pop_cache())


class Flatten(Module):
    """Flatten dims start_dim..end_dim into one: (B, C, H, W) -> (B, C*H*W) by default."""

    def __init__(self, start_dim=1, end_dim=-1):
        self.start_dim, self.end_dim = start_dim, end_dim

    def output_shape(self, in_shape):
        n = len(in_shape)
        start, end = self.start_dim % max(n, 1), self.end_dim % max(n, 1)
        if n == 0 or start > end:
            raise ShapeError(f"Flatten: cannot flatten dims {self.start_dim}..{self.end_dim} of "
                             f"shape {tuple(in_shape)}")
        merged = math.prod(in_shape[start:end + 1])
        return tuple(in_shape[:start]) + (merged,) + tuple(in_shape[end + 1:])

    def forward(self, x):
        if self.training:
            self._cache = x.shape
        return x.reshape(self.output_shape(x.shape))

    def backward(self, dy, input_grad=True):
        return dy.reshape(self._pop_cache())

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class Dropout(Module):
    """Zero each element with probability p in training, scale the rest by 1/(1-p); identity in eval.

    Masks are drawn from the one host generator (``minicnn.seed``) and moved to the input's device,
    so CPU and GPU runs of a seed drop the same elements.
    """

    def __init__(self, p=0.5):
        if not (isinstance(p, (int, float)) and 0 <= p <= 1):
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        xp = get_array_module(x)
        keep = rng().random(x.shape) >= self.p
        scale = 0.0 if self.p == 1 else 1 / (1 - self.p)
        mask = xp.asarray(keep * scale, dtype=x.dtype)
        self._cache = mask
        return x * mask

    def backward(self, dy, input_grad=True):
        if not self.training or self.p == 0:
            return dy
        return dy * self._pop_cache()

    def extra_repr(self):
        return f"p={self.p}"


class Identity(Module):
    """y = x; dx = dy. A placeholder where a model has no layer (ResNet's CIFAR stem has no
    max pooling). Arguments are accepted and ignored, as in PyTorch."""

    def __init__(self, *args, **kwargs):
        pass

    def forward(self, x):
        return x

    def backward(self, dy, input_grad=True):
        return dy if input_grad else None


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size, whatever the input's: (B,C,H,W) -> (B,C,OH,OW).

    ``output_size`` is an int or a pair (None in a pair keeps that input dimension). Output cell i
    averages input rows floor(i*H/OH) .. ceil((i+1)*H/OH) - 1, as PyTorch, and likewise for columns;
    windows may overlap when OH does not divide H. Pooling is separable, so y = Ah x Aw^T per
    image, with Ah (OH, H) and Aw (OW, W) holding 1/(window length) inside each window: two
    matrix products forward, their transposes backward. ``output_size=1`` is global average
    pooling, a plain mean.
    """

    def __init__(self, output_size):
        size = (output_size, output_size) if not isinstance(output_size, (tuple, list)) \
            else tuple(output_size)
        if len(size) != 2 or not all(s is None or (isinstance(s, int) and s >= 1) for s in size):
            raise ValueError(f"AdaptiveAvgPool2d: output_size must be a positive int or a pair of "
                             f"positive ints (or None), got {output_size!r}")
        self.output_size = size

    def output_shape(self, in_shape):
        if len(in_shape) != 4:
            raise ShapeError(f"AdaptiveAvgPool2d: expected a 4-D input (B, C, H, W), got shape "
                             f"{tuple(in_shape)}")
        if min(in_shape[2:]) < 1:
            raise ShapeError(f"AdaptiveAvgPool2d: input {tuple(in_shape)} has an empty spatial "
                             "dimension")
        out = tuple(n if s is None else s for s, n in zip(self.output_size, in_shape[2:]))
        return tuple(in_shape[:2]) + out

    @staticmethod
    def _window_matrix(xp, n_in, n_out, dtype):
        """(n_out, n_in): row i is 1/len over PyTorch's window [floor(i*n/o), ceil((i+1)*n/o))."""
        i = xp.arange(n_out)
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        cols = xp.arange(n_in)
        inside = (cols >= start[:, None]) & (cols < end[:, None])
        return (inside / (end - start)[:, None]).astype(dtype)

    def forward(self, x):
        check_input(self, x, 4, "(B, C, H, W)")
        B, C, OH, OW = self.output_shape(x.shape)
        H, W = x.shape[2:]
        xp = get_array_module(x)
        if self.training:
            self._cache = x.shape
        if (OH, OW) == (1, 1):
            return x.mean(axis=(2, 3), keepdims=True)
        ah = self._window_matrix(xp, H, OH, x.dtype)
        aw = self._window_matrix(xp, W, OW, x.dtype)
        return ops.matmul(ah, ops.matmul(x, aw.T))      # (OH,H) @ (B,C,H,OW) -> (B,C,OH,OW)

    def backward(self, dy, input_grad=True):
        B, C, H, W = self._pop_cache()
        OH, OW = dy.shape[2:]
        xp = get_array_module(dy)
        if (OH, OW) == (1, 1):
            dx = xp.empty((B, C, H, W), dtype=dy.dtype)
            dx[...] = dy / (H * W)
            return dx
        ah = self._window_matrix(xp, H, OH, dy.dtype)
        aw = self._window_matrix(xp, W, OW, dy.dtype)
        return ops.matmul(ah.T, ops.matmul(dy, aw))     # (H,OH) @ (B,C,OH,W) -> (B,C,H,W)

    def extra_repr(self):
        return f"output_size={self.output_size}"
