"""Loss functions: forward returns a 0-d array that stays on the device, backward returns
d(loss)/d(input). On a GPU nothing is read back: the check that the targets are class indices is
a device flag, raised by ``check()`` (see there)."""
import numpy as np

from .backend import get_array_module
from .module import ShapeError


def check_logits_and_targets(name, logits, targets):
    """Raise, naming ``name``, unless logits is (B, K) and targets (B,) integer class indices;
    -> (B, K)."""
    if getattr(logits, "ndim", None) != 2:
        raise ShapeError(f"{name}: expected logits of shape (B, K), got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    B, K = logits.shape
    if getattr(targets, "shape", None) != (B,):
        raise ShapeError(f"{name}: expected targets of shape ({B},) to match logits "
                         f"{tuple(logits.shape)}, got "
                         f"{getattr(targets, 'shape', type(targets).__name__)}")
    if targets.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer class indices, got dtype {targets.dtype}")
    return B, K


def cross_entropy(logits, targets, smoothing=0.0, grad_scale=None):
    """Cross-entropy of softmax(logits) against class indices, per sample, and its gradient.

    logits (B, K), targets (B,) ints -> loss (B,), grad (B, K), invalid (1,) int32. With label
    smoothing e the target distribution is q = (1 - e)*onehot(t) + e/K,
    loss = -sum_k q_k log softmax_k and grad = (softmax - q) * grad_scale, grad_scale 1/B by
    default (the gradient of the mean loss). A target outside [0, K) gives a NaN loss and a NaN
    grad row and invalid[0] = 1. Arrays of either backend; nothing is read back.
    """
    xp = get_array_module(logits)
    B, K = logits.shape
    valid = (targets >= 0) & (targets < K)
    t = xp.where(valid, targets, 0)                   # any class: the row becomes NaN below
    z = logits - logits.max(axis=1, keepdims=True)    # the largest is 0: exp cannot overflow
    logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))          # log softmax, (B, K)
    loss = -logp[xp.arange(B), t]
    if smoothing:    # (at e = 0 the mean is left out: it is -inf when a logit is -inf)
        loss = (1 - smoothing) * loss - smoothing * logp.mean(axis=1)
    onehot = (xp.arange(K) == t[:, None]).astype(logits.dtype)                       # B, K
    grad = xp.exp(logp) - smoothing / K - (1 - smoothing) * onehot                  # softmax - q
    grad *= 1 / B if grad_scale is None else grad_scale
    invalid = (~valid).any().astype(np.int32).reshape(1)
    return xp.where(valid, loss, np.nan), xp.where(valid[:, None], grad, np.nan), invalid


class CrossEntropyLoss:
    """Mean cross-entropy of logits against class indices, as ``torch.nn.CrossEntropyLoss``.

    logits (B, K), targets (B,) ints in [0, K) -> loss, a 0-d array. With label smoothing e the
    target distribution is (1 - e) * one_hot + e / K. Computed through log-sum-exp, so large
    logits do not overflow (``cross_entropy``). ``backward()`` returns
    dlogits (B, K) = (softmax - target) / B.
    """

    def __init__(self, label_smoothing=0.0):
        if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing <= 1):
            raise ValueError(f"{type(self).__name__}: label_smoothing must be in [0, 1], "
                             f"got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self._cache = None
        self._invalid = None      # GPU: a device flag of bad targets, read by check()

    def __call__(self, logits, targets):
        return self.forward(logits, targets)

    def forward(self, logits, targets):
        name = type(self).__name__
        xp = get_array_module(logits)
        B, K = check_logits_and_targets(name, logits, targets)
        per_sample, grad, invalid = self._per_sample(logits, targets)
        if xp is np:
            if invalid[0]:
                bad = targets[(targets < 0) | (targets >= K)]
                raise ValueError(f"{name}: targets must be class indices in [0, {K}), "
                                 f"got {bad[:5].tolist()}")
        elif self._invalid is None or get_array_module(self._invalid) is not xp:
            self._invalid = invalid
        else:        # in place: a recorded CUDA graph keeps adding to the same flag
            xp.maximum(self._invalid, invalid, out=self._invalid)
        self._cache = grad
        return per_sample.mean(keepdims=True).reshape(())

    def _per_sample(self, logits, targets):
        """(loss (B,), d(mean loss)/d(logits) (B, K), invalid flag (1,)): ``cross_entropy``."""
        return cross_entropy(logits, targets, self.label_smoothing)

    def backward(self):
        """d(mean loss)/d(logits), (B, K) = (softmax - target) / B, computed with the loss."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before the loss was "
                               "computed")
        grad, self._cache = self._cache, None
        return grad

    def check(self):
        """Raise ValueError if targets out of range reached this loss on a GPU since the last
        check, and clear the flag. The GPU path cannot stop at the bad batch without waiting for
        the device at every step; ``fit`` calls this whenever it reads the running loss. On the
        CPU the loss raises at once and this does nothing."""
        if self._invalid is not None and bool(self._invalid[0]):
            self._invalid[...] = 0
            raise ValueError(f"{type(self).__name__}: targets must be class indices in [0, K) "
                             "for K classes, but a batch since the last check had others (their "
                             "loss and gradient rows are NaN)")

    def __repr__(self):
        return f"{type(self).__name__}(label_smoothing={self.label_smoothing})"
