"""Fused operations for the GPU training step: several elementwise passes done in one launch.

At batch 128 a GPU training step is launch-bound: each of its ~45 kernels costs a few
microseconds to launch however little it computes, and the FLOPs take less than the launches. So
what one kernel can do in one pass over the data is done in one launch:

- ``bias_relu``: the bias add and the ReLU after a Linear or Conv2d, in place (two launches -> 1);
- ``relu_backward``: dy where the ReLU's output is positive; the output is the mask, so forward
  keeps no mask array;
- ``softmax_cross_entropy``: max, log-sum-exp, per-sample loss, dlogits and the correct
  predictions of a batch (about a dozen launches -> 1);
- ``adam_multi_tensor``: one Adam/AdamW step of every parameter of a model (about ten launches
  per parameter tensor -> 1), its hyper-parameters read from a device array so that a CUDA graph
  of the step picks up a new learning rate without being captured again.

Each op has a NumPy path, the reference, and a ``*_kernel(..., launch=None)`` path that runs
``kernels/fused.cu`` and computes the same values in the same layout; the op takes the path of
its input's array module (``get_array_module``), as ``minicnn.ops`` does. ``launch`` is
``minicnn.cuda.launch`` on a GPU, the emulator's in the tests.
"""
import math
import numbers

import numpy as np

from .. import cuda, ops
from ..backend import get_array_module
from ..module import ShapeError

ADAM_HYPER = ("1 - beta1", "beta2", "1 - beta2", "eps", "weight_decay (Adam; 0 for AdamW)",
              "step_size = lr / (1 - beta1**t)", "bias2_sqrt = sqrt(1 - beta2**t)",
              "decay = 1 - lr*weight_decay (AdamW; 1 for Adam)")
"""What each entry of the hyper array of ``adam_multi_tensor`` holds (see ``adam_hyper``)."""


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
    arrays are split over the batch between threads (``ops.over_batch``).
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
    ops.over_batch(run, y.shape[0], y.size)
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
    flag, when it chooses to sync, instead of the targets before every step.
    """
    if get_array_module(logits) is not np:
        return softmax_cross_entropy_kernel(logits, targets, smoothing, grad_scale)
    targets, smoothing, scale = _check_softmax_cross_entropy(logits, targets, smoothing,
                                                             grad_scale)
    B, K = logits.shape
    m = logits.max(axis=1, keepdims=True)
    z = logits - m
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))            # B, K
    valid = (targets >= 0) & (targets < K)
    rows, t = np.arange(B), np.where(valid, targets, 0)
    nll = -logp[rows, t]                                                # B
    loss = (1 - smoothing) * nll - smoothing * logp.mean(axis=1) if smoothing else nll
    grad = np.exp(logp)
    if smoothing:
        grad -= smoothing / K
    grad[rows, t] -= 1 - smoothing
    grad *= scale
    correct = (logits.argmax(axis=1) == targets).astype(np.int32)
    loss[~valid] = np.nan
    grad[~valid] = np.nan
    return loss, grad, correct, np.array([0 if valid.all() else 1], dtype=np.int32)


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
    if getattr(logits, "ndim", None) != 2 or 0 in logits.shape:
        raise ShapeError(f"{name}: expected logits of shape (B, K), B, K >= 1, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    if logits.dtype.kind != "f":
        raise TypeError(f"{name}: expected floating-point logits, got {logits.dtype}")
    B = logits.shape[0]
    if getattr(targets, "shape", None) != (B,):
        raise ShapeError(f"{name}: expected targets of shape ({B},) for logits of shape "
                         f"{tuple(logits.shape)}, got "
                         f"{getattr(targets, 'shape', type(targets).__name__)}")
    if targets.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer class indices, got dtype {targets.dtype}")
    if not (_real(smoothing) and 0 <= smoothing <= 1):
        raise ValueError(f"{name}: smoothing must be a number in [0, 1], got {smoothing!r}")
    if grad_scale is not None and not (_real(grad_scale) and math.isfinite(grad_scale)):
        raise ValueError(f"{name}: grad_scale must be a finite number or None, got "
                         f"{grad_scale!r}")
    scale = 1.0 / B if grad_scale is None else float(grad_scale)
    return targets.astype(np.int64, copy=False), float(smoothing), scale


def _real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# --- Adam over every parameter tensor at once --------------------------------------------------

def pointer(a):
    """The address of array ``a``'s first element: device memory for CuPy, host for NumPy."""
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr


def adam_hyper(lr, betas, eps, weight_decay, step, decoupled, xp, dtype, out=None):
    """The hyper array (8,) of ``adam_multi_tensor`` for step ``step`` (1 on the first update).

    Entries: see ``ADAM_HYPER``. Each is computed in double as ``optim.Adam.step`` computes it
    and rounded once to ``dtype``, so the update uses exactly the constants of the NumPy
    optimizer (a float32 array times 1 - 0.9 is a product with float32(0.1), not with
    1 - float32(0.9)). ``decoupled``: AdamW. Made with ``xp``, or written into ``out`` in place
    (``out`` keeps its address, which a captured CUDA graph reads); returns it.
    """
    if not (isinstance(step, numbers.Integral) and step >= 1):
        raise ValueError(f"adam_hyper: step must be an integer >= 1, got {step!r}")
    b1, b2 = betas
    host = np.array([1 - b1, b2, 1 - b2, eps, 0.0 if decoupled else weight_decay,
                     lr / (1 - b1 ** step), math.sqrt(1 - b2 ** step),
                     1 - lr * weight_decay if decoupled else 1.0], dtype=dtype)
    if out is None:
        return xp.asarray(host)
    if getattr(out, "shape", None) != (8,) or out.dtype != host.dtype:
        raise ValueError(f"adam_hyper: out must be an array of shape (8,) and dtype {host.dtype},"
                         f" got {getattr(out, 'shape', type(out).__name__)} "
                         f"{getattr(out, 'dtype', '')}")
    if isinstance(out, np.ndarray):
        out[...] = host
    else:    # CuPy: an asynchronous copy into the same memory; a plain set() would wait for the GPU
        out.set(host, stream=get_array_module(out).cuda.get_current_stream())
    return out


class TensorTable:
    """The pointer table of a multi-tensor launch: for tensor j, the addresses of
    ``lists[0][j], lists[1][j], ...`` (uint64, on the arrays' module), the prefix sums of the
    tensors' sizes (offsets, int64, tensors+1) and their total.

    Made once and passed to every step, it spares the host-to-device copy of the table (which a
    CUDA graph could not capture). It keeps the arrays it points into alive, and ``matches``
    says whether it was made for these very arrays: a table of replaced arrays would point
    into freed memory.
    """

    def __init__(self, *lists):
        xp = get_array_module(lists[0][0])
        self.arrays = [list(arrays) for arrays in lists]
        sizes = [a.size for a in lists[0]]
        self.total = int(sum(sizes))
        self.pointers = xp.asarray(np.array([pointer(arrays[j]) for j in range(len(sizes))
                                             for arrays in lists], dtype=np.uint64))
        self.offsets = xp.asarray(np.cumsum([0] + sizes, dtype=np.int64))

    def matches(self, *lists):
        return len(lists) == len(self.arrays) and all(
            len(new) == len(old) and all(a is b for a, b in zip(new, old))
            for new, old in zip(lists, self.arrays))


def adam_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, hyper, table=None):
    """One Adam (or AdamW) step of every tensor, in place, the same arithmetic as
    ``optim.Adam.step`` in the same order (bit-identical to it).

    params, grads, exp_avgs, exp_avg_sqs: lists of C-contiguous arrays, the four of each index
    of one shape, all of the dtype of ``hyper``; hyper (8,) from ``adam_hyper``. ``table``: a
    ``TensorTable(params, grads, exp_avgs, exp_avg_sqs)`` to reuse (kernel path only; made
    afresh when None).
    """
    if get_array_module(hyper) is not np:
        return adam_multi_tensor_kernel(params, grads, exp_avgs, exp_avg_sqs, hyper, table)
    _check_adam(params, grads, exp_avgs, exp_avg_sqs, hyper)
    c1, b2, c2, eps, weight_decay, step_size, bias2_sqrt, decay = hyper.tolist()
    for p, grad, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if decay != 1:
            p *= decay
        g = grad
        if weight_decay:
            g = np.multiply(p, weight_decay)
            g += grad
        tmp = np.subtract(g, m)
        tmp *= c1
        m += tmp
        np.multiply(g, g, out=tmp)
        tmp *= c2
        v *= b2
        v += tmp
        np.sqrt(v, out=tmp)
        tmp /= bias2_sqrt
        tmp += eps
        np.divide(m, tmp, out=tmp)
        tmp *= step_size
        p -= tmp


def adam_multi_tensor_kernel(params, grads, exp_avgs, exp_avg_sqs, hyper, table=None,
                             launch=None):
    """``adam_multi_tensor`` by kernels/fused.cu: one launch, one thread per element of all the
    tensors together."""
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    _check_adam(*lists, hyper)
    if table is None:
        table = TensorTable(*lists)
    elif not table.matches(*lists):
        raise ValueError("adam_multi_tensor: table was made for other arrays; make a new "
                         "TensorTable(params, grads, exp_avgs, exp_avg_sqs) after replacing any")
    if table.total:
        (launch or cuda.launch)("fused.cu", "adam_multi_tensor", table.total, table.pointers,
                                table.offsets, len(params), hyper, table.total)


def _check_adam(params, grads, exp_avgs, exp_avg_sqs, hyper):
    name = "adam_multi_tensor"
    if getattr(hyper, "shape", None) != (8,) or hyper.dtype.kind != "f":
        raise ValueError(f"{name}: expected hyper, a floating-point array of shape (8,) from "
                         f"adam_hyper, got {getattr(hyper, 'shape', type(hyper).__name__)} "
                         f"{getattr(hyper, 'dtype', '')}")
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    counts = {key: len(value) for key, value in lists.items()}
    if len(set(counts.values())) != 1 or not params:
        raise ValueError(f"{name}: expected four lists of one length >= 1, got lengths {counts}")
    for j, p in enumerate(params):
        for key, arrays in lists.items():
            a = arrays[j]
            where = f"{name}: {key}[{j}]"
            if type(a) is not type(hyper):       # noqa: E721 -- one kind of array, one device
                raise TypeError(f"{where} is a {type(a).__module__}.{type(a).__name__}, but "
                                f"hyper is a {type(hyper).__module__}.{type(hyper).__name__}; "
                                "all must be arrays on one device")
            if a.dtype != hyper.dtype:
                raise TypeError(f"{where} has dtype {a.dtype}, expected that of hyper, "
                                f"{hyper.dtype}")
            if a.shape != p.shape:
                raise ShapeError(f"{where} has shape {tuple(a.shape)}, expected that of "
                                 f"params[{j}], {tuple(p.shape)}")
            if not a.flags.c_contiguous:
                raise ValueError(f"{where} must be C-contiguous, got strides {a.strides} for "
                                 f"shape {tuple(a.shape)}")
