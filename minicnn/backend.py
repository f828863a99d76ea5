"""Backends, the default dtype and the one random generator.

An array's backend is read from the array itself (``get_array_module(x)``, as Chainer does), never
from a global, so the same layer code runs on NumPy arrays and on CuPy arrays. CuPy is imported
only when "cuda" is asked for or a CuPy array is met: minicnn works with no CuPy installed.
"""
import ctypes
import os
import sys

import numpy as np

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_default_dtype = np.dtype(np.float32)
_rng = np.random.default_rng(0)
_auto_announced = False


class DeviceError(RuntimeError):
    """Raised when a device is asked for that this machine cannot give, with the reason."""


# --- host memory -------------------------------------------------------------------------------

def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees ~100 MB of large arrays. By default glibc maps each one
    fresh and returns it when freed, so every step touches thousands of new pages, each a page
    fault: a third of a CPU step on a 2-core machine. Called once when minicnn is imported, on
    Linux with glibc (a no-op elsewhere); set MINICNN_KEEP_FREED_MEMORY=0 to opt out. Returns
    whether the setting was applied.
    """
    if os.environ.get("MINICNN_KEEP_FREED_MEMORY") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # glibc's largest mmap threshold (32 MiB on 64-bit): arrays below it come from the heap, and a
    # trim threshold of 1 GiB keeps freed heap memory around for the next step.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


# --- dtype and randomness ----------------------------------------------------------------------

def set_default_dtype(dtype):
    """Set the dtype new parameters and loaded datasets are made in (float32 unless changed)."""
    global _default_dtype
    dt = np.dtype(dtype)
    if dt.type not in _FLOAT_DTYPES:
        raise TypeError(f"set_default_dtype: expected float16, float32 or float64, got {dt}")
    _default_dtype = dt


def get_default_dtype():
    """The dtype new parameters are made in: numpy.float32 by default."""
    return _default_dtype


def seed(n):
    """Reseed the one host-side generator behind weight init, dropout masks and shuffling.

    Arrays are drawn on the host and then moved, so a CPU run and a GPU run of one seed start
    from identical weights and see identical masks and batches.
    """
    global _rng
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {n!r}")
    _rng = np.random.default_rng(int(n))


def rng():
    """The host-side ``numpy.random.Generator`` that ``seed`` resets."""
    return _rng


# --- devices -----------------------------------------------------------------------------------

class Device:
    """A backend: ``Device("cpu")`` computes with NumPy, ``Device("cuda")`` with CuPy."""

    __slots__ = ("type",)

    def __init__(self, type):
        if type not in ("cpu", "cuda"):
            raise ValueError(f"Device: expected 'cpu' or 'cuda', got {type!r}")
        self.type = type

    @property
    def xp(self):
        """The array module of this device: numpy or cupy."""
        if self.type == "cpu":
            return np
        import cupy
        return cupy

    def __eq__(self, other):
        if isinstance(other, str):
            return self.type == other
        return isinstance(other, Device) and other.type == self.type

    def __hash__(self):
        return hash(self.type)

    def __repr__(self):
        return f"device(type={self.type!r})"

    def __str__(self):
        return self.type


def cuda_unavailable_reason():
    """None when CuPy can run kernels on a GPU here, else a sentence saying what is missing."""
    try:
        import cupy
    except ImportError as e:
        return (f"CuPy is not installed ({e}); install minicnn with the extra that matches your "
                "CUDA driver: pip install 'minicnn[cuda12]' or 'minicnn[cuda13]'")
    except Exception as e:  # a broken CuPy install fails in many ways at import
        return f"CuPy failed to import: {type(e).__name__}: {e}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or a driver older than CuPy's CUDA runtime
        return f"CuPy is installed but the CUDA driver is not usable: {type(e).__name__}: {e}"
    if count == 0:
        return "CuPy and the CUDA driver are present but no CUDA device is visible"
    return None


def device(name="auto"):
    """Return the ``Device`` for "cpu", "cuda" or "auto" (the GPU when usable, else the CPU).

    "cuda" raises ``DeviceError`` saying why when no GPU can be used; "auto" says once which
    device it chose and, when it is the CPU, why.
    """
    global _auto_announced
    if isinstance(name, Device):
        return name
    if name not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'auto', got {name!r}")
    if name == "cpu":
        return Device("cpu")
    reason = cuda_unavailable_reason()
    if name == "cuda":
        if reason is not None:
            raise DeviceError(f"device('cuda') is not available: {reason}")
        return Device("cuda")
    chosen = Device("cpu" if reason else "cuda")
    if not _auto_announced:
        _auto_announced = True
        print(f"minicnn: device 'auto' chose {chosen}" + (f" ({reason})" if reason else ""))
    return chosen


_tf32 = False


def allow_tf32(enabled=True):
    """Let float32 matrix products on the GPU run on TF32 tensor cores; off by default.

    TF32 rounds the operands to a 10-bit mantissa (float32 keeps 23) and sums in float32: several
    times the throughput on Ampere and newer GPUs, at about 1e-3 relative error per product. As
    in PyTorch (``torch.backends.cuda.matmul.allow_tf32``) it must be asked for. The CPU is not
    affected. Returns the previous setting.
    """
    global _tf32
    previous, _tf32 = _tf32, bool(enabled)
    if cuda_unavailable_reason() is None:
        import cupy
        from cupy._core import _routines_linalg as linalg   # where CuPy keeps the cuBLAS mode
        mode = linalg.COMPUTE_TYPE_TF32 if _tf32 else linalg.COMPUTE_TYPE_DEFAULT
        try:
            linalg.set_compute_type(np.float32, mode)
        except Exception as e:   # e.g. a GPU older than Ampere
            _tf32 = previous
            name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
            raise DeviceError(f"allow_tf32: this GPU ({name!r}) cannot use TF32: {e}") from e
    return previous


def tf32_allowed():
    """Whether ``allow_tf32`` turned TF32 products on."""
    return _tf32


# --- arrays ------------------------------------------------------------------------------------

def _is_cupy(x):
    return type(x).__module__.split(".")[0] == "cupy"


def get_array_module(x):
    """numpy or cupy: the module that owns array ``x``."""
    if _is_cupy(x):
        import cupy
        return cupy
    return np


def device_of(x):
    """The ``Device`` array ``x`` lives on."""
    return Device("cuda" if _is_cupy(x) else "cpu")


def to_numpy(x):
    """A NumPy array with the values of ``x`` (copied from the GPU when ``x`` lives there)."""
    if _is_cupy(x):
        return x.get()
    return np.asarray(x)


def to_device(x, dev):
    """``x`` as an array on device ``dev`` ("cpu", "cuda" or a ``Device``); no copy if already there."""
    dev = device(dev)
    if dev.type == "cpu":
        return to_numpy(x)
    return dev.xp.asarray(x)
