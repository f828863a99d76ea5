"""Fused operations for the GPU training step: several elementwise passes done in one launch.

At batch 128 a GPU training step is launch-bound: each of its ~45 kernels costs a few
microseconds to launch however little it computes, and the FLOPs take less than the launches. So
what one kernel can do in one pass over the data is done in one launch:

- ``bias_relu``: the bias add and the ReLU after a convolution, in place (two launches -> 1);
- ``relu_backward``: dy where the ReLU's output is positive; the output is the mask, so forward
  keeps no mask array;
- ``softmax_cross_entropy``: max, log-sum-exp, per-sample loss, dlogits and the correct
  predictions of a batch (about a dozen launches -> 1).

Adam over every parameter at once (``adam_multi_tensor`` of ``kernels/fused.cu``) is in
``minicnn.fused.adam``, beside the optimizers that launch it.

Each op has a NumPy path, the reference, and a ``*_kernel(..., launch=None)`` path that runs
``kernels/fused.cu`` and computes the same values in the same layout; the op takes the path of
its input's array module (``get_array_module``), as ``minicnn.ops`` does. ``launch`` is
``minicnn.cuda.launch`` on a GPU, the emulator's in the tests.
"""
import math
import numbers

import numpy as np

from .. import cuda, losses
from ..backend import get_array_module
from ..module import ShapeError
from .windows import over_batch


# --- bias + ReLU -------------------------------------------------------------------------------

def bias_relu(y, bias):
    """y = max(y + bias, 0) in place and returned; y (N, C) C-contiguous, bias (C,).

    NaN stays NaN, as in ``np.maximum``.
    """
    if get_array_module(y) is not np:
        return bias_relu_kernel(y, bias)
    _check_bias_relu(y, bias)
    np.add(y, bias, out=y)
    np.maximum(y, 0, out=y)
    return y


def bias_relu_kernel(y, bias, launch=None):
    """``bias_relu`` by kernels/fused.cu: one thread per element of y (N, C), in place."""
    _check_bias_relu(y, bias)
    (launch or cuda.launch)("fused.cu", "bias_relu_forward", y.size, y, bias, y.shape[0],
                            y.shape[1])
    return y


def _check_bias_relu(y, bias):
    if getattr(y, "ndim", None) != 2:
        raise ShapeError("bias_relu: expected y of shape (N, C), got "
                         f"{getattr(y, 'shape', type(y).__name__)}")
    if getattr(bias, "shape", None) != (y.shape[1],):
        raise ShapeError(f"bias_relu: expected bias of shape ({y.shape[1]},) for y of shape "
                         f"{tuple(y.shape)}, got {getattr(bias, 'shape', type(bias).__name__)}")
    if y.dtype.kind != "f" or bias.dtype != y.dtype:
        raise TypeError(f"bias_relu: expected floating-point y and bias of one dtype, got "
                        f"{y.dtype} and {bias.dtype}")
    if not y.flags.c_contiguous:
        raise ValueError(f"bias_relu: y is updated in place and must be C-contiguous, got "
                         f"strides {y.strides} for shape {tuple(y.shape)}")


# --- ReLU backward -----------------------------------------------------------------------------

def relu_backward(dy, y):
    """dx = dy where y > 0, else 0 (dy * (y > 0)); y is the ReLU's output. Any shape.

    dy and y must share one memory layout (equal strides), as a layer's output and its gradient
    do: the kernel walks both in y's memory order. dx comes in that layout too. On the CPU large
    arrays are split over the batch between threads (``windows.over_batch``).
    """
    if get_array_module(y) is not np:
        return relu_backward_kernel(dy, y)
    _check_relu_backward(dy, y)
    if y.ndim == 0:
        return np.multiply(dy, y > 0)
    dx = np.empty_like(y)

    def run(lo, hi):          # the mask straight into dx, then dx *= dy: no temporary array
        np.greater(y[lo:hi], 0, out=dx[lo:hi])
        dx[lo:hi] *= dy[lo:hi]
    over_batch(run, y.shape[0], y.size)
    return dx


def relu_backward_kernel(dy, y, launch=None):
    """``relu_backward`` by kernels/fused.cu, one thread per element.

    The arrays are handed over as the flat buffers they are in memory: both transposed so that
    their axes run from the largest stride to the smallest (C-contiguous for any dense layout,
    such as an NCHW view of a channels-last buffer: no copy), and dx transposed back.
    """
    _check_relu_backward(dy, y)
    if dy.strides != y.strides:
        raise ValueError(f"relu_backward: dy and y must share a memory layout (the kernel walks "
                         f"both in y's memory order), got strides {dy.strides} and {y.strides} "
                         f"for shape {tuple(y.shape)}")
    axes = tuple(sorted(range(y.ndim), key=lambda k: -abs(y.strides[k])))
    dx = get_array_module(y).empty(tuple(y.shape[k] for k in axes), dtype=y.dtype)
    (launch or cuda.launch)("fused.cu", "relu_backward", y.size, dy.transpose(axes),
                            y.transpose(axes), dx, y.size)
    return dx.transpose(tuple(int(k) for k in np.argsort(axes)))


def _check_relu_backward(dy, y):
    if getattr(dy, "shape", None) != getattr(y, "shape", None):
        raise ShapeError(f"relu_backward: dy and y must have one shape, got "
                         f"{getattr(dy, 'shape', type(dy).__name__)} and "
                         f"{getattr(y, 'shape', type(y).__name__)}")
    if y.dtype.kind != "f" or dy.dtype != y.dtype:
        raise TypeError(f"relu_backward: expected floating-point dy and y of one dtype, got "
                        f"{dy.dtype} and {y.dtype}")


# --- softmax cross-entropy ---------------------------------------------------------------------

def softmax_cross_entropy(logits, targets, smoothing=0.0, grad_scale=None):
    """Cross-entropy of softmax(logits) against class indices, its gradient and the hits.

    logits (B, K), targets (B,) ints -> loss (B,) per sample, grad (B, K), correct (B,) int32,
    invalid (1,) int32. With label smoothing e the target distribution is
    q = (1 - e)*onehot(t) + e/K, loss = -sum_k q_k log softmax_k, and
    grad = (softmax - q) * grad_scale, grad_scale 1/B by default (the gradient of the mean loss).
    correct[b] = 1 where argmax(logits[b]) (the first maximum) is the target. A target outside
    [0, K) gives a NaN loss and a NaN grad row and sets invalid[0] = 1: the caller checks one
    flag, when it chooses to sync, instead of the targets before every step. The NumPy path is
    ``minicnn.losses.cross_entropy``, the plain loss's arithmetic.
    """
    if get_array_module(logits) is not np:
        return softmax_cross_entropy_kernel(logits, targets, smoothing, grad_scale)
    targets, smoothing, scale = _check_softmax_cross_entropy(logits, targets, smoothing,
                                                             grad_scale)
    loss, grad, invalid = losses.cross_entropy(logits, targets, smoothing, scale)
    correct = (logits.argmax(axis=1) == targets).astype(np.int32)
    return loss, grad, correct, invalid


def softmax_cross_entropy_kernel(logits, targets, smoothing=0.0, grad_scale=None, launch=None):
    """``softmax_cross_entropy`` by kernels/fused.cu: one thread per row of logits."""
    targets, smoothing, scale = _check_softmax_cross_entropy(logits, targets, smoothing,
                                                             grad_scale)
    xp = get_array_module(logits)
    B, K = logits.shape
    loss, grad = xp.empty(B, dtype=logits.dtype), xp.empty((B, K), dtype=logits.dtype)
    correct, invalid = xp.empty(B, dtype=np.int32), xp.zeros(1, dtype=np.int32)
    (launch or cuda.launch)("fused.cu", "softmax_cross_entropy", B, logits, targets, loss, grad,
                            correct, invalid, B, K, smoothing, scale)
    return loss, grad, correct, invalid


def _check_softmax_cross_entropy(logits, targets, smoothing, grad_scale):
    """-> targets as int64, smoothing and grad_scale as floats."""
    name = "softmax_cross_entropy"
    B, K = losses.check_logits_and_targets(name, logits, targets)
    if B == 0 or K == 0:
        raise ShapeError(f"{name}: expected logits of shape (B, K), B, K >= 1, got "
                         f"{tuple(logits.shape)}")
    if logits.dtype.kind != "f":
        raise TypeError(f"{name}: expected floating-point logits, got {logits.dtype}")
    if not (_real(smoothing) and 0 <= smoothing <= 1):
        raise ValueError(f"{name}: smoothing must be a number in [0, 1], got {smoothing!r}")
    if grad_scale is not None and not (_real(grad_scale) and math.isfinite(grad_scale)):
        raise ValueError(f"{name}: grad_scale must be a finite number or None, got "
                         f"{grad_scale!r}")
    scale = 1.0 / B if grad_scale is None else float(grad_scale)
    return targets.astype(np.int64, copy=False), float(smoothing), scale


def _real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
