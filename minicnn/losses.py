"""Loss functions: forward returns a 0-d array that stays on the device, backward returns
d(loss)/d(input). On a GPU nothing is read back: the check that the targets are class indices is
a device flag, raised by ``check()`` (see there)."""
import numpy as np

from . import fused
from .backend import get_array_module
from .module import ShapeError


class CrossEntropyLoss:
    """Mean cross-entropy of logits against class indices, as ``torch.nn.CrossEntropyLoss``.

    logits (B, K), targets (B,) ints in [0, K) -> loss, a 0-d array. With label smoothing e the
    target distribution is (1 - e) * one_hot + e / K. Computed through log-sum-exp, so large
    logits do not overflow. ``backward()`` returns dlogits (B, K) = (softmax - target) / B.
    """

    def __init__(self, label_smoothing=0.0):
        if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing <= 1):
            raise ValueError("CrossEntropyLoss: label_smoothing must be in [0, 1], "
                             f"got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self._cache = None
        self._invalid = None      # GPU: a device flag set by the loss kernel, read by check()

    def __call__(self, logits, targets):
        return self.forward(logits, targets)

    def forward(self, logits, targets):
        xp = get_array_module(logits)
        if getattr(logits, "ndim", None) != 2:
            raise ShapeError("CrossEntropyLoss: expected logits of shape (B, K), got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        B, K = logits.shape
        if getattr(targets, "shape", None) != (B,):
            raise ShapeError(f"CrossEntropyLoss: expected targets of shape ({B},) to match logits "
                             f"{tuple(logits.shape)}, got {getattr(targets, 'shape', type(targets).__name__)}")
        if targets.dtype.kind not in "iu":
            raise TypeError(f"CrossEntropyLoss: expected integer class indices, got dtype {targets.dtype}")
        per_sample, grad, _, invalid = fused.softmax_cross_entropy(logits, targets,
                                                                   self.label_smoothing)
        if xp is np:
            if invalid[0]:
                bad = targets[(targets < 0) | (targets >= K)]
                raise ValueError(f"CrossEntropyLoss: targets must be class indices in [0, {K}), "
                                 f"got {bad[:5].tolist()}")
        elif self._invalid is None or get_array_module(self._invalid) is not xp:
            self._invalid = invalid
        else:        # in place: a recorded CUDA graph keeps adding to the same flag
            xp.maximum(self._invalid, invalid, out=self._invalid)
        self._cache = grad
        return per_sample.mean(keepdims=True).reshape(())

    def backward(self):
        """d(mean loss)/d(logits), (B, K) = (softmax - target) / B, computed with the loss."""
        if self._cache is None:
            raise RuntimeError("CrossEntropyLoss.backward called before the loss was computed")
        grad, self._cache = self._cache, None
        return grad

    def check(self):
        """Raise ValueError if targets out of range reached this loss on a GPU since the last
        check, and clear the flag. The GPU path cannot stop at the bad batch without waiting for
        the device at every step; ``fit`` calls this whenever it reads the running loss. On the
        CPU the loss raises at once and this does nothing."""
        if self._invalid is not None and bool(self._invalid[0]):
            self._invalid[...] = 0
            raise ValueError("CrossEntropyLoss: targets must be class indices in [0, K) for K "
                             "classes, but a batch since the last check had others (their loss "
                             "and gradient rows are NaN)")

    def __repr__(self):
        return f"CrossEntropyLoss(label_smoothing={self.label_smoothing})"
