"""The command-line tools: ``python -m minicnn doctor``, the CPU-vs-GPU example, the benchmark."""
import json
import runpy
import subprocess
import sys
from pathlib import Path

from minicnn.backend import cuda_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]


def test_doctor_reports_and_exits_zero():
    run = subprocess.run([sys.executable, "-m", "minicnn", "doctor"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for label in ("Python", "NumPy", "CuPy", "GPU", "kernel sources"):
        assert label in out
    reason = cuda_unavailable_reason()
    if reason is not None:
        assert f"none usable: {reason}" in out
        assert "the GPU backend is not usable here" in out
    assert "FAILED" not in out


def test_cpu_vs_gpu_example_runs(capsys):
    example = runpy.run_path(str(ROOT / "examples" / "cpu_vs_gpu.py"))
    times = example["main"](["--steps", "3", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert times["cpu"] > 0 and "cpu :" in out
    if cuda_unavailable_reason() is not None:
        assert "gpu : not available" in out and "cuda" not in times


def test_benchmark_writes_json(tmp_path, capsys):
    bench = runpy.run_path(str(ROOT / "benchmarks" / "train.py"))
    bench["main"](["--batch-sizes", "8", "--steps", "2", "--repeats", "1", "--layers",
                   "--json", str(tmp_path / "b.json")])
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["training"][0]["batch"] == 8
    assert report["training"][0]["minicnn_images_per_s"] > 0          # the fused network
    assert report["training"][0]["minicnn_plain_images_per_s"] > 0
    if bench["torch_usable"]("cpu"):          # in this process, and alone in a child process
        assert report["training"][0]["torch_images_per_s"] > 0
        assert report["training"][0]["torch_alone_images_per_s"] > 0
    assert [row["layer"].split("(")[0] for row in report["layers"]] == [
        "FusedConv2d", "FusedConv2d", "Flatten", "FusedLinear", "Linear"]
    assert "img/s" in capsys.readouterr().out
