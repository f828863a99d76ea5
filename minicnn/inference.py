"""Prediction: a trained model's classes and probabilities for many inputs, in batches.

``predict(model, x)`` is evaluation mode, one batch at a time, the softmax of each batch's logits
computed stably (shifted by the row's maximum, so exp never overflows), and nothing kept between
batches but the answers.
"""
from collections import namedtuple

import numpy as np
from tqdm.auto import tqdm

from .backend import device_of, get_array_module
from .errors import ShapeError
from .module import Module, restore_modes, training_modes

# Inputs of this many batches or more get a progress bar (with progress=True).
PROGRESS_MIN_BATCHES = 10


class Prediction(namedtuple("Prediction", ["classes", "probabilities"])):
    """What ``predict`` returns: ``classes`` (N,) int64, the most probable class of each input,
    and ``probabilities`` (N, K), the softmax of the logits (rows sum to 1), both on the input's
    device. Unpacks as a pair: ``classes, probs = minicnn.predict(model, x)``."""

    __slots__ = ()


def softmax(logits):
    """Row-wise softmax of logits (B, K) -> (B, K), in at least float32, on their device.

    Each row is shifted by its maximum first: exp(z - max) never overflows and the result is the
    same, since the shift cancels in the ratio."""
    xp = get_array_module(logits)
    z = logits.astype(np.promote_types(logits.dtype, np.float32))
    z = z - z.max(axis=1, keepdims=True)
    e = xp.exp(z)
    e /= e.sum(axis=1, keepdims=True)
    return e


def _images(x):
    """The array of ``x``: an array itself, or a dataset's ``images`` (an ``ArrayDataset``)."""
    if hasattr(x, "images") and not hasattr(x, "ndim"):
        x = x.images
    if not (hasattr(x, "ndim") and hasattr(x, "dtype") and hasattr(x, "shape")):
        raise TypeError(f"predict: expected x to be a NumPy or CuPy array (N, ...) or a dataset "
                        f"with an images array, got {type(x).__name__}")
    return x


def predict(model, x, batch_size=256, progress=True):
    """Classes and probabilities of ``model`` for every sample of ``x``, in batches.

    ``x``: an array (N, C, H, W) (any shape the model takes, N first) on the model's device, or
    a dataset with such an ``images`` array (``ArrayDataset``, ``MNIST``). Runs in eval mode and
    puts every module's mode back afterwards; eval mode caches nothing, so memory does not grow
    with N beyond the (N,) and (N, K) results. Returns ``Prediction(classes, probabilities)``
    on x's device: classes (N,) int64 (the argmax of the logits), probabilities (N, K) softmax
    (float32, or float64 for a float64 model). ``progress``: a bar from
    ``PROGRESS_MIN_BATCHES`` batches on.
    """
    if not isinstance(model, Module):
        raise TypeError(f"predict: expected a minicnn Module as model, got {type(model).__name__}")
    x = _images(x)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"predict: expected batch_size an integer >= 1, got {batch_size!r}")
    if x.ndim < 2:
        raise ShapeError(f"predict: expected x of shape (N, ...) with a batch dimension first, "
                         f"got shape {tuple(x.shape)}; for one sample pass x[None]")
    if x.dtype.kind != "f":
        raise TypeError(f"predict: expected floating-point inputs, got dtype {x.dtype}; convert "
                        f"them as the dataset does (e.g. x.astype(np.float32), scaled and "
                        f"normalised)")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError(f"predict: expected at least one sample, got shape {tuple(x.shape)}")
    params = model.parameters()
    if params and params[0].device != device_of(x):
        raise ValueError(f"predict: x is on {device_of(x)} but the model is on "
                         f"{params[0].device}; move one of them (minicnn.to_device(x, "
                         f"model.device) or model.to(...))")
    xp = get_array_module(x)
    batches = range(0, n, int(batch_size))
    classes = probabilities = None
    modes = training_modes(model)
    model.eval()
    try:
        bar = tqdm(batches, desc="predict", unit="batch", leave=False,
                   disable=not progress or len(batches) < PROGRESS_MIN_BATCHES)
        for start in bar:
            logits = model(x[start:start + batch_size])
            if logits.ndim != 2 or logits.shape[0] != min(batch_size, n - start):
                raise ShapeError(f"predict: expected the model to output logits (B, K), one row "
                                 f"per input, got shape {tuple(logits.shape)} for a batch of "
                                 f"{min(batch_size, n - start)}")
            probs = softmax(logits)
            if classes is None:
                classes = xp.empty(n, dtype=np.int64)
                probabilities = xp.empty((n, logits.shape[1]), dtype=probs.dtype)
            stop = start + logits.shape[0]
            classes[start:stop] = logits.argmax(axis=1)
            probabilities[start:stop] = probs
    finally:
        restore_modes(modes)
    return Prediction(classes, probabilities)
