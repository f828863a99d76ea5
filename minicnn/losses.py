"""Loss functions: forward returns a 0-d array that stays on the device, backward returns
d(loss)/d(input). Checking that the targets are valid class indices reads one flag back, which on
a GPU is a host sync per call."""
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
        if bool(((targets < 0) | (targets >= K)).any()):
            bad = targets[(targets < 0) | (targets >= K)]
            raise ValueError(f"CrossEntropyLoss: targets must be class indices in [0, {K}), "
                             f"got {bad[:5].tolist()}")
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))           # B, K
        rows = xp.arange(B)
        nll = -logp[rows, targets]                                          # B
        e = self.label_smoothing
        per_sample = (1 - e) * nll - e * logp.mean(axis=1) if e else nll
        self._cache = (logp, targets)
        return per_sample.mean(keepdims=True).reshape(())

    def backward(self):
        """d(mean loss)/d(logits), (B, K)."""
        if self._cache is None:
            raise RuntimeError("CrossEntropyLoss.backward called before the loss was computed")
        (logp, targets), self._cache = self._cache, None
        xp = get_array_module(logp)
        B, K = logp.shape
        grad = xp.exp(logp)
        e = self.label_smoothing
        if e:
            grad -= e / K
        grad[xp.arange(B), targets] -= 1 - e
        grad /= B
        return grad

    def __repr__(self):
        return f"CrossEntropyLoss(label_smoothing={self.label_smoothing})"
