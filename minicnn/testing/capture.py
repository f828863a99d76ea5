"""A strict stand-in for CuPy under CUDA stream capture, to test the CUDA-graph step without a GPU.

``with fake_cupy():`` puts a module named ``cupy`` in ``sys.modules`` whose arrays are NumPy
arrays of a subclass (``DeviceArray``) that minicnn takes for CuPy arrays, so every GPU branch of
minicnn runs: the kernels of ``kernels/`` through the emulator, CuPy's elementwise work as NumPy,
and ``minicnn.fused.graph.CudaRecorder`` with the fake's streams, stream capture and memory pool.

While a stream is capturing, the stand-in raises ``CaptureViolation`` wherever CUDA or CuPy
would refuse the work or a replay would not repeat it:

- a matrix product through CuPy (``@``, ``matmul``, ``dot``, ``tensordot``, ``einsum``): CuPy's
  cuBLAS wrapper raises under capture (``cupy_backends/cuda/libs/cublas.pyx``, ``setStream``);
- a device-to-host read (``float()``, ``int()``, ``bool()``, ``.item()``, ``.tolist()``,
  ``.get()``): the host would wait for work that has not run, and a replay would not read again;
- a host-to-device copy (``cupy.asarray`` of host data, ``.set()``, assigning a host array);
- an allocation that does not come from the allocator installed for the recording (memory the
  pool lends to other work once the step frees it, which every replay would still write);
- an array made with initial values inside the recording that outlives it: state first made by
  the recorded step, which every replay would initialise again.

Recording runs the step's Python code, as a real capture does, and then puts every device
array made before it back as it was and fills those made during it with 0xFF bytes (NaN): a
capture records kernels without running them. ``StrictRecorder`` is ``CudaRecorder`` on the
fake; its graph's ``launch()`` runs the recorded function again, under the same rules. A real
replay runs no Python, so host-side effects of the step (a counter in Python) are not caught
here: the step's contract keeps them in its ``prepare`` half.

Outside a capture the fake behaves like CuPy on a GPU: device arrays refuse to mix with host
arrays in arithmetic, reads and copies are allowed.
"""
import contextlib
import sys
import types
import weakref

import numpy as np

from .. import backend, cuda
from ..fused import graph
from . import emulator


class CaptureViolation(AssertionError):
    """Work inside a recorded CUDA-graph step that a real capture would refuse or not repeat."""


class _State:
    capturing = None            # the stream being captured (or replayed), or None
    allocator = None            # the allocator installed with using_allocator, or None
    initialised = []            # weak references to arrays made with initial values while capturing
    memory = weakref.WeakValueDictionary()     # id -> every host buffer behind a device array


_state = _State()


def _violation(what):
    raise CaptureViolation(f"inside a recorded CUDA-graph step: {what}")


def _allocated(array, initial=False):
    """Note the allocation of ``array`` (a DeviceArray) by the fake pool."""
    if _state.capturing is None:
        return array
    if _state.allocator is None:
        _violation(f"an allocation of {array.nbytes} bytes from CuPy's shared memory pool, not "
                   "from the allocator of the recording: once the step frees it the pool lends it "
                   "to other work, and every replay writes it again")
    _state.allocator(max(array.nbytes, 1))
    if initial:
        _state.initialised.append((weakref.ref(array), array.shape, array.dtype))
    return array


def _plain(a):
    return a.view(np.ndarray) if isinstance(a, DeviceArray) else a


def _on_device(result):
    if isinstance(result, np.generic):          # CuPy gives 0-d arrays where NumPy gives scalars
        result = np.asarray(result)
    if isinstance(result, np.ndarray) and not isinstance(result, DeviceArray):
        return result.view(DeviceArray)
    if isinstance(result, tuple):
        return tuple(_on_device(r) for r in result)
    return result


def _refuse_host_arrays(where, values):
    for v in values:
        if isinstance(v, np.ndarray) and not isinstance(v, DeviceArray):
            raise TypeError(f"{where}: a host (NumPy) array of shape {v.shape} given to device "
                            "work; CuPy refuses to mix them (move it with cupy.asarray first)")


_PRODUCTS = {"matmul", "dot", "vdot", "inner", "outer", "tensordot", "einsum", "kron"}


class DeviceArray(np.ndarray):
    """A NumPy array that minicnn takes for a CuPy array (its class is in module ``cupy``)."""

    def __array_finalize__(self, obj):
        owner = self
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        _state.memory[id(owner)] = owner

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return arr.view(DeviceArray)        # reductions give 0-d device arrays, as in CuPy

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc.__name__ in _PRODUCTS and _state.capturing is not None:
            _violation(f"a matrix product through CuPy ({ufunc.__name__}): CuPy's cuBLAS wrapper "
                       "refuses to run during stream capture (cublas.pyx, setStream)")
        out = kwargs.get("out")
        _refuse_host_arrays(f"cupy.{ufunc.__name__}", inputs + (out or ()))
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*(_plain(i) for i in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        result = _on_device(result)
        if isinstance(result, DeviceArray):
            _allocated(result)
        elif isinstance(result, tuple):
            for r in result:
                _allocated(r)
        return result

    def __array_function__(self, func, types_, args, kwargs):
        if func.__name__ in _PRODUCTS and _state.capturing is not None:
            _violation(f"a matrix product through CuPy ({func.__name__}): CuPy's cuBLAS wrapper "
                       "refuses to run during stream capture (cublas.pyx, setStream)")
        return _on_device(super().__array_function__(func, types_, args, kwargs))

    # --- reads back to the host ------------------------------------------------------------------

    def _read(self, how):
        if _state.capturing is not None:
            _violation(f"a device-to-host read ({how}) of an array of shape {self.shape}: the host "
                       "cannot wait for work that is only being recorded, and a replay would not "
                       "read it again")

    def get(self, stream=None, order="C", out=None):
        self._read(".get()")
        return np.array(self.view(np.ndarray), order=order)

    def item(self, *args):
        self._read(".item()")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        self._read(".tolist()")
        return self.view(np.ndarray).tolist()

    def __float__(self):
        self._read("float()")
        return float(self.view(np.ndarray))

    def __int__(self):
        self._read("int()")
        return int(self.view(np.ndarray))

    def __index__(self):
        self._read("operator.index()")
        return self.view(np.ndarray).__index__()

    def __bool__(self):
        self._read("bool()")
        return bool(self.view(np.ndarray))

    # --- writes from the host --------------------------------------------------------------------

    def set(self, arr, stream=None):
        if _state.capturing is not None:
            _violation(f"a host-to-device copy (.set()) into an array of shape {self.shape}")
        self.view(np.ndarray)[...] = arr

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
            if _state.capturing is not None:
                _violation(f"a host-to-device copy (assigning a host array of shape {value.shape})")
        super().__setitem__(key, _plain(value))

    def __reduce__(self):
        raise TypeError("a device array cannot be pickled as such; read it with .get()")


DeviceArray.__module__ = "cupy"       # minicnn.backend tells CuPy arrays by their class's module


# --- the module ----------------------------------------------------------------------------------

def _host_to_device(obj, dtype=None, copy=True):
    if isinstance(obj, DeviceArray):
        return obj.astype(dtype, copy=copy) if dtype is not None else (obj.copy() if copy else obj)
    if _state.capturing is not None:
        _violation(f"a host-to-device copy (cupy.asarray of a {type(obj).__name__})")
    return _allocated(np.array(obj, dtype=dtype).view(DeviceArray), initial=True)


def _maker(name, initial):
    numpy_fn = getattr(np, name)

    def make(*args, **kwargs):
        args = tuple(_plain(a) for a in args)
        return _allocated(numpy_fn(*args, **kwargs).view(DeviceArray), initial=initial)
    make.__name__ = name
    return make


class _Event:
    def synchronize(self):
        pass


class Stream:
    """CuPy's Stream as far as minicnn uses it: current-stream context, events, capture."""

    _current = []

    def __init__(self, null=False, non_blocking=False, ptr=0):
        self.null = null

    def __enter__(self):
        Stream._current.append(self)
        return self

    def __exit__(self, *exc):
        Stream._current.pop()

    def record(self, event=None):
        return event or _Event()

    def wait_event(self, event):
        pass

    def synchronize(self):
        if _state.capturing is not None:
            _violation("a stream synchronisation")

    def begin_capture(self, mode=None):
        if _state.capturing is not None:
            raise RuntimeError("fake cupy: a capture is already under way")
        if self.null:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: the null stream cannot capture")
        # A capture runs nothing: what the Python code computes now is undone at the end.
        self._saved = [(owner, np.array(owner.view(np.ndarray)))
                       for owner in list(_state.memory.values()) if owner.flags.writeable]
        _state.capturing, _state.initialised = self, []

    def is_capturing(self):
        return _state.capturing is self

    def end_capture(self):
        if _state.capturing is not self:
            raise RuntimeError("fake cupy: end_capture on a stream that is not capturing")
        _state.capturing = None
        saved, self._saved = {id(owner): copy for owner, copy in self._saved}, None
        for key, owner in list(_state.memory.items()):
            if key in saved:
                owner.view(np.ndarray)[...] = saved[key]
            elif owner.flags.writeable and owner.flags.c_contiguous:   # made during it: unwritten
                owner.view(np.ndarray).reshape(-1).view(np.uint8)[...] = 0xFF
        alive = [(shape, dtype) for ref, shape, dtype in _state.initialised if ref() is not None]
        _state.initialised = []
        if alive:
            _violation(f"{len(alive)} array(s) made with initial values inside the recording "
                       f"outlive it (first: shape {alive[0][0]}, {alive[0][1]}): state first made by "
                       "the recorded step, which every replay would initialise again")
        return _Graph(self)


class _Graph:
    """What ``end_capture`` returns; ``StrictRecorder`` gives it the function to replay."""

    def __init__(self, stream):
        self.stream, self.body, self.allocator = stream, None, None

    def launch(self, stream=None):
        """Run the recorded function again, under the capture rules but for real."""
        if self.body is None:
            raise RuntimeError("fake cupy: this graph was not made by a StrictRecorder")
        saved = _state.allocator, _state.capturing
        _state.allocator, _state.capturing = self.allocator, self.stream
        try:
            self.body()
        finally:
            _state.allocator, _state.capturing = saved


_null_stream = Stream(null=True)


def _get_current_stream(device_id=None):
    return Stream._current[-1] if Stream._current else _null_stream


@contextlib.contextmanager
def _using_allocator(allocator=None):
    saved, _state.allocator = _state.allocator, allocator
    try:
        yield
    finally:
        _state.allocator = saved


class _Pool:
    def malloc(self, size):
        return object()


class _Device:
    id = 0
    compute_capability = "90"

    def __init__(self, device=None):
        pass

    def synchronize(self):
        if _state.capturing is not None:
            _violation("a device synchronisation")


def _make_module():
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "0.0-stand-in"
    cupy.ndarray = DeviceArray
    cupy.asarray = lambda a, dtype=None, order=None: _host_to_device(a, dtype, copy=False)
    cupy.array = lambda a, dtype=None, copy=True, order="K": _host_to_device(a, dtype, copy)
    for name in ("empty", "empty_like"):
        setattr(cupy, name, _maker(name, initial=False))
    for name in ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange"):
        setattr(cupy, name, _maker(name, initial=True))
    pool = _Pool()
    cupy.get_default_memory_pool = lambda: pool
    runtime = types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1,
                                    streamIsCapturing=lambda ptr: _state.capturing is not None)
    cupy.cuda = types.SimpleNamespace(Stream=Stream, get_current_stream=_get_current_stream,
                                      using_allocator=_using_allocator, runtime=runtime,
                                      Device=_Device)

    def fallback(name):             # everything else: NumPy's function, results on the device
        value = getattr(np, name)
        if callable(value) and not isinstance(value, (type, np.ufunc)):
            def call(*args, **kwargs):
                return _on_device(value(*args, **kwargs))
            return call
        return value
    cupy.__getattr__ = fallback
    return cupy


def _device_launch(file, name, n, *args):
    """``minicnn.cuda.launch`` for the fake: device arrays only, run by the emulator."""
    _refuse_host_arrays(f"kernel {file}:{name}", args)
    emulator.launch(file, name, n, *(_plain(a) for a in args))


@contextlib.contextmanager
def fake_cupy():
    """Make minicnn take the stand-in for CuPy and a usable GPU; restore everything after."""
    module = _make_module()
    saved_module = sys.modules.get("cupy")
    saved = (backend.cuda_unavailable_reason, cuda.launch)
    sys.modules["cupy"] = module
    backend.cuda_unavailable_reason = lambda: None
    cuda.launch = _device_launch
    try:
        yield module
    finally:
        backend.cuda_unavailable_reason, cuda.launch = saved
        if saved_module is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved_module
        _state.capturing, _state.allocator, _state.initialised = None, None, []


class StrictRecorder(graph.CudaRecorder):
    """``minicnn.fused.graph.CudaRecorder`` on the fake CuPy; its graphs replay the recorded function
    under the capture rules."""

    def __init__(self):
        super().__init__()
        self.recorded = 0

    def record(self, fn):
        g = super().record(fn)
        g.body, g.allocator = fn, self.kept.malloc
        self.recorded += 1
        return g
