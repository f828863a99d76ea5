"""The kernel loader: finds the CUDA C files of ``kernels/``, compiles them, launches their kernels.

Every kernel file is written for an element type ``scalar_t`` (and ``acc_t`` for sums) that is
fixed at compile time, so each file is compiled once per device and dtype, with CuPy's
``RawModule`` on a GPU or with the system C++ compiler by the emulator
(``minicnn.testing.emulator``). ``Launcher`` is what both share: it reads each kernel's
signature from the source, checks and converts the arguments to those types (CuPy would pass a
Python int as a 64-bit integer and a float as a double whatever the kernel expects, and ignores
strides), and computes the grid for one thread per output element.
"""
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from .backend import get_array_module
from .errors import KernelCompileError

THREADS_PER_BLOCK = 256
MAX_BLOCKS = 65535          # kernels loop (grid-stride), so a capped grid still covers every element

# C type of each kernel scalar argument -> NumPy type it is passed as
_SCALARS = {"int": np.int32, "long long": np.int64, "unsigned int": np.uint32,
            "unsigned long long": np.uint64, "float": np.float32, "double": np.float64}
_POINTER_DTYPES = {ctype: np.dtype(t) for ctype, t in _SCALARS.items()}
# element type per dtype: (scalar_t, acc_t)
_TYPES = {np.dtype(np.float32): ("float", "float"), np.dtype(np.float64): ("double", "double")}

_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_POINTER = re.compile(r"^(const\s+)?((?:unsigned\s+|long\s+)*\w+)\s*\*\s*"
                      r"(?:__restrict__\s+)?(\w+)$")
_VALUE = re.compile(r"^(?:const\s+)?((?:unsigned\s+|long\s+)*\w+)\s+(\w+)$")


def kernel_dir():
    """The folder of the .cu files: ``minicnn/kernels`` in an installed wheel, ``kernels/`` in a
    source checkout. ``$MINICNN_KERNELS`` overrides both."""
    override = os.environ.get("MINICNN_KERNELS")
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parent
    candidates += [here / "kernels", here.parent / "kernels"]
    for folder in candidates:
        if any(folder.glob("*.cu")):
            return folder
    raise FileNotFoundError("minicnn: no CUDA kernel sources (*.cu) in "
                            + ", ".join(str(c) for c in candidates))


def kernel_files():
    """Paths of every kernel file, sorted by name."""
    return sorted(kernel_dir().glob("*.cu"))


def kernel_path(file):
    """Path of kernel file ``file``: a name such as "im2col.cu" (in ``kernel_dir()``) or a path."""
    return Path(file) if os.sep in str(file) else kernel_dir() / file


@lru_cache(maxsize=None)
def read_source(file):
    """Text of kernel file ``file`` (a name such as "im2col.cu", or a path)."""
    return kernel_path(file).read_text()


def compile_options(dtype):
    """The -D options that fix a module's element types for ``dtype``."""
    dt = np.dtype(dtype)
    if dt not in _TYPES:
        raise TypeError(f"CUDA kernels: expected float32 or float64 arrays, got {dt}")
    scalar, acc = _TYPES[dt]
    return (f"-Dscalar_t={scalar}", f"-Dacc_t={acc}")


def parse_signatures(source):
    """{kernel name: [(kind, C type, arg name), ...]} of every ``extern "C" __global__`` kernel.

    kind is "in" (a const pointer), "out" (a pointer the kernel writes) or "value" (a scalar of
    a type in ``_SCALARS``, or ``scalar_t``: passed in the module's element type).
    """
    kernels = {}
    for name, params in _SIGNATURE.findall(source):
        args = []
        for raw in " ".join(params.split()).split(","):
            raw = raw.strip()
            pointer, value = _POINTER.match(raw), _VALUE.match(raw)
            if pointer:
                args.append(("in" if pointer.group(1) else "out", pointer.group(2), pointer.group(3)))
            elif value and (value.group(1) in _SCALARS or value.group(1) == "scalar_t"):
                args.append(("value", value.group(1), value.group(2)))
            else:
                raise ValueError(f"kernel {name}: cannot read the parameter {raw!r}")
        kernels[name] = args
    return kernels


@lru_cache(maxsize=None)
def signatures(file):
    return parse_signatures(read_source(file))


def grid_for(n):
    """Blocks for ``n`` elements, one thread each, capped (the kernels loop over the rest)."""
    return max(1, min(MAX_BLOCKS, -(-int(n) // THREADS_PER_BLOCK)))


class Launcher:
    """Launches kernel ``name`` of ``file`` over ``n`` elements: ``launch(file, name, n, *args)``.

    ``compile(file, dtype)`` returns a module whose ``get_function(name)`` gives a callable
    ``(grid, block, args)``, as CuPy's RawModule does. The module's dtype is that of the first
    array argument; every ``scalar_t*`` argument must share it, ``int*`` arguments must be int32.
    Read-only arrays that are not C-contiguous are copied; arrays the kernel writes must be
    C-contiguous already (a copy would lose the writes).
    """

    def __init__(self, compile):
        self._compile = compile
        self._modules = {}

    def module(self, file, dtype):
        key = (file, np.dtype(dtype), self._device_key())
        if key not in self._modules:
            self._modules[key] = self._compile(file, np.dtype(dtype))
        return self._modules[key]

    def _device_key(self):
        return None

    def __call__(self, file, name, n, *args):
        sig = signatures(file).get(name)
        if sig is None:
            raise KeyError(f"{file} has no kernel named {name!r}; it has {sorted(signatures(file))}")
        if len(args) != len(sig):
            raise TypeError(f"{file}:{name} takes {len(sig)} arguments "
                            f"({', '.join(a for _, _, a in sig)}), got {len(args)}")
        dtype = next((a.dtype for a in args if hasattr(a, "dtype") and a.dtype.kind == "f"), None)
        if np.dtype(dtype) not in _TYPES:
            raise TypeError(f"{file}:{name}: expected float32 or float64 arrays, got {dtype}")
        converted = []
        for (kind, ctype, argname), value in zip(sig, args):
            if kind == "value":
                cast = dtype.type if ctype == "scalar_t" else _SCALARS[ctype]
                converted.append(cast(value))
                continue
            want = dtype if ctype == "scalar_t" else _POINTER_DTYPES.get(ctype)
            if want is None or getattr(value, "dtype", None) != want:
                where = f"{file}:{name} argument {argname}"      # made only for the message
                if want is None:
                    raise TypeError(f"{where}: unsupported pointer type {ctype}*")
                raise TypeError(f"{where}: expected an array of {want} ({ctype}*), got "
                                f"{getattr(value, 'dtype', type(value).__name__)}")
            if not value.flags.c_contiguous:
                if kind == "out":
                    raise ValueError(f"{file}:{name} argument {argname}: the kernel writes this "
                                     "array, so it must be C-contiguous")
                value = get_array_module(value).ascontiguousarray(value)
            converted.append(value)
        try:
            kernel = self.module(file, dtype).get_function(name)
        except KernelCompileError as e:
            raise KernelCompileError(f"while loading kernel {name}: {e}") from e
        kernel((grid_for(n),), (THREADS_PER_BLOCK,), tuple(converted))


class _CupyLauncher(Launcher):
    """Modules compiled by NVRTC through CuPy, cached per (file, dtype, device)."""

    def _device_key(self):
        import cupy
        return cupy.cuda.runtime.getDevice()      # cheaper than a Device object per launch


def _nvrtc_options(dtype):
    """The options every kernel file is compiled with by NVRTC for ``dtype``."""
    return compile_options(dtype) + ("--std=c++14",)


def _compile_log(error):
    """NVRTC's log when ``error`` is CuPy's CompileException (or one like it), else None."""
    get_message = getattr(error, "get_message", None)
    if type(error).__name__ == "CompileException" and callable(get_message):
        return get_message()
    return None


def _cupy_compile(file, dtype):
    """Compile ``file`` for ``dtype`` with NVRTC through CuPy: a module whose ``get_function``
    returns the kernel. Any failure, a compile error or NVRTC/headers that cannot be loaded, is
    raised as ``KernelCompileError`` naming the file and options, with the log or the fix."""
    import cupy
    from .backend import cuda_install_hint
    options = _nvrtc_options(dtype)
    source = read_source(file)
    try:
        module = cupy.RawModule(code=source, options=options)
        module.compile()
    except Exception as e:
        log = _compile_log(e)
        what = f"{file} for {np.dtype(dtype)} with options {' '.join(options)}"
        if log is not None:
            fix = (f"a header was not found: install the CUDA headers with {cuda_install_hint(cupy)}"
                   if "cannot open source file" in log else "the kernel source needs fixing")
            raise KernelCompileError(f"NVRTC rejected {what}; {fix}. NVRTC's log:\n{log}") from e
        if type(e).__name__ in ("CUDARuntimeError", "CUDADriverError"):
            fix = "The CUDA driver or the GPU is not usable; python -m minicnn doctor says why"
        else:
            fix = (f"NVRTC, CUDA's runtime compiler, or the CUDA headers are missing or unusable; "
                   f"install them with {cuda_install_hint(cupy)}")
        raise KernelCompileError(f"{what} could not be compiled: {type(e).__name__}: {e}. {fix}") from e
    return _NamedModule(module, file, options)


class _NamedModule:
    """A compiled RawModule whose kernels are looked up once each; failures name the file, the
    kernel and the options."""

    def __init__(self, module, file, options):
        self._module, self._file, self._options = module, file, options
        # CuPy's RawModule.get_function builds a new RawKernel and looks the function up in the
        # driver on every call (cupy/_core/raw.pyx); a training step launches ~45 kernels, so
        # each is kept after its first lookup.
        self._functions = {}

    def get_function(self, name):
        kernel = self._functions.get(name)
        if kernel is None:
            try:
                kernel = self._module.get_function(name)
            except Exception as e:
                import cupy
                from .backend import cuda_install_hint
                raise KernelCompileError(
                    f"{self._file}: kernel {name} could not be loaded (options "
                    f"{' '.join(self._options)}): {type(e).__name__}: {e}. If the kernel exists "
                    f"in the file, the CUDA libraries may be missing: {cuda_install_hint(cupy)}"
                ) from e
            self._functions[name] = kernel
        return kernel


launch = _CupyLauncher(_cupy_compile)
