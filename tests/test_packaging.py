"""The wheel carries everything an installed minicnn needs: the kernel sources, the emulator
header and the MNIST sample. Built here, installed into a fresh virtual environment, imported from
there (nothing is launched)."""
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tqdm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                            str(ROOT)], capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        pytest.skip(f"could not build the wheel here (no network for the build backend?):\n"
                    f"{build.stderr[-2000:]}")
    (path,) = out.glob("minicnn-*.whl")
    return path


def test_wheel_lists_kernels_sample_and_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(p.name for p in (ROOT / "kernels").glob("*.cu"))
    assert sources, "no kernel sources in the checkout"
    for name in sources:
        assert f"minicnn/kernels/{name}" in names
    for name in ("minicnn/_sample/mnist_sample.npz", "minicnn/_sample/ATTRIBUTION.md",
                 "minicnn/testing/cuda_emulator.h"):
        assert name in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_wheel_finds_its_kernel_sources(wheel, tmp_path):
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = Path(subprocess.run(
        [str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    # A pure-Python wheel installs by unpacking it into site-packages.
    zipfile.ZipFile(wheel).extractall(site)
    # numpy and tqdm come from this environment's own folders (only those two: a path file here
    # would otherwise pull in this checkout).
    deps = {str(Path(np.__file__).parents[1]), str(Path(tqdm.__file__).parents[1])}
    (site / "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    check = textwrap.dedent(f"""
        import minicnn, minicnn.cuda as cuda
        from pathlib import Path
        assert Path(minicnn.__file__).is_relative_to({str(site)!r}), minicnn.__file__
        assert cuda.kernel_dir() == Path(minicnn.__file__).parent / "kernels", cuda.kernel_dir()
        files = [p.name for p in cuda.kernel_files()]
        kernels = {{f: sorted(cuda.signatures(f)) for f in files}}
        assert all(kernels.values()), kernels
        assert len(minicnn.mnist_sample(train=False)) == 1000
        print(kernels)
    """)
    run = subprocess.run([str(env / "bin" / "python"), "-c", check], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert "im2col" in run.stdout and "maxpool2d_forward" in run.stdout



def test_cuda_extras_bring_the_cuda_libraries():
    """The GPU extras install CuPy with its ``ctk`` extra (NVRTC, cuBLAS and the CUDA headers as
    NVIDIA wheels): without it CuPy expects a CUDA toolkit on the machine."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cuda12"] == ["cupy-cuda12x[ctk]>=14"]
    assert extras["cuda13"] == ["cupy-cuda13x[ctk]>=14"]
