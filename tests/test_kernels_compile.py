"""Every kernel file compiles with nvcc for each dtype, and no kernel spills registers.

For each file of kernels/ and each dtype (float32, float64), with the options the GPU build uses
(``minicnn.cuda.compile_options`` and NVRTC's ``--std=c++14``):
- ``nvcc -ptx -arch=compute_75`` compiles it without warnings;
- ``nvcc -cubin -arch=sm_75 -Xptxas -v`` reports, for every ``extern "C"`` kernel of the file,
  0 bytes of spill stores and 0 bytes of spill loads.
Skipped when nvcc is not on PATH (no GPU is needed: nvcc only compiles).
"""
import re
import shlex
import shutil
import subprocess

import numpy as np
import pytest

from minicnn import cuda

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (CUDA toolkit missing)")

FILES = [path.name for path in cuda.kernel_files()]
DTYPES = [np.float32, np.float64]

# ptxas -v, per kernel:
#   ptxas info    : Function properties for im2col
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 31 registers, used 0 barriers, 416 bytes cmem[0]
_PROPERTIES = re.compile(r"Function properties for (\w+)\s*\n\s*(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_ENTRY = re.compile(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", re.S)


def nvcc(*args, tmp_path):
    command = [NVCC, *args]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    return proc.returncode, proc.stdout + proc.stderr, shlex.join(command)


@pytest.mark.parametrize("dtype", [None, *DTYPES], ids=["standalone", "f32", "f64"])
@pytest.mark.parametrize("file", FILES)
def test_ptx_compiles_without_warnings(file, dtype, tmp_path):
    """With the loader's options, and standalone (plain ``nvcc -ptx file.cu``: float)."""
    options = cuda.compile_options(dtype) if dtype is not None else ()
    source = cuda.kernel_dir() / file
    rc, log, command = nvcc("-ptx", "-arch=compute_75", "-std=c++14", *options, "-x", "cu",
                            str(source), "-o", "kernel.ptx", tmp_path=tmp_path)
    where = f"{file} with options {' '.join(options)}:\n$ {command}\n{log}"
    assert rc == 0, f"nvcc -ptx failed for {where}"
    assert "warning" not in log.lower(), f"nvcc -ptx warns for {where}"
    ptx = (tmp_path / "kernel.ptx").read_text()
    for name in cuda.parse_signatures(source.read_text()):
        assert f".entry {name}(" in ptx, f"kernel {name} missing from the PTX of {where}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("file", FILES)
def test_no_register_spills(file, dtype, tmp_path):
    options = cuda.compile_options(dtype)
    source = cuda.kernel_dir() / file
    rc, log, command = nvcc("-cubin", "-arch=sm_75", "-std=c++14", "-Xptxas", "-v", *options,
                            "-x", "cu", str(source), "-o", "kernel.cubin", tmp_path=tmp_path)
    where = f"{file} with options {' '.join(options)}:\n$ {command}\n{log}"
    assert rc == 0, f"nvcc -cubin failed for {where}"
    report = {name: (int(stores), int(loads))
              for name, _, stores, loads in _PROPERTIES.findall(log)}
    registers = dict(_ENTRY.findall(log))
    for name in cuda.parse_signatures(source.read_text()):
        assert name in report, f"no ptxas report for kernel {name} of {where}"
        assert report[name] == (0, 0), (f"kernel {name} spills ({report[name][0]} bytes stored, "
                                        f"{report[name][1]} bytes loaded) in {where}")
        assert name in registers, f"no register count for kernel {name} of {where}"


def test_every_kernel_file_is_compiled():
    """FILES is read from kernels/ itself: a new file (gemm_tiled.cu, say) is checked too."""
    assert FILES == sorted(p.name for p in cuda.kernel_dir().glob("*.cu"))
    assert {"gemm.cu", "gemm_tiled.cu"} <= set(FILES)
