"""Data augmentation on whole batches, on the batch's own device.

Each transform takes a batch ``x`` (B, C, H, W), NumPy or CuPy, and returns a new array on the
same device; ``x`` is never changed. The random choices (B crop offsets, B flip flags) are drawn
from ``minicnn.rng()`` on the host and moved to the device, so a CPU run and a GPU run of one
seed crop and flip identically. The work is one vectorised gather per batch: no loop over the
samples.

    loader = minicnn.DataLoader(train, batch_size=128, shuffle=True, device="cuda")
    train_batches = augment.batches(loader, augment.random_crop, augment.random_flip)
    minicnn.fit(model, loss_fn, optimizer, train_batches, epochs=30)

Use ``functools.partial`` (or a lambda) for other settings, e.g.
``partial(augment.random_crop, size=28, padding=2)``.
"""
import numbers

import numpy as np

from .backend import get_array_module, rng


def _check_batch(fn, x):
    if not hasattr(x, "ndim") or x.ndim != 4:
        got = f"shape {tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__
        raise ValueError(f"{fn}: expected x a batch of shape (B, C, H, W), got {got}")


def _check_int(fn, name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{fn}: expected {name} an integer >= {low}, got {value!r}")
    return int(value)


def random_crop(x, size=32, padding=4, fill=0.0):
    """Random ``size`` x ``size`` crops (or ``size=(h, w)``) of ``x`` padded by ``padding``.

    ``x`` (B, C, H, W) is padded with ``fill`` on every side of H and W, then each sample is
    cropped at its own offset: ``top`` uniform in 0..H + 2*padding - h and ``left`` in
    0..W + 2*padding - w, drawn from ``minicnn.rng()`` as ``integers(0, ..., size=B)``, all tops
    first, then all lefts. Returns (B, C, h, w) in ``x``'s dtype, on ``x``'s device. With
    ``padding=0`` and ``size`` equal to (H, W) it returns a copy of ``x``.

    The fill of 0 is the training mean for standardised data (torchvision pads raw pixels, so
    with black before normalising).
    """
    fn = "random_crop"
    _check_batch(fn, x)
    h, w = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    h, w = _check_int(fn, "size", h, 1), _check_int(fn, "size", w, 1)
    p = _check_int(fn, "padding", padding, 0)
    b, c, height, width = x.shape
    if h > height + 2 * p or w > width + 2 * p:
        raise ValueError(f"{fn}: expected size at most the padded image "
                         f"({height + 2 * p}, {width + 2 * p}), got ({h}, {w})")
    xp = get_array_module(x)
    g = rng()
    top = g.integers(0, height + 2 * p - h + 1, size=b)
    left = g.integers(0, width + 2 * p - w + 1, size=b)
    padded = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=fill) if p else x
    # out[i, ch, r, s] = padded[i, ch, top[i] + r, left[i] + s]
    rows = xp.asarray(top[:, None] + np.arange(h))              # B,h
    cols = xp.asarray(left[:, None] + np.arange(w))             # B,w
    return padded[xp.arange(b)[:, None, None, None], xp.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]  # B,C,h,w


def random_flip(x, p=0.5):
    """Flip each sample of ``x`` (B, C, H, W) left-right with probability ``p``.

    The flags are ``minicnn.rng().random(B) < p`` (B numbers are drawn whatever ``p``). Returns
    a new array of ``x``'s shape and dtype on ``x``'s device.
    """
    fn = "random_flip"
    _check_batch(fn, x)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
        raise ValueError(f"{fn}: expected p a probability in [0, 1], got {p!r}")
    xp = get_array_module(x)
    flip = xp.asarray(rng().random(x.shape[0]) < p)             # B
    return xp.where(flip[:, None, None, None], x[:, :, :, ::-1], x)


class Augmented:
    """A loader whose x batches pass through ``transforms``; made by ``batches``.

    Iterable once per epoch like the loader it wraps (each ``iter()`` starts a new pass, with a
    new shuffle), with the same ``len()``, ``dataset`` and ``device``, so ``fit`` takes it in
    place of the loader.
    """

    def __init__(self, loader, transforms):
        for t in transforms:
            if not callable(t):
                raise TypeError(f"batches: expected transforms to be callables x -> x, "
                                f"got {type(t).__name__}")
        self.loader = loader
        self.transforms = tuple(transforms)

    def __iter__(self):
        return self._augmented(self.loader)

    def iter_from(self, order, start=0):
        """The wrapped loader's ``iter_from(order, start)``, augmented (``fit`` resumes with it)."""
        return self._augmented(self.loader.iter_from(order, start))

    @property
    def last_order(self):
        """The wrapped loader's ``last_order``."""
        return self.loader.last_order

    def _augmented(self, batches):
        for x, y in batches:
            for t in self.transforms:
                x = t(x)
            yield x, y

    def __len__(self):
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def device(self):
        return self.loader.device

    def __repr__(self):
        names = ", ".join(getattr(t, "__name__", repr(t)) for t in self.transforms)
        return f"augment.batches({self.loader!r}, {names})"


def batches(loader, *transforms):
    """``loader``'s (x, y) batches with each x passed through ``transforms`` in order.

    A transform is any callable x -> x (``random_crop``, ``random_flip``, a ``functools.partial``
    of them, your own). The labels pass unchanged. Returns an ``Augmented``: iterate it once per
    epoch (or give it to ``fit``), like the loader.
    """
    return Augmented(loader, transforms)
