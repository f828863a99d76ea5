"""``python -m minicnn doctor``: what this machine offers minicnn, and what is missing.

Prints the versions of Python, NumPy and CuPy, the CUDA driver and runtime, the GPU and its
compute capability, where kernel sources and compiled kernels live, and compiles every kernel
file for every dtype (with CuPy on a GPU, else with nvcc when it is installed). Never fails on a
machine without a GPU: it says what is missing and exits 0 (1 only when the kernel sources
themselves are missing, a broken installation).
"""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import __version__, cuda
from .backend import cuda_unavailable_reason


def _line(label, value):
    print(f"  {label:<22} {value}")


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
            facts.append((label, f"{v // 1000}.{v % 1000 // 10}"))
        except Exception as e:
            facts.append((label, f"unavailable ({type(e).__name__}: {e})"))
    cache = os.environ.get("CUPY_CACHE_DIR") or str(Path.home() / ".cupy" / "kernel_cache")
    facts.append(("kernel cache", cache))
    return cupy, facts


def _compile_all_with_cupy():
    for path in cuda.kernel_files():
        for dtype in (np.float32, np.float64):
            try:
                module = cuda.launch.module(path.name, dtype)
                for name in cuda.signatures(path.name):
                    module.get_function(name)
                _line(f"{path.name} {np.dtype(dtype).name}", "compiled (NVRTC)")
            except Exception as e:
                _line(f"{path.name} {np.dtype(dtype).name}", f"FAILED: {e}")


def _compile_all_with_nvcc(nvcc):
    for path in cuda.kernel_files():
        for dtype in (np.float32, np.float64):
            cmd = [nvcc, "-ptx", "-arch=compute_75", *cuda.compile_options(dtype), "-x", "cu",
                   str(path), "-o", os.devnull]
            run = subprocess.run(cmd, capture_output=True, text=True)
            status = "compiled (nvcc -ptx)" if run.returncode == 0 else \
                f"FAILED: {' '.join(cmd)}\n{run.stderr.strip()}"
            _line(f"{path.name} {np.dtype(dtype).name}", status)


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
        _line("GPU", f"{name}, compute capability {dev.compute_capability[0]}.{dev.compute_capability[1:]}")
    else:
        _line("GPU", f"none usable: {reason}")
    try:
        _line("kernel sources", cuda.kernel_dir())
    except FileNotFoundError as e:
        # A broken installation, not a missing GPU: the one case that fails.
        _line("kernel sources", f"MISSING: {e}")
        return 1
    print("kernels:")
    nvcc = shutil.which("nvcc")
    if reason is None:
        _compile_all_with_cupy()
    elif nvcc:
        _compile_all_with_nvcc(nvcc)
    else:
        print("  not compiled: no usable GPU and no nvcc on PATH")
    print("the GPU backend is ready" if reason is None else
          "the GPU backend is not usable here; minicnn runs on the CPU (device('cpu'))")
    return 0
