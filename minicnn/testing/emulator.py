"""Run the CUDA kernels of ``kernels/`` on the CPU, so they can be tested on machines with no GPU.

How it works:

1. The kernel file is compiled by the system C++ compiler (``g++``; ``$MINICNN_CXX`` picks
   another) with ``cuda_emulator.h`` included first. That header stands in for the CUDA
   built-ins (``__global__``, ``threadIdx``, ``blockIdx``, ``blockDim``, ``gridDim``,
   ``__shared__``, ``__syncthreads()``, ...), and the ``-Dscalar_t=... -Dacc_t=...`` options are
   those the GPU build uses (``minicnn.cuda.compile_options``).
2. For every kernel that ``minicnn.cuda.parse_signatures`` finds in the file, a C++ wrapper
   ``emu_<name>(gx, bx, reverse, <the kernel's parameters>)`` is generated: it runs the kernel
   once per thread of a 1-D launch of ``gx`` blocks of ``bx`` threads, block after block.
3. Kernel and wrappers become a shared library, cached on disk under a hash of the source, the
   header, the wrappers, the options and the compiler's version, and loaded with ``ctypes``.

``compile_module(file, dtype)`` returns a module whose ``get_function(name)`` gives a callable
``(grid, block, args)``, as CuPy's RawModule does, so ``launch = Launcher(compile_module)`` is the
very launcher the GPU uses: argument casting, contiguity checks and grid sizes are all exercised.

The threads of a block run in one of two ways, chosen per file from its source (``cooperative``):

- One at a time (files that use neither ``__shared__`` nor ``__syncthreads``): each thread's call
  runs to its end before the next one starts. Simple and fast; ``__shared__`` and
  ``__syncthreads()`` are compile errors in this mode.
- Cooperatively (files that use either): each thread of a block is a fiber, a stack of its own on
  the launching OS thread. A fiber runs until it reaches ``__syncthreads()`` or returns; when every
  thread of the block waits at the barrier, all go on. ``__shared__`` variables are shared by the
  block's fibers and filled with NaN (0xff bytes) before each block, so a read before the block
  wrote shows in the results. Barrier divergence -- some threads returned while others wait, or
  threads waiting at different ``__syncthreads()`` -- raises ``EmulatorError``. See
  ``cuda_emulator.h`` for the runtime.

Every array is handed to the kernel inside a larger buffer with a guard zone on each side (NaN for
floating point, a fixed pattern for integers). A write out of bounds into a guard zone raises
``EmulatorError`` naming the argument; a read out of bounds brings NaN into the results.

``launch_reversed`` runs blocks last to first and, within a block, the threads last to first
(in each phase between barriers, for cooperative files): a kernel whose results depend on the
order of its threads (a race on the GPU) gives different results under the two.
"""
import atexit
import ctypes
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from .. import cuda
from ..cuda import KernelCompileError, Launcher
from ..errors import EmulatorError, EmulatorUnavailable

HEADER = Path(__file__).resolve().with_name("cuda_emulator.h")
GUARD = 64                  # elements of guard zone on each side of every array argument

# C type of a scalar kernel parameter -> ctypes type it is passed as
_CTYPES = {"int": ctypes.c_int, "long long": ctypes.c_longlong, "unsigned int": ctypes.c_uint,
           "unsigned long long": ctypes.c_ulonglong, "float": ctypes.c_float,
           "double": ctypes.c_double}
_INT_POINTERS = {"int": np.int32, "long long": np.int64, "unsigned int": np.uint32,
                 "unsigned long long": np.uint64}


def _compiler():
    return shlex.split(os.environ.get("MINICNN_CXX", "g++"))


def unavailable_reason():
    """Why the emulator cannot run here, or None when it can."""
    cxx = _compiler()
    if not cxx or shutil.which(cxx[0]) is None:
        return (f"no C++ compiler: {cxx[0] if cxx else '(empty $MINICNN_CXX)'!r} is not on PATH "
                "(install g++, or set $MINICNN_CXX)")
    if not HEADER.is_file():
        return f"the emulator header {HEADER} is missing from the installed package"
    return None


def available():
    """True when kernels can be compiled and run on the CPU."""
    return unavailable_reason() is None


@lru_cache(maxsize=None)
def _compiler_version(cxx):
    try:
        proc = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60)
        return proc.stdout
    except (OSError, subprocess.SubprocessError) as e:
        return repr(e)


@lru_cache(maxsize=None)
def cache_dir():
    """Where built libraries are kept: ``$MINICNN_EMULATOR_CACHE``, else
    ``~/.cache/minicnn/emulator`` (or under ``$XDG_CACHE_HOME``); else a temporary folder."""
    folder = os.environ.get("MINICNN_EMULATOR_CACHE")
    if not folder:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = Path(cache) / "minicnn" / "emulator"
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    folder = Path(tempfile.mkdtemp(prefix="minicnn-emulator-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _param(kind, ctype):
    """The C type of one kernel parameter, as the kernel declares it."""
    if kind == "in":
        return f"const {ctype}* __restrict__"
    if kind == "out":
        return f"{ctype}* __restrict__"
    return ctype


_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_COOPERATIVE = re.compile(r"\b(?:__shared__|__syncthreads)\b")


def cooperative(source):
    """Whether kernel source text needs cooperative blocks: it uses ``__shared__`` or
    ``__syncthreads`` (outside comments)."""
    return _COOPERATIVE.search(_COMMENTS.sub(" ", source)) is not None


def wrapper_source(signatures, cooperative=False):
    """C++ source of ``emu_<name>`` for every kernel of ``signatures`` (from parse_signatures).

    Each declares its kernel and runs it for every thread of a 1-D launch: ``gx`` blocks of ``bx``
    threads, in order, or in reverse order when ``reverse`` is nonzero; one thread after another,
    or, with ``cooperative``, the threads of a block as fibers (``emu::run_cooperative`` of
    cuda_emulator.h). Each returns nullptr, or a message saying what went wrong.
    """
    out = [f"// Generated by minicnn.testing.emulator: runs each kernel once per thread"
           f"{' (cooperative blocks)' if cooperative else ''}.",
           "#define EMU_EXPORT extern \"C\" __attribute__((visibility(\"default\")))", ""]
    for name, args in signatures.items():
        types = [_param(kind, ctype) for kind, ctype, _ in args]
        params = "".join(f", {t} a{n}" for n, t in enumerate(types))
        call = ", ".join(f"a{n}" for n in range(len(args)))
        out += [f'extern "C" void {name}({", ".join(types)});',
                f"EMU_EXPORT const char* emu_{name}(unsigned int emu_gx, unsigned int emu_bx, "
                f"int emu_reverse{params}) {{"]
        if cooperative:
            out += [f"    auto emu_thread = [&]() {{ {name}({call}); }};",
                    "    return emu::run_cooperative(emu_gx, emu_bx, emu_reverse,",
                    "        [](void* f) { (*static_cast<decltype(emu_thread)*>(f))(); }, "
                    "&emu_thread);",
                    "}",
                    ""]
            continue
        out += ["    gridDim = dim3(emu_gx);",
                "    blockDim = dim3(emu_bx);",
                "    for (unsigned int nb = 0; nb < emu_gx; ++nb) {",
                "        blockIdx = uint3{emu_reverse ? emu_gx - 1 - nb : nb, 0, 0};",
                "        for (unsigned int nt = 0; nt < emu_bx; ++nt) {",
                "            threadIdx = uint3{emu_reverse ? emu_bx - 1 - nt : nt, 0, 0};",
                f"            {name}({call});",
                "        }",
                "    }",
                "    return nullptr;",
                "}",
                ""]
    return "\n".join(out)


@lru_cache(maxsize=None)
def _load(library):
    return ctypes.CDLL(str(library))


def build(file, dtype):
    """Compile kernel file ``file`` for ``dtype`` into a shared library (cached); its path."""
    reason = unavailable_reason()
    if reason:
        raise EmulatorUnavailable(f"minicnn emulator: {reason}")
    path = cuda.kernel_path(file).resolve()
    source = path.read_text()
    options = cuda.compile_options(dtype)
    together = cooperative(source)
    wrappers = wrapper_source(cuda.parse_signatures(source), together)
    cxx = _compiler()
    # -ffp-contract=off: a*b + c rounds twice, as NumPy computes it, on every CPU (aarch64 has fma)
    flags = ["-O1", "-shared", "-fPIC", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off",
             "-include", str(HEADER), *options,
             *(["-DMINICNN_EMU_COOPERATIVE"] if together else [])]
    key = hashlib.sha256("\0".join([source, HEADER.read_text(), wrappers, " ".join(cxx + flags),
                                    _compiler_version(tuple(cxx))]).encode()).hexdigest()[:20]
    library = cache_dir() / f"{path.stem}-{np.dtype(dtype).name}-{key}.so"
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(prefix="minicnn-emulator-") as tmp:
        wrapper_file = Path(tmp) / "wrappers.cpp"
        wrapper_file.write_text(wrappers)
        fd, partial_name = tempfile.mkstemp(dir=library.parent, prefix=f".{library.name}.",
                                            suffix=".tmp")
        os.close(fd)
        command = [*cxx, *flags, "-x", "c++", str(path), str(wrapper_file), "-o", partial_name]
        try:
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelCompileError(
                    f"{path} does not compile for the CPU emulator ({np.dtype(dtype)}, options "
                    f"{' '.join(options)}); {cxx[0]} exited with {proc.returncode}:\n"
                    f"$ {shlex.join(command)}\n{proc.stdout}{proc.stderr}")
            os.replace(partial_name, library)          # whole or not at all, even in parallel
        finally:
            if os.path.exists(partial_name):
                os.unlink(partial_name)
    return library


class EmulatedModule:
    """The kernels of one file built for one dtype; ``get_function(name)`` as in CuPy."""

    def __init__(self, file, dtype, reverse=False):
        self.file, self.dtype, self.reverse = str(file), np.dtype(dtype), reverse
        self.library = build(file, dtype)
        source = cuda.kernel_path(file).read_text()
        self.signatures = cuda.parse_signatures(source)
        self.cooperative = cooperative(source)      # threads of a block run as fibers
        self._lib = _load(self.library)

    def get_function(self, name):
        if name not in self.signatures:
            raise KernelCompileError(f"{self.file} has no kernel named {name!r}; "
                                     f"it has {sorted(self.signatures)}")
        return EmulatedKernel(self, name)


class EmulatedKernel:
    """A kernel of an ``EmulatedModule``: ``kernel(grid, block, args)`` runs a 1-D launch.

    args are NumPy arrays (C-contiguous; the dtype the module was built for, or int32 for ``int*``)
    and scalars, one per kernel parameter, in order.
    """

    def __init__(self, module, name):
        self.module, self.name = module, name
        self.signature = module.signatures[name]
        self._fn = getattr(module._lib, f"emu_{name}")
        self._fn.restype = ctypes.c_char_p          # nullptr, or what went wrong
        self._fn.argtypes = ([ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
                             + [ctypes.c_void_p if kind != "value" else self._value_type(ctype)
                                for kind, ctype, _ in self.signature])

    def _where(self, argname):
        return f"{self.module.file}:{self.name} argument {argname}"

    def _value_type(self, ctype):
        """ctypes type of a scalar parameter; ``scalar_t`` is the module's element type."""
        if ctype == "scalar_t":
            ctype = "float" if self.module.dtype == np.float32 else "double"
        return _CTYPES[ctype]

    def _array_type(self, ctype):
        if ctype == "scalar_t":
            return self.module.dtype
        if ctype in _INT_POINTERS:
            return np.dtype(_INT_POINTERS[ctype])
        raise TypeError(f"{self.module.file}:{self.name}: unsupported pointer type {ctype}*")

    def __call__(self, grid, block, args):
        gx, bx = _one_dim(grid, "grid"), _one_dim(block, "block")
        if len(args) != len(self.signature):
            raise TypeError(f"{self.module.file}:{self.name} takes {len(self.signature)} "
                            f"arguments, got {len(args)}")
        c_args, buffers = [], []          # buffers: (argname, kind, original array, guarded copy)
        for (kind, ctype, argname), value in zip(self.signature, args):
            if kind == "value":
                c_type = self._value_type(ctype)
                c_args.append(c_type(float(value) if c_type in (ctypes.c_float, ctypes.c_double)
                                     else int(value)))
                continue
            want = self._array_type(ctype)
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{self._where(argname)}: the emulator takes NumPy arrays, got "
                                f"{type(value).__name__}")
            if value.dtype != want:
                raise TypeError(f"{self._where(argname)}: expected {want} ({ctype}*), "
                                f"got {value.dtype}")
            if not value.flags.c_contiguous:
                raise ValueError(f"{self._where(argname)}: must be C-contiguous")
            if kind == "out" and not value.flags.writeable:
                raise ValueError(f"{self._where(argname)}: the kernel writes it; it is read-only")
            for other, okind, oarray, _ in buffers:
                if (kind == "out" or okind == "out") and np.may_share_memory(value, oarray):
                    raise ValueError(f"{self._where(argname)} overlaps argument {other}; the "
                                     "kernel declares its pointers __restrict__")
            guarded = _guarded_copy(value)
            buffers.append((argname, kind, value, guarded))
            c_args.append(guarded[GUARD:].ctypes.data)
        failure = self._fn(gx, bx, int(self.module.reverse), *c_args)
        if failure is not None:
            raise EmulatorError(f"{self.module.file}:{self.name} (grid {gx}, block {bx}): "
                                f"{failure.decode(errors='replace')}")
        for argname, kind, value, guarded in buffers:
            changed = _guard_changes(guarded, value.size)
            if changed:
                raise EmulatorError(f"{self._where(argname)}: the kernel wrote out of bounds, at "
                                    f"element(s) {changed[:8]}{' ...' if len(changed) > 8 else ''}"
                                    f" of an array of {value.size}")
            if kind == "out":
                value.reshape(-1)[...] = guarded[GUARD:GUARD + value.size]


def _one_dim(size, what):
    dims = tuple(size) if isinstance(size, (tuple, list)) else (size,)
    if not dims or any(int(d) != 1 for d in dims[1:]) or int(dims[0]) < 1:
        raise ValueError(f"minicnn emulator: only 1-D launches are emulated; {what}={size}")
    return int(dims[0])


def _poison(dtype, n):
    """n guard elements: NaN for floating point (a read shows in the results), else 0x5A bytes."""
    if dtype.kind == "f":
        return np.full(n, np.nan, dtype=dtype)
    return np.full(n * dtype.itemsize, 0x5A, dtype=np.uint8).view(dtype)


def _guarded_copy(array):
    """A flat copy of ``array`` with GUARD poison elements before and after it."""
    poison = _poison(array.dtype, GUARD)
    return np.concatenate([poison, array.reshape(-1), poison])


def _guard_changes(guarded, size):
    """Indexes (relative to the array: -GUARD..-1 and size..size+GUARD-1) of changed guards."""
    bits = np.dtype(f"u{guarded.itemsize}")
    poison = _poison(guarded.dtype, GUARD).view(bits)
    head = np.flatnonzero(guarded[:GUARD].view(bits) != poison) - GUARD
    tail = np.flatnonzero(guarded[GUARD + size:].view(bits) != poison) + size
    return [int(i) for i in np.concatenate([head, tail])]


def compile_module(file, dtype, reverse=False):
    """Kernel file ``file`` (a name in ``kernels/`` or a path) built for ``dtype`` for the CPU.

    ``reverse``: run the threads of every launch in reverse order (blocks, and the threads of a
    block; in each phase between barriers for cooperative files).
    """
    return EmulatedModule(file, dtype, reverse)


launch = Launcher(compile_module)
"""``launch(file, name, n, *args)``: as ``minicnn.cuda.launch``, with NumPy arrays, on the CPU."""

launch_reversed = Launcher(partial(compile_module, reverse=True))
"""As ``launch``, running the threads of each launch last to first."""
