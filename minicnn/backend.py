"""Backends, the default dtype, the one random generator and the process-wide allocator setting.

An array's backend is read from the array itself (``get_array_module(x)``, as Chainer does), never
from a global, so the same layer code runs on NumPy arrays and on CuPy arrays. CuPy is imported
only when "cuda" is asked for or a CuPy array is met: minicnn works with no CuPy installed.
"""
import ctypes
import functools
import os
import sys

import numpy as np

from .errors import DeviceError

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_default_dtype = np.dtype(np.float32)
_rng = np.random.default_rng(0)
_auto_announced = False


# --- process-wide settings ---------------------------------------------------------------------

def tune_process():
    """Set this process's C allocator for fast CPU training: glibc keeps freed memory for reuse.

    Process-wide, not minicnn's alone: every library that allocates through glibc (NumPy,
    PyTorch, ...) gets heap memory for blocks under 32 MiB instead of fresh pages from the OS, and
    up to 1 GiB of freed memory stays with the process. Importing minicnn never calls it; ``fit``,
    the examples and the benchmarks do. glibc cannot restore its self-adjusting defaults, so it
    cannot be undone: to opt out, set MINICNN_TUNE_PROCESS=0 and it changes nothing. A no-op
    where the C library is not glibc. Returns what it changed as one line, or "" when nothing.
    OpenBLAS's thread spin cannot be set by a call (docs/design.md, "Process-wide settings").
    """
    if os.environ.get("MINICNN_TUNE_PROCESS") == "0" or not sys.platform.startswith("linux"):
        return ""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return ""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # A training step allocates and frees ~100 MB of large arrays. With glibc's defaults each one
    # is mapped fresh and handed back when freed, so every step faulted in thousands of new pages:
    # a third of a CPU step on a 2-core machine. Below the mmap threshold (32 MiB, glibc's largest
    # on 64-bit) arrays come from the heap, and a trim threshold of 1 GiB keeps freed heap memory
    # for the next step.
    if libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30):
        return "glibc keeps freed memory for reuse (M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB)"
    return ""


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


def get_rng_state():
    """The host generator's exact position as a JSON-able dict (its bit generator's state)."""
    return _rng.bit_generator.state


def set_rng_state(state):
    """Put the host generator at ``state``, a ``get_rng_state()`` dict: the draws that follow
    repeat those that followed when it was taken. Raises ValueError, changing nothing, when
    ``state`` is not one."""
    global _rng
    name = state.get("bit_generator") if isinstance(state, dict) else None
    bitgen_cls = getattr(np.random, name, None) if isinstance(name, str) else None
    if bitgen_cls is None or not isinstance(bitgen_cls, type) \
            or not issubclass(bitgen_cls, np.random.BitGenerator):
        raise ValueError(f"set_rng_state: expected a dict from get_rng_state() naming a NumPy "
                         f"bit generator, got {str(state)[:80]}")
    bitgen = bitgen_cls()
    try:
        bitgen.state = state
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"set_rng_state: the {name} state does not fit: {e}") from None
    _rng = np.random.Generator(bitgen)


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


def format_compute_capability(cc):
    """CuPy's compute capability string ("75", "90", "100", "121") as NVIDIA writes it ("7.5",
    "9.0", "10.0", "12.1"): the last digit is the minor version, the rest the major."""
    cc = str(cc)
    if len(cc) < 2 or not cc.isdigit():
        raise ValueError(f"format_compute_capability: expected digits such as '75' or '100', got {cc!r}")
    return f"{cc[:-1]}.{cc[-1]}"


def cuda_install_hint(cupy=None):
    """The pip command that installs the CUDA libraries minicnn needs (NVRTC, cuBLAS, headers)
    for this CuPy, or for either CUDA major version when CuPy is absent or does not say."""
    major = None
    if cupy is not None:
        try:
            major = cupy.cuda.runtime.runtimeGetVersion() // 1000   # needs no driver
        except Exception:
            pass
    if major in (12, 13):
        return f"pip install 'minicnn[cuda{major}]'"
    return ("pip install 'minicnn[cuda12]' or 'minicnn[cuda13]', the one matching the "
            "\"CUDA Version\" that nvidia-smi shows (12.x or 13.x)")


# The probe's kernel: compiled with the loader's C++ standard, run on 4 threads.
_PROBE_SOURCE = r"""
extern "C" __global__ void minicnn_probe(float* out, float step) {
    out[threadIdx.x] = step * threadIdx.x;
}
"""


def cuda_unavailable_reason():
    """None when CuPy can run minicnn on a GPU here, else a sentence saying what is missing and
    how to fix it.

    A GPU counts only when NVRTC compiles a small kernel that then runs and gives the right
    numbers, and a 2x2 product through cuBLAS does too. The check runs once per process;
    ``_probe_cuda.cache_clear()`` forgets it (tests). Whether CuPy imports is asked every time.
    """
    try:
        import cupy
    except ImportError as e:
        return (f"CuPy is not installed ({e}); install minicnn with the extra that matches your "
                "CUDA driver: pip install 'minicnn[cuda12]' or 'minicnn[cuda13]'")
    except Exception as e:  # a broken CuPy install fails in many ways at import
        return f"CuPy failed to import: {_error(e)}"
    return _probe_cuda()


def _error(e):
    """``Type: message`` on one line: the reasons are printed as one sentence."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _driver_advice(cupy):
    """What to do when CuPy's CUDA runtime finds no usable driver."""
    rt = cupy.cuda.runtime
    try:
        driver, runtime = rt.driverGetVersion(), rt.runtimeGetVersion()
    except Exception:
        driver = runtime = None
    if driver == 0:   # cudaDriverGetVersion's answer when libcuda is absent
        return "no NVIDIA driver is installed: on a machine with an NVIDIA GPU, install its driver"
    if driver and runtime and driver // 1000 < runtime // 1000:
        return (f"the driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, older than this "
                f"CuPy's CUDA {runtime // 1000}: install the extra that matches the driver, "
                f"pip install 'minicnn[cuda{driver // 1000}]', or update the driver")
    return f"check the NVIDIA driver (nvidia-smi); then {cuda_install_hint()}"


@functools.lru_cache(maxsize=1)
def _probe_cuda():
    """``cuda_unavailable_reason`` once CuPy imports: driver, device, NVRTC, a kernel, cuBLAS."""
    import cupy
    fix = cuda_install_hint(cupy)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or a driver older than CuPy's CUDA runtime
        return (f"CuPy is installed but the CUDA driver is not usable ({_error(e)}); "
                + _driver_advice(cupy))
    if count == 0:
        return ("CuPy and the CUDA driver are present but no CUDA device is visible (see nvidia-smi, "
                "and CUDA_VISIBLE_DEVICES if it is set)")
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as e:
        return (f"NVRTC, CUDA's runtime compiler, could not be loaded ({_error(e)}); "
                f"minicnn compiles its kernels with it: {fix}")
    # A stream of its own: the probe may run first while another stream records a CUDA graph,
    # and CuPy refuses cuBLAS calls on a capturing stream (cublas.pyx, setStream).
    try:
        with cupy.cuda.Stream(non_blocking=True):
            out = cupy.zeros(4, dtype=cupy.float32)
            cupy.RawKernel(_PROBE_SOURCE, "minicnn_probe", options=("--std=c++14",))(
                (1,), (4,), (out, np.float32(0.5)))
            got = out.get()
    except Exception as e:
        return (f"a test kernel could not be compiled with NVRTC or run ({_error(e)}); "
                f"NVRTC or the CUDA headers may be missing: {fix}")
    if not np.array_equal(got, [0.0, 0.5, 1.0, 1.5]):
        return f"a test kernel ran but computed {got.tolist()} instead of [0.0, 0.5, 1.0, 1.5]"
    try:
        with cupy.cuda.Stream(non_blocking=True):
            a = cupy.asarray([[1.0, 2.0], [3.0, 4.0]], dtype=cupy.float32)
            got = (a @ a).get()
    except Exception as e:
        return (f"cuBLAS could not be loaded or run a 2x2 product ({_error(e)}); "
                f"minicnn's convolutions and linear layers need it: {fix}")
    if not np.array_equal(got, [[7.0, 10.0], [15.0, 22.0]]):
        return f"cuBLAS computed {got.tolist()} for a 2x2 product instead of [[7, 10], [15, 22]]"
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
    in PyTorch (``torch.backends.cuda.matmul.allow_tf32``) it must be asked for. Returns the
    previous setting.

    Which products: only those CuPy hands to cuBLAS as one GEMM, where it applies its float32
    compute type: ``@``/``matmul``/``dot`` with both operands at most 2-D (in minicnn, run
    eagerly: ``Linear``, ``Conv2d``'s im2col product and both its gradients). Batched products
    (an operand of 3 or more dimensions, e.g. ``AdaptiveAvgPool2d``'s window products) run as
    CuPy's batched GEMM with plain float32 compute; minicnn's own kernels (``kernels/gemm.cu``,
    the products of a recorded CUDA graph step) and the CPU stay float32 too.

    Raises ``DeviceError``, changing nothing, on a GPU of compute capability below 8.0 (no TF32).
    Without a usable GPU it only records the wish.
    """
    global _tf32
    enabled = bool(enabled)
    if cuda_unavailable_reason() is None:
        import cupy
        from cupy._core import _routines_linalg as linalg   # where CuPy keeps the cuBLAS mode
        dev = cupy.cuda.Device()
        cc = dev.compute_capability
        if enabled and int(cc) < 80:
            # CuPy would warn and keep float32 (set_compute_type), leaving the switch on in name.
            raise DeviceError(
                f"allow_tf32: TF32 needs a GPU of compute capability 8.0 or newer (Ampere); "
                f"{_gpu_name(cupy, dev.id)} has compute capability {format_compute_capability(cc)}. "
                "Float32 products stay float32; leave allow_tf32 off on this GPU")
        mode = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
        try:
            linalg.set_compute_type(np.float32, mode)
        except Exception as e:
            raise DeviceError(f"allow_tf32: CuPy refused the float32 compute type "
                              f"{'TF32' if enabled else 'default'}: {type(e).__name__}: {e}") from e
    previous, _tf32 = _tf32, enabled
    return previous


def tf32_allowed():
    """Whether float32 2-D products on the GPU use TF32: CuPy's own setting once a GPU is in use
    (CuPy also turns TF32 on by itself when the environment sets ``CUPY_TF32=1``), else what
    ``allow_tf32`` last recorded."""
    if "cupy" in sys.modules and cuda_unavailable_reason() is None:
        from cupy._core import _routines_linalg as linalg
        return bool(linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32)
    return _tf32


def _gpu_name(cupy, device_id):
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    return repr(name.decode() if isinstance(name, bytes) else name)


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
