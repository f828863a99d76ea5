"""Classification metrics on NumPy or CuPy arrays: accuracy, confusion matrix, per-class accuracy.

Each takes its array module from its inputs (``get_array_module``), computes there, and
returns its arrays on the inputs' device. Checking the inputs reads a few numbers back to the
host (the smallest and largest class index), which is fine for metrics computed once per epoch.

``predictions`` may be a class array (N,) or the ``Prediction`` that ``minicnn.predict``
returns (its ``classes`` are used).
"""
import numpy as np

from .backend import device_of, get_array_module
from .errors import ShapeError


def _classes(values, name, fn):
    """``values`` as a 1-D integer array (a Prediction gives its classes), else a clear error."""
    values = getattr(values, "classes", values)
    if not (hasattr(values, "ndim") and hasattr(values, "dtype")):
        raise TypeError(f"{fn}: expected {name} to be a NumPy or CuPy array of class indices, "
                        f"got {type(values).__name__}")
    if values.ndim != 1:
        raise ShapeError(f"{fn}: expected {name} of shape (N,), got shape {tuple(values.shape)}"
                         + ("; for logits or probabilities (N, K) pass their argmax(axis=1)"
                            if values.ndim == 2 else ""))
    if values.dtype.kind not in "iu":
        raise TypeError(f"{fn}: expected integer class indices in {name}, got dtype "
                        f"{values.dtype}")
    return values


def _pair(targets, predictions, fn):
    targets = _classes(targets, "targets", fn)
    predictions = _classes(predictions, "predictions", fn)
    if targets.shape != predictions.shape:
        raise ShapeError(f"{fn}: expected targets and predictions of the same shape, got "
                         f"{tuple(targets.shape)} and {tuple(predictions.shape)}")
    if device_of(targets) != device_of(predictions):
        raise ValueError(f"{fn}: targets are on {device_of(targets)} but predictions on "
                         f"{device_of(predictions)}; move one of them (minicnn.to_device)")
    return targets, predictions


def accuracy(targets, predictions):
    """The fraction of ``predictions`` (N,) equal to ``targets`` (N,), as a Python float."""
    targets, predictions = _pair(targets, predictions, "accuracy")
    if targets.size == 0:
        raise ValueError("accuracy: expected at least one sample, got none")
    return float((targets == predictions).mean())


def confusion_matrix(targets, predictions, num_classes=None):
    """Counts (K, K) int64 on the inputs' device: row i, column j is how many samples of true
    class i were predicted as class j (rows true, columns predicted, as scikit-learn's).

    ``targets`` and ``predictions``: (N,) integer class indices in 0..K-1. ``num_classes`` K
    defaults to one more than the largest index in either.
    """
    fn = "confusion_matrix"
    targets, predictions = _pair(targets, predictions, fn)
    if num_classes is not None and (isinstance(num_classes, bool) or
                                    not isinstance(num_classes, (int, np.integer))
                                    or num_classes < 1):
        raise ValueError(f"{fn}: expected num_classes a positive int or None, got "
                         f"{num_classes!r}")
    xp = get_array_module(targets)
    if targets.size == 0:
        if num_classes is None:
            raise ValueError(f"{fn}: no samples, so num_classes must be given")
        return xp.zeros((num_classes, num_classes), dtype=np.int64)
    low = min(int(targets.min()), int(predictions.min()))
    high = max(int(targets.max()), int(predictions.max()))
    if low < 0:
        raise ValueError(f"{fn}: expected class indices >= 0, got {low}")
    k = high + 1 if num_classes is None else int(num_classes)
    if high >= k:
        raise ValueError(f"{fn}: expected class indices below num_classes={k}, got {high}")
    # One count per (true, predicted) pair: the flat index true * K + predicted.
    flat = targets.astype(np.int64) * k + predictions.astype(np.int64)
    return xp.bincount(flat, minlength=k * k).reshape(k, k).astype(np.int64, copy=False)


def per_class_accuracy(cm_or_targets, predictions=None, num_classes=None):
    """Accuracy of each class (K,) float64: the diagonal of the confusion matrix over its row
    sums, i.e. the fraction of each true class predicted right (its recall).

    Either a confusion matrix (K, K) alone, or ``targets`` and ``predictions`` (N,) (then
    ``num_classes`` as in ``confusion_matrix``). A class with no samples gets NaN. On the
    inputs' device.
    """
    fn = "per_class_accuracy"
    if predictions is None:
        cm = cm_or_targets
        if num_classes is not None:
            raise ValueError(f"{fn}: num_classes goes with targets and predictions, not with a "
                             "confusion matrix")
        if not (hasattr(cm, "ndim") and hasattr(cm, "dtype")):
            raise TypeError(f"{fn}: expected a confusion matrix array (K, K) or targets and "
                            f"predictions, got {type(cm).__name__}")
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
            raise ShapeError(f"{fn}: expected a square confusion matrix (K, K), got shape "
                             f"{tuple(cm.shape)}; pass targets and predictions (N,) as two "
                             "arguments")
        if cm.dtype.kind not in "iuf" or bool((cm < 0).any()):
            raise ValueError(f"{fn}: expected a confusion matrix of non-negative counts, got "
                             f"dtype {cm.dtype}" + ("" if cm.dtype.kind not in "iuf"
                                                    else " with negative entries"))
    else:
        cm = confusion_matrix(cm_or_targets, predictions, num_classes)
    xp = get_array_module(cm)
    cm = cm.astype(np.float64)
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return xp.where(totals > 0, xp.diagonal(cm) / xp.where(totals > 0, totals, 1), xp.nan)
