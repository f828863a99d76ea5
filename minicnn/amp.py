"""Mixed precision: ``autocast`` (fp16 matrix products) and ``GradScaler`` (loss scaling).

    model = minicnn.models.resnet18()
    scaler = minicnn.GradScaler()
    with minicnn.autocast():
        logits = model(x)                     # Conv2d/Linear products: fp16 operands, fp32 sums
    loss = loss_fn(logits, y)
    optimizer.zero_grad()
    model.backward(scaler.scale(loss_fn.backward()), input_grad=False)
    scaler.step(optimizer)                    # unscales; skips the step on inf/NaN gradients
    scaler.update()                           # halves the scale after a skip, grows it slowly

``minicnn.fit(..., precision="fp16")`` does exactly this.

Under ``autocast()`` the products of float32 ``Conv2d`` and ``Linear`` (forward, and both
gradients of backward) take float16 operands and sum in float32, as tensor cores do; a layer asks
``policy(dtype)`` once per forward and its backward follows that answer. Everything else stays
float32, and float64 layers are left alone. ``autocast`` is one switch per process, not per
thread. ``GradScaler`` scales the loss gradient so small gradients survive float16, and skips a
step whose gradients hold inf or NaN. docs/amp.md explains both, and how the CPU and the GPU
compute the products.
"""
import functools
import math
import numbers

import numpy as np

from . import ops
from .backend import get_array_module

_enabled = False
_dtype = np.dtype(np.float16)


# --- autocast ----------------------------------------------------------------------------------

class autocast:
    """Context manager (and decorator) under which Conv2d and Linear multiply in float16.

    ``enabled=False`` turns autocast off inside the block (for a part of a model that must stay
    float32). Blocks nest; leaving one restores the state from before it, even on an exception.
    The state is one process-wide global, not per thread. ``dtype`` must be float16 (NumPy has no
    bfloat16).
    """

    def __init__(self, enabled=True, dtype=np.float16):
        if not isinstance(enabled, (bool, np.bool_)):
            raise TypeError(f"autocast: enabled must be True or False, got {enabled!r}")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt != np.float16:
            raise ValueError(f"autocast: dtype must be float16 (the only half type NumPy and CuPy "
                             f"have), got {dtype!r}")
        self.enabled = bool(enabled)
        self.dtype = dt
        self._saved = []          # a stack, so the same object may be entered while inside it

    def __enter__(self):
        global _enabled, _dtype
        self._saved.append((_enabled, _dtype))
        _enabled, _dtype = self.enabled, self.dtype
        return self

    def __exit__(self, *exc):
        global _enabled, _dtype
        _enabled, _dtype = self._saved.pop()
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with autocast(self.enabled, self.dtype):
                return fn(*args, **kwargs)
        return wrapper

    def __repr__(self):
        return f"autocast(enabled={self.enabled}, dtype={self.dtype.name})"


def is_autocast_enabled():
    """True inside an ``autocast()`` block (and not inside an ``autocast(enabled=False)``)."""
    return _enabled


def get_autocast_dtype():
    """The operand dtype of autocast: numpy.float16."""
    return _dtype


def enabled_for(dtype):
    """True when a layer computing in ``dtype`` should use float16 products now: autocast is on
    and ``dtype`` is float32 (float64 and float16 layers are left as they are)."""
    return _enabled and dtype == np.float32


# --- the products ------------------------------------------------------------------------------

def half(x):
    """``x`` as a float16 operand of a product: its values rounded to float16.

    On the GPU a float16 array (half the memory); on the CPU a float32 array holding the rounded
    values, ready for sgemm: ``x.astype(float16).astype(float32)``, computed for float32 input by
    ``round_to_half``. Values of 65520 and above become inf and NaN stays NaN, on both.
    """
    if get_array_module(x) is not np:
        return x.astype(np.float16, copy=False)
    if x.dtype == np.float32:
        return round_to_half(x)
    with np.errstate(over="ignore"):         # inf is the expected answer (GradScaler checks)
        return x.astype(np.float16).astype(np.float32)


# Bits of |x| (float32), which order like |x|: from 65520 up float16 rounds to inf (inf and NaN
# are above too); below 2^-14, its smallest normal number, float16 is subnormal.
_INF_BITS = np.uint32(0x477FF000)
_TINY_BITS = np.uint32(0x38800000)


def round_to_half(x):
    """float32 ``x`` (NumPy) rounded to the nearest float16 value, ties to even, as float32.

    Bit for bit ``x.astype(np.float16).astype(np.float32)`` (checked on all 2^32 float32 bit
    patterns; tests/test_amp.py checks a sample), but several times faster: NumPy converts to
    float16 one element at a time, slowest on tiny and huge values. Normal range: drop the low 13
    of the 23 mantissa bits, rounding to nearest even (add 0xFFF plus the lowest kept bit, then
    truncate). Below 2^-14 float16 is subnormal, with a fixed spacing of 2^-24: there
    ``(x + 0.75) - 0.75`` rounds to that spacing. From 65520 up: inf; NaN stays NaN.
    """
    u = x.view(np.uint32)
    r = u >> np.uint32(13)
    r &= np.uint32(1)                        # the lowest mantissa bit kept: ties go to even
    r += np.uint32(0x0FFF)
    r += u
    r &= np.uint32(0xFFFFE000)
    y = r.view(np.float32)                   # 11 significant bits
    m = u & np.uint32(0x7FFFFFFF)            # |x| as bits
    top = m.max() if m.size else 0
    m -= np.uint32(1)                        # 0 wraps around to the top: zeros are not tiny
    tiny = m < _TINY_BITS - np.uint32(1)     # 0 < |x| < 2^-14: few, fixed one by one
    with np.errstate(invalid="ignore", over="ignore"):     # signalling NaNs
        if tiny.any():
            xt = x[tiny]
            st = xt + np.float32(0.75)
            st -= np.float32(0.75)           # a multiple of 2^-24
            y[tiny] = np.copysign(st, xt)    # -0.0 for tiny negative values, as astype gives
        if top >= _INF_BITS:                 # overflow, inf or NaN somewhere: rare
            big = (u & np.uint32(0x7FFFFFFF)) >= _INF_BITS
            xb = x[big]
            y[big] = np.where(np.isnan(xb), xb, np.copysign(np.float32(np.inf), xb))
    return y


def matmul_half(a, b):
    """``a @ b`` for operands already made by ``half``, summed in float32 -> float32 (2-D)."""
    if get_array_module(a) is np:
        with np.errstate(over="ignore", invalid="ignore"):   # inf operands: GradScaler's job
            return a @ b                                # sgemm on fp16-valued float32 operands
    return (a @ b).astype(np.float32)                   # cuBLAS: fp16 in, fp32 compute, fp16 out


def matmul(a, b):
    """``a @ b`` with float16 operands and float32 accumulation, returned in float32.

    ``a`` (M, K) and ``b`` (K, N) are floating arrays of one backend (any float dtype; rounded to
    float16 here). CPU: ``a.astype(float16).astype(float32) @ b.astype(float16).astype(float32)``,
    an sgemm whose products are exact; GPU: ``cupy.matmul`` of float16 arrays (float32 compute,
    float16 result) widened to float32.
    """
    return matmul_half(half(a), half(b))


# --- the precision policy a layer asks for --------------------------------------------------------

class Policy:
    """How a layer multiplies: ``operand(a)`` is a factor as the products take it, and
    ``matmul(a, b)`` the product of two operands. A layer asks ``policy(dtype)`` once per
    forward and keeps the answer for its backward, so backward multiplies as its forward did.

    This policy multiplies the arrays as they are, by ``ops.matmul``.
    """

    def operand(self, a):
        return a

    def matmul(self, a, b):
        return ops.matmul(a, b)

    def __repr__(self):
        return f"{type(self).__name__}()"


class Float16Operands(Policy):
    """Autocast's products: float16 operands (``half``), float32 sums (``matmul_half``)."""

    def operand(self, a):
        return half(a)

    def matmul(self, a, b):
        return matmul_half(a, b)


_AS_GIVEN, _FLOAT16 = Policy(), Float16Operands()


def policy(dtype):
    """The precision policy of a layer computing in ``dtype`` now: ``Float16Operands`` inside
    ``autocast()`` for a float32 layer (``enabled_for``), else ``Policy`` (the arrays as they
    are)."""
    return _FLOAT16 if enabled_for(dtype) else _AS_GIVEN


# --- loss scaling ------------------------------------------------------------------------------

_READY, _UNSCALED, _STEPPED = "ready", "unscaled", "stepped"


def _positive_float(owner, name, value, above=0.0, below=None):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value > above and (below is None or value < below)
    if not ok:
        bound = f"> {above}" + ("" if below is None else f" and < {below}")
        raise ValueError(f"{owner}: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _count(owner, name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _as_float32(value):
    """A scale as PyTorch keeps it: a float32 number (held here as a Python float)."""
    return float(np.float32(value))


class GradScaler:
    """Dynamic loss scaling for fp16 training with manual backward (PyTorch's GradScaler rules).

    Per step::

        model.backward(scaler.scale(dlogits))   # loss gradient times the scale
        scaler.unscale_(optimizer)              # optional: grads / scale, e.g. to clip them
        scaler.step(optimizer)                  # unscales if not done; skips on inf/NaN
        scaler.update()                         # adjusts the scale for the next step

    ``scale(x)`` returns ``x * scale`` (an array, a number, or a list/tuple of them; ``x`` is not
    changed): give it the loss gradient, or the loss to log the scaled value. ``unscale_`` divides
    the gradient of every parameter of ``optimizer`` that has ``requires_grad`` by the scale, in
    place, once per step, and notes on the device whether any holds inf or NaN (a sum per gradient
    and one sum of those: inf or NaN anywhere makes the total non-finite). ``step`` reads that note
    -- the one host sync of the step -- and calls ``optimizer.step()`` only if all are finite;
    otherwise parameters and optimizer state are left untouched. ``update`` multiplies the scale
    by ``backoff_factor`` after a skipped step, and by ``growth_factor`` after ``growth_interval``
    consecutive good steps (a product that would overflow float32 is not taken). The scale is a
    float32 number, as in PyTorch.

    As in PyTorch: ``unscale_`` twice between updates, or after ``step``, raises RuntimeError, as
    does ``step`` twice; ``update`` needs a ``step`` or ``unscale_`` first; float16 gradients are
    refused (keep float32 master weights); ``enabled=False`` makes every method a pass-through
    (``scale`` returns its input, ``step`` just steps). One scaler may serve several optimizers:
    a skip in any of them backs the scale off.
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        owner = "GradScaler"
        if not isinstance(enabled, (bool, np.bool_)):
            raise TypeError(f"{owner}: enabled must be True or False, got {enabled!r}")
        self._enabled = bool(enabled)
        self._scale = _as_float32(_positive_float(owner, "init_scale", init_scale))
        self._growth_factor = _positive_float(owner, "growth_factor", growth_factor, above=1.0)
        self._backoff_factor = _positive_float(owner, "backoff_factor", backoff_factor, below=1.0)
        self._growth_interval = _count(owner, "growth_interval", growth_interval, 1)
        self._growth_tracker = 0
        self._per_optimizer = {}     # id(optimizer) -> {"stage", "found_inf"}

    # --- the step ------------------------------------------------------------------------------

    def scale(self, outputs):
        """``outputs * scale``: the loss gradient (or the loss) scaled. Arrays keep their dtype
        and device; lists and tuples are scaled element by element. Returned unchanged when the
        scaler is disabled."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if isinstance(outputs, numbers.Real) and not isinstance(outputs, bool):
            return outputs * self._scale
        dtype = getattr(outputs, "dtype", None)
        if dtype is None or not hasattr(outputs, "shape"):
            raise TypeError(f"GradScaler.scale: expected an array (the loss gradient or the "
                            f"loss), got {type(outputs).__name__}")
        if np.dtype(dtype).kind != "f":
            raise TypeError(f"GradScaler.scale: expected a floating-point array, got dtype {dtype}")
        return outputs * self._scale

    def unscale_(self, optimizer):
        """Divide the gradients of ``optimizer``'s parameters by the scale, in place, and note
        whether any of them holds inf or NaN. At most once per optimizer between updates."""
        if not self._enabled:
            return
        state = self._state(optimizer, "unscale_")
        if state["stage"] == _UNSCALED:
            raise RuntimeError("GradScaler.unscale_: unscale_() has already been called on this "
                               "optimizer since the last update()")
        if state["stage"] == _STEPPED:
            raise RuntimeError("GradScaler.unscale_: unscale_() is being called after step(); "
                               "call update() first")
        inv_scale = _as_float32(1.0 / self._scale)     # exact for the powers of two of the scale
        grads = [p.grad for p in optimizer.params if p.requires_grad]
        for g in grads:
            if g.dtype == np.float16:
                raise ValueError("GradScaler.unscale_: got float16 gradients; keep the parameters "
                                 "in float32 (master weights) and train under autocast")
        sums = []
        with np.errstate(over="ignore", invalid="ignore"):   # inf and NaN are what we look for
            for g in grads:
                g *= inv_scale
                sums.append(g.sum())
            if sums:
                xp = get_array_module(grads[0])
                # inf or NaN in any gradient makes its sum, and the total, inf or NaN
                state["found_inf"] = ~xp.isfinite(xp.stack([xp.asarray(s) for s in sums]).sum())
            else:
                state["found_inf"] = False
        state["stage"] = _UNSCALED

    def step(self, optimizer):
        """Unscale (unless ``unscale_`` was called), then ``optimizer.step()`` if every gradient
        is finite; else skip it. Returns what ``optimizer.step()`` returned, or None if skipped."""
        if not self._enabled:
            return optimizer.step()
        state = self._state(optimizer, "step")
        if state["stage"] == _STEPPED:
            raise RuntimeError("GradScaler.step: step() has already been called since the last "
                               "update()")
        if state["stage"] == _READY:
            self.unscale_(optimizer)
        state["found_inf"] = bool(state["found_inf"])     # the one host sync of the step
        state["stage"] = _STEPPED
        if state["found_inf"]:
            return None
        return optimizer.step()

    def update(self, new_scale=None):
        """Set the scale for the next step: ``new_scale`` if given, else back off after a skipped
        step or grow after ``growth_interval`` good ones. Starts a new step for every optimizer."""
        if not self._enabled:
            return
        if new_scale is not None:
            self._scale = _as_float32(_positive_float("GradScaler.update", "new_scale", new_scale))
        else:
            checked = [s["found_inf"] for s in self._per_optimizer.values() if s["stage"] != _READY]
            if not checked:
                raise RuntimeError("GradScaler.update: no inf checks were recorded before "
                                   "update(); call scaler.step(optimizer) (or unscale_) first")
            if any(bool(f) for f in checked):
                self._scale = _as_float32(self._scale * self._backoff_factor)
                self._growth_tracker = 0
            else:
                self._growth_tracker += 1
                if self._growth_tracker == self._growth_interval:
                    grown = _as_float32(self._scale * self._growth_factor)
                    if math.isfinite(grown):
                        self._scale = grown
                    self._growth_tracker = 0
        self._per_optimizer = {}

    def _state(self, optimizer, method):
        if not hasattr(optimizer, "params") or not callable(getattr(optimizer, "step", None)):
            raise TypeError(f"GradScaler.{method}: expected a minicnn optimizer, "
                            f"got {type(optimizer).__name__}")
        return self._per_optimizer.setdefault(id(optimizer), {"stage": _READY, "found_inf": None})

    # --- settings and state --------------------------------------------------------------------

    def is_enabled(self):
        return self._enabled

    def get_scale(self):
        """The current scale as a Python float (1.0 when disabled). No device sync."""
        return self._scale if self._enabled else 1.0

    def get_growth_factor(self):
        return self._growth_factor

    def set_growth_factor(self, new_factor):
        self._growth_factor = _positive_float("GradScaler", "growth_factor", new_factor, above=1.0)

    def get_backoff_factor(self):
        return self._backoff_factor

    def set_backoff_factor(self, new_factor):
        self._backoff_factor = _positive_float("GradScaler", "backoff_factor", new_factor,
                                               below=1.0)

    def get_growth_interval(self):
        return self._growth_interval

    def set_growth_interval(self, new_interval):
        self._growth_interval = _count("GradScaler", "growth_interval", new_interval, 1)

    def state_dict(self):
        """PyTorch's keys, JSON-able: {"scale", "growth_factor", "backoff_factor",
        "growth_interval", "_growth_tracker"}; {} when disabled."""
        if not self._enabled:
            return {}
        return {"scale": self._scale, "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state_dict):
        """Restore ``state_dict()`` output (ours or PyTorch's GradScaler's). Everything is
        checked before anything changes. Does nothing when disabled."""
        if not self._enabled:
            return
        owner = "GradScaler.load_state_dict"
        if not isinstance(state_dict, dict):
            raise TypeError(f"{owner}: expected a dict from state_dict(), "
                            f"got {type(state_dict).__name__}")
        if not state_dict:
            raise RuntimeError(f"{owner}: the state dict is empty, possibly because it was saved "
                               "from a disabled GradScaler")
        keys = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise ValueError(f"{owner}: state is missing the entries {missing}")
        scale = _as_float32(_positive_float(owner, "scale", state_dict["scale"]))
        growth = _positive_float(owner, "growth_factor", state_dict["growth_factor"], above=1.0)
        backoff = _positive_float(owner, "backoff_factor", state_dict["backoff_factor"], below=1.0)
        interval = _count(owner, "growth_interval", state_dict["growth_interval"], 1)
        tracker = _count(owner, "_growth_tracker", state_dict["_growth_tracker"], 0)
        if tracker >= interval:
            raise ValueError(f"{owner}: _growth_tracker must be below growth_interval "
                             f"({interval}), got {tracker}")
        self._scale, self._growth_factor, self._backoff_factor = scale, growth, backoff
        self._growth_interval, self._growth_tracker = interval, tracker

    def __repr__(self):
        if not self._enabled:
            return "GradScaler(enabled=False)"
        return (f"GradScaler(scale={self._scale}, growth_factor={self._growth_factor}, "
                f"backoff_factor={self._backoff_factor}, "
                f"growth_interval={self._growth_interval}, growth_tracker={self._growth_tracker})")
