"""Batch normalisation: BatchNorm1d and BatchNorm2d, one implementation over the channel axis.

Training (PyTorch's semantics): each channel is normalised with the statistics of the batch,

    mean = x.mean(over every axis but C)      var = x.var(same axes)          (biased: / N)
    xhat = (x - mean) / sqrt(var + eps)       y = weight * xhat + bias

and the running statistics move towards them,

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * N / (N - 1)   (unbiased)

with N the number of values per channel; ``momentum=None`` gives the cumulative average
(factor 1 / num_batches_tracked). Eval mode uses the running statistics: the layer is then the
fixed affine map y = x * scale + shift, scale = weight / sqrt(running_var + eps).

Backward of the training forward, the compact form (sums over every axis but C):

    dbias   = sum(dy)            dweight = sum(dy * xhat)
    dx      = weight / sqrt(var + eps) * (dy - dbias / N - xhat * dweight / N)
"""
import numpy as np

from .backend import get_array_module
from .layers import check_input
from .module import Module, ShapeError, new_param


class _BatchNorm(Module):
    """Shared by BatchNorm1d and BatchNorm2d; subclasses name the input ranks they take."""

    _ranks = ()        # input ranks accepted, e.g. (4,) for (B, C, H, W)
    _layout = ""       # how the input looks, for messages, with {C} for the channel count

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True):
        name = type(self).__name__
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"{name}: eps must be a positive number, got {eps!r}")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        C = num_features
        self.weight = new_param(np.ones(C)) if affine else None
        self.bias = new_param(np.zeros(C)) if affine else None
        if track_running_stats:
            dtype = new_param(np.zeros(0)).dtype           # the default dtype, as the parameters
            self.register_buffer("running_mean", np.zeros(C, dtype=dtype))
            self.register_buffer("running_var", np.ones(C, dtype=dtype))
            self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    # --- shapes ----------------------------------------------------------------------------------

    def output_shape(self, in_shape):
        if len(in_shape) not in self._ranks or in_shape[1] != self.num_features:
            raise ShapeError(f"{type(self).__name__}: expected input of shape "
                             f"{self._layout.format(C=self.num_features)}, got shape "
                             f"{tuple(in_shape)}")
        return tuple(in_shape)

    def _check(self, x):
        if hasattr(x, "ndim"):
            self.output_shape(x.shape)          # rank and channels, in this layer's words
        check_input(self, x, getattr(x, "ndim", None), self._layout.format(C=self.num_features))

    @staticmethod
    def _axes(x):
        """The axes a channel's statistics run over: all but axis 1."""
        return (0,) + tuple(range(2, x.ndim))

    def _per_channel(self, v, x):
        """A (C,) vector shaped to broadcast against x: (1, C, 1, ...)."""
        return v.reshape((1, -1) + (1,) * (x.ndim - 2))

    # --- forward and backward --------------------------------------------------------------------

    def forward(self, x):
        self._check(x)
        if self.affine:
            x = x.astype(self.weight.dtype, copy=False)
        if not self.training:
            self._cache = None      # eval keeps nothing, nor what an earlier forward kept
        if self.training or self.running_mean is None:
            return self._forward_batch_stats(x)
        # eval: the affine map of the running statistics
        scale, shift = self._eval_scale_shift(x)
        return x * scale + shift

    def _forward_batch_stats(self, x):
        xp = get_array_module(x)
        axes = self._axes(x)
        n = x.size // x.shape[1]                             # values per channel
        if n <= 1:
            raise ValueError(f"{type(self).__name__}: Expected more than 1 value per channel when "
                             f"training, got input size {tuple(x.shape)}")
        acc = np.float32 if x.dtype == np.float16 else x.dtype   # float16 sums in float32
        mean = x.mean(axis=axes, dtype=acc)
        xc = x - self._per_channel(mean.astype(x.dtype, copy=False), x)
        var = xp.square(xc).mean(axis=axes, dtype=acc)     # biased: normalises the batch
        inv_std = 1 / xp.sqrt(var + self.eps)
        xhat = xc
        xhat *= self._per_channel(inv_std.astype(x.dtype, copy=False), x)
        if self.training and self.running_mean is not None:
            self._update_running_stats(mean, var * (n / (n - 1)))   # unbiased, as PyTorch
        if self.affine:
            y = xhat * self._per_channel(self.weight.data, x)
            y += self._per_channel(self.bias.data, x)
        else:
            y = xhat.copy() if self.training else xhat
        if self.training:
            self._cache = (xhat, inv_std.astype(x.dtype, copy=False))
        return y

    def _update_running_stats(self, mean, unbiased_var):
        self.num_batches_tracked += 1
        rm, rv = self.running_mean, self.running_var
        if self.momentum is None:            # cumulative moving average
            # Computed from the count where it lives, without reading it back: a recorded CUDA
            # graph then reads the new count on every replay. In double, rounded once, as the
            # Python float of a fixed momentum is.
            factor = 1.0 / self.num_batches_tracked
            keep, factor = (1 - factor).astype(rm.dtype), factor.astype(rm.dtype)
        else:
            factor = self.momentum
            keep = 1 - factor
        rm *= keep
        rm += factor * mean.astype(rm.dtype, copy=False)
        rv *= keep
        rv += factor * unbiased_var.astype(rv.dtype, copy=False)

    def _eval_scale_shift(self, x):
        """(scale, shift) shaped to broadcast against x: y = x * scale + shift in eval mode."""
        xp = get_array_module(x)
        scale = 1 / xp.sqrt(self.running_var.astype(x.dtype) + self.eps)
        shift = -self.running_mean.astype(x.dtype) * scale
        if self.affine:
            scale = scale * self.weight.data
            shift = shift * self.weight.data + self.bias.data
        return self._per_channel(scale, x), self._per_channel(shift, x)

    def backward(self, dy, input_grad=True):
        if self._cache is None and not self.training and self.running_mean is not None:
            return self._backward_eval(dy, input_grad)
        xhat, inv_std = self._pop_cache()
        axes = self._axes(dy)
        n = dy.size // dy.shape[1]
        sum_dy = dy.sum(axis=axes)
        sum_dy_xhat = (dy * xhat).sum(axis=axes)
        if self.affine:
            self.weight.grad += sum_dy_xhat
            self.bias.grad += sum_dy
        if not input_grad:
            return None
        scale = inv_std * self.weight.data if self.affine else inv_std
        dx = xhat * self._per_channel(-sum_dy_xhat / n, dy)
        dx += dy
        dx -= self._per_channel(sum_dy / n, dy)
        dx *= self._per_channel(scale, dy)
        return dx

    def _backward_eval(self, dy, input_grad):
        """Backward of the eval-mode affine map: dx = dy * scale.

        Eval mode keeps nothing (no input), so the gradients of weight and bias cannot be formed:
        this works for a frozen layer (``bn.eval().freeze()``, as torchvision's
        FrozenBatchNorm2d) or one without affine parameters, and raises otherwise.
        """
        if self.affine and (self.weight.requires_grad or self.bias.requires_grad):
            raise RuntimeError(
                f"{type(self).__name__}.backward after an eval-mode forward: eval mode keeps no "
                "input, so weight and bias get no gradient; freeze() the layer to backpropagate "
                "through its running statistics, or run the forward in training mode")
        if not input_grad:
            return None
        scale, _ = self._eval_scale_shift(dy)
        return dy * scale

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of each channel of x (B, C, H, W); statistics over B, H and W.

    weight (C,) ones and bias (C,) zeros (when ``affine``); buffers running_mean (C,) zeros,
    running_var (C,) ones and num_batches_tracked (int64 scalar), as PyTorch's state_dict.
    """

    _ranks = (4,)
    _layout = "(B, {C}, H, W)"


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of each feature of x (B, C) or (B, C, L); statistics over B (and L).

    Parameters and buffers as ``BatchNorm2d``.
    """

    _ranks = (2, 3)
    _layout = "(B, {C}) or (B, {C}, L)"
