"""``python -m minicnn selftest`` and ``tools/gpu_table.py``.

Without a GPU the selftest runs its CPU checks (the kernels through the emulator, the layers'
gradchecks), reports every GPU check as skipped with the reason, and exits 0; a check that fails
makes it exit 1 and is named. The table generator is run on synthetic reports and pages in a
temporary folder, never on docs/benchmarks.md itself.
"""
import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minicnn import ops, selftest
from minicnn.fused import windows
from minicnn.backend import cuda_unavailable_reason
from minicnn.testing import emulator

ROOT = Path(__file__).resolve().parents[1]
GPU_REASON = cuda_unavailable_reason()
needs_emulator = pytest.mark.skipif(not emulator.available(),
                                    reason=f"no kernel emulator: {emulator.unavailable_reason()}")


def _load_gpu_table():
    spec = importlib.util.spec_from_file_location("gpu_table", ROOT / "tools" / "gpu_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_quick_selftest_exits_zero_and_writes_both_reports(tmp_path):
    out = tmp_path / "st"
    run = subprocess.run([sys.executable, "-m", "minicnn", "selftest", "--quick", "--out",
                          str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]   # no temp files
    report = _report(out)
    assert report["minicnn_selftest"] == 1 and report["passed"] and report["quick"]
    for key in ("minicnn", "python", "numpy", "cupy", "gpu", "torch", "date"):
        assert key in report["machine"], key
    assert report["tolerances"]["float64"] == 1e-12
    checks = {c["name"]: c for c in report["checks"]}
    assert {c["status"] for c in checks.values()} <= {"pass", "skip"}
    assert checks["every kernel has a check"]["status"] == "pass"
    assert checks["gradcheck Conv2d(3, 4, 3)"]["status"] == "pass"
    assert sum(c["status"] == "pass" for c in checks.values()) == report["counts"]["pass"]
    emulated = [c for name, c in checks.items() if name.startswith("emulated kernel")]
    assert len(emulated) == 2 * len(selftest.KERNELS)
    if emulator.available():
        assert all(c["status"] == "pass" and c["max_error"] <= c["tolerance"] for c in emulated)
    gpu = [c for c in report["checks"] if c["name"].startswith(("GPU ", "layer ", "CUDA graph"))
           or c["group"] == "timing"]
    assert len(gpu) > len(selftest.KERNELS)
    if GPU_REASON is not None:
        assert all(c["status"] == "skip" and c["detail"] == f"no usable GPU: {GPU_REASON}"
                   for c in gpu)
        assert report["timing"] == {"status": "skipped", "reason": f"no usable GPU: {GPU_REASON}"}
        assert f"no usable GPU: {GPU_REASON}" in run.stdout
    page = (out / "report.md").read_text()
    for heading in ("# minicnn selftest", "## Machine", "## Tolerances", "## Checks", "## Timing"):
        assert heading in page
    assert "| emulated kernel im2col float32 |" in page
    assert "PASS  gradcheck Conv2d(3, 4, 3)" in run.stdout


@needs_emulator
def test_a_wrong_kernel_reference_fails_the_check_and_exits_one(tmp_path, monkeypatch, capsys):
    right = ops.col2im

    def wrong(cols, *args, **kwargs):
        return right(cols, *args, **kwargs) * np.float32(1.001)
    monkeypatch.setattr(ops, "col2im", wrong)
    assert selftest.main(["--quick", "--only", "col2im", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: emulated kernel col2im float32, emulated kernel col2im float64" in out
    failed = {c["name"]: c for c in _report(tmp_path)["checks"] if c["status"] == "fail"}
    assert set(failed) == {"emulated kernel col2im float32", "emulated kernel col2im float64"}
    assert failed["emulated kernel col2im float64"]["max_error"] == pytest.approx(1e-3, rel=1e-3)
    assert "> 1e-12" in failed["emulated kernel col2im float64"]["detail"]
    assert "**FAILED**" in (tmp_path / "report.md").read_text()


@needs_emulator
def test_an_exception_in_a_check_is_a_failure_with_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("reference broken on purpose")
    monkeypatch.setattr(windows, "maxpool_blocks_backward", broken)
    assert selftest.main(["--quick", "--only", "maxpool_blocks_backward float64",
                          "--out", str(tmp_path)]) == 1
    [check] = [c for c in _report(tmp_path)["checks"] if c["status"] != "skip"]
    assert check["status"] == "fail"
    assert check["detail"] == "RuntimeError: reference broken on purpose"
    assert "raise RuntimeError" in check["traceback"]


def test_every_kernel_has_a_check():
    outcome = selftest.check_every_kernel_has_a_check(None)
    assert outcome.failures == []


def test_only_that_matches_nothing_is_refused(tmp_path, capsys):
    assert selftest.main(["--only", "no such check", "--out", str(tmp_path)]) == 2
    assert "matches no check" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_relative_error():
    want = np.array([1.0, -4.0, np.nan])
    assert selftest.relative_error(want.copy(), want) == 0.0
    assert selftest.relative_error(np.array([1.0, -3.0, np.nan]), want) == 0.25
    assert selftest.relative_error(np.array([1.0, -4.0, 0.0]), want) == np.inf   # NaN lost
    assert selftest.relative_error(np.array([1, 2]), np.array([1, 3])) == np.inf
    with pytest.raises(AssertionError, match=r"shape \(2,\), expected \(3,\)"):
        selftest.relative_error(np.zeros(2), want)


@contextlib.contextmanager
def _stand_in_gpu(monkeypatch):
    """A usable "GPU": minicnn.testing.capture's strict stand-in for CuPy, kernels emulated."""
    from minicnn.fused import graph
    from minicnn.testing.capture import StrictRecorder, fake_cupy
    with fake_cupy():
        monkeypatch.setattr(graph, "CudaRecorder", StrictRecorder)
        yield


@needs_emulator
def test_the_gpu_kernel_and_layer_checks_run_on_a_stand_in_gpu(tmp_path, monkeypatch):
    """The selftest's own GPU code (arrays moved to the device, the launcher, the comparisons)
    runs on CuPy's stand-in; only a real GPU can show the real kernels' numbers."""
    with _stand_in_gpu(monkeypatch):
        code = selftest.main(["--quick", "--only", "GPU kernel", "--only", "CPU vs GPU",
                              "--out", str(tmp_path)])
    report = _report(tmp_path)
    assert code == 0 and report["machine"]["gpu"] is not None
    passed = [c["name"] for c in report["checks"] if c["status"] == "pass"]
    assert len(passed) == 2 * len(selftest.KERNELS) + 2 * len(selftest._layers()) + 4
    assert "training steps CPU vs GPU float64" in passed
    assert "training steps CPU vs GPU float64, fused" in passed


@pytest.mark.slow
@needs_emulator
def test_the_graph_checks_run_on_a_stand_in_gpu(tmp_path, monkeypatch):
    """fit(cuda_graph=True) recorded under the strict capture stand-in (every kernel emulated at
    batch 128: minutes) gives the eager step's bits."""
    with _stand_in_gpu(monkeypatch):
        code = selftest.main(["--quick", "--only", "CUDA graph", "--only", "kernel products vs",
                              "--out", str(tmp_path)])
    checks = {c["name"]: c for c in _report(tmp_path)["checks"]}
    assert code == 0, checks
    assert checks["CUDA graph step vs eager step"]["max_error"] == 0


# --- tools/gpu_table.py -----------------------------------------------------------------------

PAGE = """# Benchmarks

## GPU

Text before.

{begin}
old table
{end}

Text after.
"""


def _synthetic_report(gpu=True):
    machine = {"minicnn": "0.1.0", "date": "2030-01-02T03:04:05+00:00", "python": "3.12.1",
               "cupy": "14.2.0", "cuda_driver": "13.0", "cuda_runtime": "13.0",
               "gpu": "Some GPU 80GB" if gpu else None, "compute_capability": "9.0",
               "torch": "2.9.0"}
    timing = {"status": "measured", "batch": 128, "steps": 20, "repeats": 5,
              "torch": "PyTorch 2.9.0",
              "rows": [{"name": "minicnn eager, cuBLAS products", "images_per_s": 40000.0},
                       {"name": "minicnn CUDA graph, kernel products", "images_per_s": 150000.0},
                       {"name": "PyTorch fp32 eager, cuDNN", "images_per_s": 100000.0}]}
    if not gpu:
        timing = {"status": "skipped", "reason": "no usable GPU: none here"}
    return {"minicnn_selftest": 1, "passed": True, "quick": False,
            "counts": {"pass": 90, "fail": 0, "skip": 0}, "machine": machine, "timing": timing,
            "checks": []}


def _page_and_report(tmp_path, report):
    gpu_table = _load_gpu_table()
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE.format(begin=gpu_table.BEGIN, end=gpu_table.END))
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return gpu_table, page, path


def test_gpu_table_is_written_between_the_markers(tmp_path):
    gpu_table, page, report = _page_and_report(tmp_path, _synthetic_report())
    assert gpu_table.main([str(report), "--docs", str(page)]) == 0
    text = page.read_text()
    assert "old table" not in text
    assert text.startswith("# Benchmarks\n\n## GPU\n\nText before.\n\n" + gpu_table.BEGIN + "\n")
    assert text.endswith("\n" + gpu_table.END + "\n\nText after.\n")
    assert "| minicnn CUDA graph, kernel products | 150,000 | 1.50x |" in text
    assert "| minicnn eager, cuBLAS products | 40,000 | 0.40x |" in text
    assert "| PyTorch fp32 eager, cuDNN | 100,000 | 1.00x |" in text
    prose = " ".join(text.split())                          # the paragraphs are wrapped
    assert "Some GPU 80GB (compute capability 9.0)" in prose and "2030-01-02" in prose
    assert gpu_table.main([str(report), "--docs", str(page)]) == 0
    assert page.read_text() == text                        # the same report, the same page


def test_gpu_table_of_a_report_without_a_gpu_says_not_measured(tmp_path):
    gpu_table, page, report = _page_and_report(tmp_path, _synthetic_report(gpu=False))
    assert gpu_table.main([str(report), "--docs", str(page)]) == 0
    text = page.read_text()
    assert "**GPU figures: not yet measured.**" in text and "images/s" not in text


def test_gpu_table_refuses_a_bad_report_or_page(tmp_path, capsys):
    bad = _synthetic_report()
    del bad["timing"]
    gpu_table, page, report = _page_and_report(tmp_path, bad)
    before = page.read_text()
    assert gpu_table.main([str(report), "--docs", str(page)]) == 1
    assert "expected report.json to hold 'timing'" in capsys.readouterr().err
    report.write_text(json.dumps(_synthetic_report()))
    page.write_text("# no markers\n")
    assert gpu_table.main([str(report), "--docs", str(page)]) == 1
    assert "expected the page to hold the markers" in capsys.readouterr().err
    assert page.read_text() == "# no markers\n" and before != page.read_text()


def test_the_docs_hold_one_generated_gpu_block():
    gpu_table = _load_gpu_table()
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert text.count(gpu_table.BEGIN) == 1 and text.count(gpu_table.END) == 1
    block = text.split(gpu_table.BEGIN)[1].split(gpu_table.END)[0].strip()
    assert block.startswith(("**GPU figures: not yet measured.**", "Measured by"))


# --- on a GPU --------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(GPU_REASON is not None, reason=f"no usable GPU: {GPU_REASON}")
def test_full_selftest_on_the_gpu(tmp_path):
    run = subprocess.run([sys.executable, "-m", "minicnn", "selftest", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    report = _report(tmp_path)
    failed = [f"{c['name']}: {c['detail']}" for c in report["checks"] if c["status"] == "fail"]
    assert run.returncode == 0 and not failed, "\n".join(failed) + run.stdout[-3000:]
    skipped = [c["name"] for c in report["checks"] if c["status"] == "skip"
               and not c["detail"].startswith("no kernel emulator")]   # g++ may be missing
    assert not skipped, skipped
    assert report["machine"]["gpu"] and report["timing"]["status"] == "measured"
    assert report["seconds"] < 300
