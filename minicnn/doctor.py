"""``python -m minicnn doctor``: what this machine offers minicnn, and what is missing.

Prints the versions of Python, NumPy, CuPy, the CUDA driver and runtime and NVRTC, the GPU and
its compute capability, where kernel sources and compiled kernels live, and compiles every
kernel file for every dtype: with CuPy on a usable GPU (compiled and loaded), else with NVRTC
through CuPy when CuPy imports (NVRTC needs no GPU), else with ``nvcc -ptx`` when it is on PATH.

Exit status: 0 when nothing is broken, a machine without a GPU included (it says what is
missing); 1 for a broken package: kernel sources missing, or a kernel file that does not compile.
"""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import __version__, cuda
from .backend import cuda_install_hint, cuda_unavailable_reason, format_compute_capability

DTYPES = (np.float32, np.float64)
# The oldest GPU architecture both CUDA 12 and CUDA 13 compile for (Turing).
OLDEST_ARCH = 75


def _line(label, value):
    print(f"  {label:<22} {value}")


def _cuda_version(v):
    return f"{v // 1000}.{v % 1000 // 10}"


def _cupy_facts():
    """(cupy module or None, facts about it as (label, value) pairs)."""
    try:
        import cupy
    except Exception as e:
        return None, [("CuPy", f"not installed ({type(e).__name__}: {e})")]
    facts = [("CuPy", cupy.__version__)]
    rt = cupy.cuda.runtime
    for label, get in (("CUDA driver", rt.driverGetVersion), ("CUDA runtime", rt.runtimeGetVersion)):
        try:
            v = get()
            # cudaDriverGetVersion gives 0 when no driver is installed
            facts.append((label, _cuda_version(v) if v else "none installed"))
        except Exception as e:
            facts.append((label, f"unavailable ({type(e).__name__}: {e})"))
    facts.append(("NVRTC", _nvrtc_version(cupy)))
    cache = os.environ.get("CUPY_CACHE_DIR") or str(Path.home() / ".cupy" / "kernel_cache")
    facts.append(("kernel cache", cache))
    return cupy, facts


def _nvrtc_version(cupy):
    try:
        major, minor = cupy.cuda.nvrtc.getVersion()
    except Exception as e:
        return (f"not loadable ({type(e).__name__}: {' '.join(str(e).split())}); install it with "
                f"{cuda_install_hint(cupy)}")
    return f"{major}.{minor}"


def _report(label, ok, status, options=None, log=""):
    """Print one compile result; failures get the options and the compiler's log. -> ok"""
    _line(label, status if ok else f"FAILED: {status}")
    if not ok and options:
        print(f"    options: {' '.join(options)}")
    if log.strip():
        print("    " + ("warnings:" if ok else "log:"))
        print("\n".join("      " + line for line in log.strip().splitlines()))
    return ok


def _compile_all_with_cupy():
    """On a usable GPU: compile and load every file as minicnn does when it runs. -> all ok"""
    ok = True
    for path in cuda.kernel_files():
        for dtype in DTYPES:
            label = f"{path.name} {np.dtype(dtype).name}"
            try:
                module = cuda.launch.module(path.name, dtype)
                for name in cuda.signatures(path.name):
                    module.get_function(name)
            except Exception as e:   # KernelCompileError: names the file, options and log
                ok = _report(label, False, f"{type(e).__name__}: {e}") and ok
            else:
                _report(label, True, "compiled and loaded (NVRTC, this GPU)")
    return ok


def _cupy_include_options(cupy, options):
    """``options`` with the include folders CuPy adds for RawModule, and why they could not be
    added (None when they were). CuPy >= 14 raises here when the CUDA headers are missing. The
    function is internal to CuPy (cupy/_core/core.pyx, 13 and 14), so it is used only when present."""
    try:
        from cupy._core.core import assemble_cupy_compiler_options
    except ImportError:
        return options, None
    try:
        return assemble_cupy_compiler_options(tuple(options)), None
    except Exception as e:
        return options, f"{type(e).__name__}: {e}"


def _nvrtc_compile(nvrtc, source, name, options):
    """(ok, log, ptx) of one NVRTC compile, through CuPy's thin binding of the NVRTC C API."""
    prog = nvrtc.createProgram(source, name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError:
            return False, nvrtc.getProgramLog(prog), b""
        return True, nvrtc.getProgramLog(prog), nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)


def _compile_all_with_nvrtc(cupy):
    """Without a usable GPU: compile every file to PTX with NVRTC, the compiler minicnn uses on a
    GPU, with the loader's options. NVRTC is a host library; CuPy's own compile functions
    (compile_using_nvrtc, RawModule) ask the CUDA runtime for the current device first, which
    fails without a driver, so the NVRTC calls are made directly. -> all ok"""
    nvrtc = cupy.cuda.nvrtc
    major, minor = nvrtc.getVersion()
    try:
        arch = min(a for a in nvrtc.getSupportedArchs() if a >= OLDEST_ARCH)
    except Exception:   # older NVRTC without the query
        arch = OLDEST_ARCH
    _, headers_problem = _cupy_include_options(cupy, ())
    if headers_problem:
        _line("CUDA headers", f"not found ({headers_problem}); on a GPU, CuPy could not compile "
                              f"any kernel: install them with {cuda_install_hint(cupy)}")
    ok = True
    for path in cuda.kernel_files():
        source = cuda.read_source(path.name)
        for dtype in DTYPES:
            label = f"{path.name} {np.dtype(dtype).name}"
            options, _ = _cupy_include_options(cupy, cuda._nvrtc_options(dtype))
            # As CuPy compiles a RawModule: functions without __device__ still go to the device.
            options = options + (f"-arch=compute_{arch}", "--device-as-default-execution-space")
            compiled, log, ptx = _nvrtc_compile(nvrtc, source, path.name, options)
            missing = [name for name in cuda.signatures(path.name)
                       if f".entry {name}(".encode() not in ptx]
            if compiled and missing:
                ok = _report(label, False, f"no kernel {', '.join(missing)} in the PTX",
                             options, log) and ok
            elif compiled:
                _report(label, True, f"compiled (NVRTC {major}.{minor}, compute_{arch})", log=log)
            else:
                ok = _report(label, False, "NVRTC rejected it", options, log) and ok
    return ok


def _compile_all_with_nvcc(nvcc):
    """Without CuPy's NVRTC: ``nvcc -ptx`` with the loader's options. -> all ok"""
    ok = True
    for path in cuda.kernel_files():
        for dtype in DTYPES:
            options = (f"-arch=compute_{OLDEST_ARCH}", *cuda._nvrtc_options(dtype))
            cmd = [nvcc, "-ptx", *options, "-x", "cu", str(path), "-o", os.devnull]
            run = subprocess.run(cmd, capture_output=True, text=True)
            label = f"{path.name} {np.dtype(dtype).name}"
            if run.returncode == 0:
                _report(label, True, "compiled (nvcc -ptx)", log=run.stderr)
            else:
                ok = _report(label, False, f"nvcc exited with {run.returncode}", options,
                             run.stdout + run.stderr) and ok
    return ok


def _nvrtc_usable(cupy):
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception:
        return False
    return True


def main():
    print(f"minicnn {__version__}")
    _line("Python", f"{platform.python_version()} ({sys.executable})")
    _line("NumPy", np.__version__)
    cupy, facts = _cupy_facts()
    for label, value in facts:
        _line(label, value)
    reason = cuda_unavailable_reason()
    if reason is None:
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        _line("GPU", f"{name}, compute capability {format_compute_capability(dev.compute_capability)}")
    else:
        _line("GPU", f"none usable: {reason}")
    try:
        _line("kernel sources", cuda.kernel_dir())
    except FileNotFoundError as e:
        # A broken installation, not a missing GPU.
        _line("kernel sources", f"MISSING: {e}")
        return 1
    print("kernels:")
    nvcc = shutil.which("nvcc")
    ok = True
    if reason is None:
        ok = _compile_all_with_cupy()
    elif cupy is not None and _nvrtc_usable(cupy):
        ok = _compile_all_with_nvrtc(cupy)
    elif nvcc:
        ok = _compile_all_with_nvcc(nvcc)
    else:
        print("  not compiled: no NVRTC (it comes with CuPy's extra) and no nvcc on PATH")
    print("the GPU backend is ready" if reason is None else
          "the GPU backend is not usable here; minicnn runs on the CPU (device('cpu'))")
    if not ok:
        print("some kernel files did not compile (above): this minicnn package is broken")
        return 1
    return 0
