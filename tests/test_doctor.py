"""The GPU's front door, checked without a GPU: the device probe, the kernel compile/load path,
the TF32 switch and ``python -m minicnn doctor``, each against a stand-in ``cupy`` module put in
``sys.modules``. The stand-in raises what a broken CuPy install raises (OSError, RuntimeError,
ImportError, CuPy's CompileException) and counts the calls a launch makes. The tests marked gpu
repeat the checks on a real GPU."""
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import minicnn
from minicnn import backend, cuda, doctor

ROOT = Path(__file__).resolve().parents[1]
PROBE = backend._probe_cuda          # the cached probe (some tests replace it for a while)


# --- a stand-in for CuPy ----------------------------------------------------------------------

class FakeArray:
    def __init__(self, values, dtype=None):
        self.values = np.array(values, dtype=dtype)

    def get(self):
        return self.values.copy()

    def __matmul__(self, other):
        return FakeArray(self.values @ other.values)


class CompileException(Exception):
    """Shaped like cupy.cuda.compiler.CompileException: the log comes from get_message()."""

    def __init__(self, log):
        super().__init__()
        self._log = log

    def get_message(self):
        return self._log

    def __str__(self):
        return self._log


class NVRTCError(RuntimeError):
    pass


def fake_cupy(*, devices=1, runtime=12090, driver=12090, count_error=None, nvrtc_error=None,
              kernel_error=None, kernel_result=None, matmul_error=None, cc="90",
              raw_module=None, nvrtc_compile=None):
    """A module with the parts of CuPy that minicnn's GPU glue touches; ``calls`` counts them."""
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "14.2.0"
    cupy.calls = {"RawKernel": 0, "matmul": 0}
    cupy.float32 = np.float32

    def get_device_count():
        if count_error is not None:
            raise count_error
        return devices

    rt = types.SimpleNamespace(
        getDeviceCount=get_device_count, runtimeGetVersion=lambda: runtime,
        driverGetVersion=lambda: driver, getDevice=lambda: 0,
        getDeviceProperties=lambda i: {"name": b"Fake GPU"})

    def nvrtc_version():
        if nvrtc_error is not None:
            raise nvrtc_error
        return (12, 9)

    nvrtc = types.SimpleNamespace(getVersion=nvrtc_version, NVRTCError=NVRTCError,
                                  getSupportedArchs=lambda: (50, 52, 60, 75, 80, 90))
    if nvrtc_compile is not None:
        nvrtc_compile.install(nvrtc)

    class Stream:
        def __init__(self, non_blocking=False):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Device:
        id = 0
        compute_capability = cc

    cupy.cuda = types.SimpleNamespace(runtime=rt, nvrtc=nvrtc, Stream=Stream, Device=Device,
                                      compiler=types.SimpleNamespace(CompileException=CompileException))

    def raw_kernel(code, name, options=()):
        cupy.calls["RawKernel"] += 1
        if kernel_error is not None:
            raise kernel_error

        def launch(grid, block, args):
            out, step = args
            out.values[:] = step * np.arange(block[0]) if kernel_result is None else kernel_result
        return launch

    def asarray(values, dtype=None):
        if matmul_error is None:
            return FakeArray(values, dtype)

        class Failing:
            def __matmul__(self, other):
                cupy.calls["matmul"] += 1
                raise matmul_error
        return Failing()

    cupy.RawKernel = raw_kernel
    cupy.zeros = lambda n, dtype=None: FakeArray(np.zeros(n, dtype))
    cupy.asarray = asarray
    if raw_module is not None:
        cupy.RawModule = raw_module
    return cupy


@pytest.fixture(autouse=True)
def _fresh_probe(monkeypatch):
    """Each test probes anew, and leaves no verdict about a stand-in behind."""
    PROBE.cache_clear()
    monkeypatch.setattr(backend, "_tf32", False)
    monkeypatch.setattr(backend, "_auto_announced", False)
    yield
    PROBE.cache_clear()


def use(monkeypatch, cupy):
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    return cupy


# --- compute capability -----------------------------------------------------------------------

@pytest.mark.parametrize("cc,text", [("75", "7.5"), ("90", "9.0"), ("100", "10.0"),
                                     ("120", "12.0"), ("121", "12.1"), ("86", "8.6")])
def test_compute_capability_is_written_as_nvidia_writes_it(cc, text):
    assert backend.format_compute_capability(cc) == text


@pytest.mark.parametrize("bad", ["", "9", "9.0", "sm_90"])
def test_compute_capability_rejects_what_cupy_never_gives(bad):
    with pytest.raises(ValueError, match="expected digits"):
        backend.format_compute_capability(bad)


# --- the device probe -------------------------------------------------------------------------

def test_probe_accepts_a_gpu_that_compiles_runs_and_multiplies(monkeypatch):
    cupy = use(monkeypatch, fake_cupy())
    assert backend.cuda_unavailable_reason() is None
    assert minicnn.device("auto") == "cuda"


def test_probe_runs_once_per_process_until_reset(monkeypatch):
    cupy = use(monkeypatch, fake_cupy())
    for _ in range(3):
        assert backend.cuda_unavailable_reason() is None
        minicnn.device("cuda")
    assert cupy.calls["RawKernel"] == 1
    backend._probe_cuda.cache_clear()
    backend.cuda_unavailable_reason()
    assert cupy.calls["RawKernel"] == 2


@pytest.mark.parametrize("runtime,extra", [(12090, "cuda12"), (13000, "cuda13")])
def test_missing_nvrtc_names_the_extra_of_this_cupy(monkeypatch, capsys, runtime, extra):
    error = OSError("libnvrtc.so.12: cannot open shared object file: No such file or directory")
    use(monkeypatch, fake_cupy(runtime=runtime, nvrtc_error=error))
    reason = backend.cuda_unavailable_reason()
    assert "NVRTC" in reason and "could not be loaded" in reason and "libnvrtc.so.12" in reason
    assert f"pip install 'minicnn[{extra}]'" in reason
    assert minicnn.device("auto") == "cpu"               # a GPU that cannot compile is not chosen
    assert f"device 'auto' chose cpu ({reason})" in capsys.readouterr().out
    with pytest.raises(minicnn.DeviceError, match="NVRTC"):
        minicnn.device("cuda")


def test_a_kernel_that_does_not_compile_is_reported_with_the_fix(monkeypatch):
    error = RuntimeError("Failed to find CUDA headers. Please install CUDA toolkit headers")
    use(monkeypatch, fake_cupy(kernel_error=error))
    reason = backend.cuda_unavailable_reason()
    assert "test kernel" in reason and "Failed to find CUDA headers" in reason
    assert "pip install 'minicnn[cuda12]'" in reason
    assert minicnn.device("auto") == "cpu"


def test_a_kernel_that_computes_nonsense_is_reported(monkeypatch):
    use(monkeypatch, fake_cupy(kernel_result=np.zeros(4)))
    reason = backend.cuda_unavailable_reason()
    assert "computed [0.0, 0.0, 0.0, 0.0] instead of [0.0, 0.5, 1.0, 1.5]" in reason


def test_missing_cublas_is_reported_with_the_fix(monkeypatch):
    error = ImportError("libcublas.so.12: cannot open shared object file")
    cupy = use(monkeypatch, fake_cupy(matmul_error=error))
    reason = backend.cuda_unavailable_reason()
    assert cupy.calls["matmul"] == 1
    assert "cuBLAS" in reason and "libcublas.so.12" in reason
    assert "pip install 'minicnn[cuda12]'" in reason
    assert minicnn.device("auto") == "cpu"


def test_no_driver_and_an_old_driver_say_what_to_do(monkeypatch):
    error = RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    use(monkeypatch, fake_cupy(count_error=error, driver=0))
    reason = backend.cuda_unavailable_reason()
    assert "cudaErrorInsufficientDriver" in reason and "no NVIDIA driver is installed" in reason
    backend._probe_cuda.cache_clear()
    use(monkeypatch, fake_cupy(count_error=error, driver=12040, runtime=13000))
    reason = backend.cuda_unavailable_reason()
    assert "the driver supports CUDA 12.4, older than this CuPy's CUDA 13" in reason
    assert "pip install 'minicnn[cuda12]'" in reason


def test_no_visible_device(monkeypatch):
    use(monkeypatch, fake_cupy(devices=0))
    assert "no CUDA device is visible" in backend.cuda_unavailable_reason()


# --- compiling and loading kernels ------------------------------------------------------------

class RawModuleRaising:
    """RawModule whose constructor (or compile) raises ``error``."""

    def __init__(self, error, at="init"):
        self.error, self.at = error, at

    def __call__(self, code, options):
        if self.at == "init":
            raise self.error
        outer = self

        class Module:
            def compile(self):
                raise outer.error
        return Module()


@pytest.mark.parametrize("error", [
    OSError("libnvrtc.so.12: cannot open shared object file"),
    RuntimeError("Failed to find CUDA headers. Please install CUDA toolkit headers"),
    ImportError("cannot import name 'nvrtc'"),
], ids=["OSError", "RuntimeError", "ImportError"])
@pytest.mark.parametrize("at", ["init", "compile"])
def test_every_compile_failure_is_a_kernel_compile_error_with_the_fix(monkeypatch, error, at):
    use(monkeypatch, fake_cupy(raw_module=RawModuleRaising(error, at)))
    with pytest.raises(cuda.KernelCompileError) as caught:
        cuda._cupy_compile("pool.cu", np.float64)
    message = str(caught.value)
    assert "pool.cu for float64" in message
    assert "-Dscalar_t=double -Dacc_t=double --std=c++14" in message
    assert f"{type(error).__name__}: {error}" in message
    assert "pip install 'minicnn[cuda12]'" in message
    assert caught.value.__cause__ is error


def test_a_source_nvrtc_rejects_gives_its_log(monkeypatch):
    log = "pool.cu(12): error: identifier \"scalar\" is undefined\n1 error detected"
    use(monkeypatch, fake_cupy(raw_module=RawModuleRaising(CompileException(log))))
    with pytest.raises(cuda.KernelCompileError) as caught:
        cuda._cupy_compile("pool.cu", np.float32)
    message = str(caught.value)
    assert "NVRTC rejected pool.cu for float32 with options -Dscalar_t=float" in message
    assert "the kernel source needs fixing" in message and log in message


def test_a_missing_header_in_the_log_points_at_the_extra(monkeypatch):
    log = 'pool.cu(1): catastrophic error: cannot open source file "cuda_fp16.h"'
    use(monkeypatch, fake_cupy(raw_module=RawModuleRaising(CompileException(log))))
    with pytest.raises(cuda.KernelCompileError, match=r"install the CUDA headers with pip "
                                                      r"install 'minicnn\[cuda12\]'"):
        cuda._cupy_compile("pool.cu", np.float32)


class CountingRawModule:
    """RawModule stand-in: counts get_function calls (CuPy builds a RawKernel on each)."""

    def __init__(self, missing=()):
        self.get_function_calls, self.kernel_calls, self.missing = 0, [], missing

    def __call__(self, code, options):
        self.options = options
        return self

    def compile(self):
        pass

    def get_function(self, name):
        self.get_function_calls += 1
        if name in self.missing:
            raise RuntimeError("CUDA_ERROR_NOT_FOUND: named symbol not found")
        return lambda grid, block, args: self.kernel_calls.append((name, grid, block, args))


def test_each_kernel_is_looked_up_once_per_module(monkeypatch):
    raw = CountingRawModule()
    use(monkeypatch, fake_cupy(raw_module=raw))
    module = cuda._cupy_compile("pool.cu", np.float32)
    first = module.get_function("maxpool2d_backward")
    assert all(module.get_function("maxpool2d_backward") is first for _ in range(5))
    module.get_function("avgpool2d_forward")
    assert raw.get_function_calls == 2


def test_launches_reuse_the_module_and_the_kernel(monkeypatch):
    raw = CountingRawModule()
    use(monkeypatch, fake_cupy(raw_module=raw))
    launch = cuda._CupyLauncher(cuda._cupy_compile)
    dy, y, dx = (np.ones(10, np.float32) for _ in range(3))
    for _ in range(4):
        launch("fused.cu", "relu_backward", 10, dy, y, dx, 10)
    assert raw.get_function_calls == 1 and len(raw.kernel_calls) == 4
    name, grid, block, args = raw.kernel_calls[0]
    assert name == "relu_backward" and grid == (1,) and block == (cuda.THREADS_PER_BLOCK,)
    assert type(args[3]) is np.int64                # the kernel's long long n


def test_a_kernel_that_cannot_be_loaded_names_file_kernel_and_options(monkeypatch):
    raw = CountingRawModule(missing={"relu_backward"})
    use(monkeypatch, fake_cupy(raw_module=raw))
    launch = cuda._CupyLauncher(cuda._cupy_compile)
    dy, y, dx = (np.ones(10, np.float32) for _ in range(3))
    with pytest.raises(cuda.KernelCompileError) as caught:
        launch("fused.cu", "relu_backward", 10, dy, y, dx, 10)
    message = str(caught.value)
    assert "while loading kernel relu_backward" in message
    assert "fused.cu: kernel relu_backward could not be loaded" in message
    assert "-Dscalar_t=float -Dacc_t=float --std=c++14" in message
    assert "CUDA_ERROR_NOT_FOUND" in message and "pip install 'minicnn[cuda12]'" in message


# --- TF32 -------------------------------------------------------------------------------------

def fake_linalg(monkeypatch, initial=1):
    """cupy._core._routines_linalg: the float32 compute type CuPy's 2-D GEMM reads."""
    linalg = types.ModuleType("cupy._core._routines_linalg")
    linalg.COMPUTE_TYPE_DEFAULT, linalg.COMPUTE_TYPE_TF32 = 1, 7
    linalg.mode, linalg.calls = initial, []

    def set_compute_type(dtype, mode):
        linalg.calls.append((np.dtype(dtype), mode))
        linalg.mode = mode
    linalg.set_compute_type = set_compute_type
    linalg.get_compute_type = lambda dtype: linalg.mode
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    monkeypatch.setitem(sys.modules, "cupy._core", core)
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", linalg)
    return linalg


def test_tf32_is_refused_below_compute_capability_8_and_nothing_changes(monkeypatch):
    cupy = use(monkeypatch, fake_cupy(cc="75"))
    cupy.__path__ = []                                   # a package, so cupy._core resolves
    linalg = fake_linalg(monkeypatch)
    with pytest.raises(minicnn.DeviceError) as caught:
        backend.allow_tf32(True)
    message = str(caught.value)
    assert "'Fake GPU' has compute capability 7.5" in message and "8.0" in message
    assert linalg.calls == [] and backend.tf32_allowed() is False
    assert backend.allow_tf32(False) is False            # turning it off is always fine
    assert linalg.calls == [(np.dtype(np.float32), 1)]


def test_tf32_on_an_ampere_gpu_sets_cupys_compute_type(monkeypatch):
    cupy = use(monkeypatch, fake_cupy(cc="86"))
    cupy.__path__ = []
    linalg = fake_linalg(monkeypatch)
    assert backend.allow_tf32(True) is False
    assert linalg.calls == [(np.dtype(np.float32), 7)] and backend.tf32_allowed() is True
    assert backend.allow_tf32(False) is True
    assert linalg.mode == 1 and backend.tf32_allowed() is False


def test_tf32_allowed_reports_what_cupy_does(monkeypatch):
    """CUPY_TF32=1 makes CuPy use TF32 with no allow_tf32 call: tf32_allowed says so."""
    cupy = use(monkeypatch, fake_cupy(cc="90"))
    cupy.__path__ = []
    fake_linalg(monkeypatch, initial=7)
    assert backend._tf32 is False and backend.tf32_allowed() is True


def test_tf32_without_a_gpu_only_records_the_wish(monkeypatch):
    use(monkeypatch, fake_cupy(nvrtc_error=OSError("no nvrtc")))
    assert backend.allow_tf32(True) is False and backend.tf32_allowed() is True
    assert backend.allow_tf32(False) is True and backend.tf32_allowed() is False


# --- doctor -----------------------------------------------------------------------------------

class FakeNVRTC:
    """NVRTC's C API as CuPy binds it (cupy.cuda.nvrtc); compiles by reading the signatures."""

    def __init__(self, fail=None):
        self.fail, self.compiled, self.destroyed = fail or {}, [], 0

    def install(self, nvrtc):
        nvrtc.createProgram = lambda src, name, headers, include_names: {"src": src, "name": name}
        nvrtc.compileProgram = self.compile
        nvrtc.getProgramLog = lambda prog: prog.get("log", "")
        nvrtc.getPTX = lambda prog: "".join(f".visible .entry {k}(\n" for k in
                                            cuda.parse_signatures(prog["src"])).encode()
        nvrtc.destroyProgram = self.destroy

    def compile(self, prog, options):
        self.compiled.append((prog["name"], tuple(options)))
        log = self.fail.get((prog["name"], next(o for o in options if o.startswith("-Dscalar_t"))))
        if log is not None:
            prog["log"] = log
            raise NVRTCError("NVRTC_ERROR_COMPILATION (6)")

    def destroy(self, prog):
        self.destroyed += 1


def run_doctor(capsys):
    code = doctor.main()
    return code, capsys.readouterr().out


def no_gpu(monkeypatch, reason="no CUDA device is visible"):
    monkeypatch.setattr(backend, "_probe_cuda", lambda: reason)


def test_doctor_compiles_every_kernel_with_nvrtc_without_a_gpu(monkeypatch, capsys):
    nvrtc = FakeNVRTC()
    use(monkeypatch, fake_cupy(nvrtc_compile=nvrtc))
    no_gpu(monkeypatch)
    code, out = run_doctor(capsys)
    assert code == 0, out
    assert re.search(r"^  NVRTC +12\.9$", out, re.M)
    files = [p.name for p in cuda.kernel_files()]
    for name in files:
        for dtype in ("float32", "float64"):
            assert re.search(rf"^  {re.escape(name)} {dtype} +compiled \(NVRTC 12\.9, compute_75\)$",
                             out, re.M), out
    assert len(nvrtc.compiled) == 2 * len(files) == nvrtc.destroyed
    name, options = nvrtc.compiled[0]
    # CuPy's include folders may come around them, as RawModule passes them
    assert " -Dscalar_t=float -Dacc_t=float --std=c++14 " in f" {' '.join(options)} "
    assert "-arch=compute_75" in options and "--device-as-default-execution-space" in options


def test_doctor_prints_file_options_and_log_of_a_failure_and_exits_1(monkeypatch, capsys):
    log = "pool.cu(40): error: expected a \";\""
    use(monkeypatch, fake_cupy(nvrtc_compile=FakeNVRTC(fail={("pool.cu", "-Dscalar_t=double"): log})))
    no_gpu(monkeypatch)
    code, out = run_doctor(capsys)
    assert code == 1
    assert re.search(r"^  pool\.cu float64 +FAILED: NVRTC rejected it$", out, re.M), out
    assert re.search(r"^    options: (.* )?-Dscalar_t=double -Dacc_t=double --std=c\+\+14 ", out, re.M)
    assert "      " + log in out
    assert re.search(r"^  pool\.cu float32 +compiled", out, re.M)
    assert "this minicnn package is broken" in out


def test_doctor_without_nvrtc_or_nvcc_says_why_and_exits_0(monkeypatch, capsys):
    use(monkeypatch, fake_cupy(nvrtc_error=OSError("libnvrtc.so.12: cannot open shared object")))
    no_gpu(monkeypatch, "NVRTC could not be loaded")
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    code, out = run_doctor(capsys)
    assert code == 0
    assert ("NVRTC                  not loadable (OSError: libnvrtc.so.12: cannot open shared "
            "object); install it with pip install 'minicnn[cuda12]'") in out
    assert "not compiled: no NVRTC" in out and "FAILED" not in out


def test_doctor_falls_back_to_nvcc_and_reports_its_failures(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "cupy", None)      # import cupy -> ImportError
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'kernel.cu(3): error: something is wrong' >&2\nexit 2\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(doctor.shutil, "which", lambda name: str(nvcc))
    code, out = run_doctor(capsys)
    assert code == 1
    assert re.search(r"^  im2col\.cu float32 +FAILED: nvcc exited with 2$", out, re.M), out
    assert "    options: -arch=compute_75 -Dscalar_t=float -Dacc_t=float --std=c++14" in out
    assert "      kernel.cu(3): error: something is wrong" in out


def test_doctor_exits_1_without_kernel_sources(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)

    def missing():
        raise FileNotFoundError("minicnn: no CUDA kernel sources (*.cu) in /nowhere")
    monkeypatch.setattr(cuda, "kernel_dir", missing)
    code, out = run_doctor(capsys)
    assert code == 1 and "MISSING: minicnn: no CUDA kernel sources" in out


def test_doctor_prints_the_gpu_compute_capability_as_major_dot_minor(monkeypatch, capsys):
    raw = CountingRawModule()
    cupy = use(monkeypatch, fake_cupy(cc="100", raw_module=raw))
    monkeypatch.setattr(cuda, "launch", cuda._CupyLauncher(cuda._cupy_compile))
    code, out = run_doctor(capsys)
    assert code == 0, out
    assert "GPU                    Fake GPU, compute capability 10.0" in out
    assert re.search(r"^  im2col\.cu float64 +compiled and loaded \(NVRTC, this GPU\)$", out, re.M)
    assert "the GPU backend is ready" in out


def _cupy_with_nvrtc():
    """Whether a real CuPy with a loadable NVRTC is importable here (no GPU needed)."""
    try:
        import cupy
        cupy.cuda.nvrtc.getVersion()
    except Exception:
        return False
    return True


def _doctor_reports_every_kernel(status):
    """Run ``python -m minicnn doctor``; assert it exits 0 and reports every kernel file and
    dtype as ``status``; -> its output."""
    run = subprocess.run([sys.executable, "-m", "minicnn", "doctor"], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    for path in cuda.kernel_files():
        for dtype in ("float32", "float64"):
            assert re.search(rf"^  {re.escape(path.name)} {dtype} +{status}", run.stdout,
                             re.M), run.stdout
    return run.stdout


@pytest.mark.skipif(not _cupy_with_nvrtc(), reason="CuPy with NVRTC is not installed here")
def test_doctor_compiles_every_kernel_with_the_real_nvrtc():
    out = _doctor_reports_every_kernel("compiled")
    assert re.search(r"^  NVRTC +\d+\.\d+$", out, re.M), out
    assert "FAILED" not in out


# --- on a real GPU ----------------------------------------------------------------------------

def _real_reason():
    backend._probe_cuda.cache_clear()
    return backend.cuda_unavailable_reason()


GPU_REASON = _real_reason()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"no usable GPU: {GPU_REASON}")
def test_gpu_doctor_compiles_and_loads_every_kernel():
    out = _doctor_reports_every_kernel("compiled and loaded")
    assert re.search(r"compute capability \d+\.\d$", out, re.M), out


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"no usable GPU: {GPU_REASON}")
def test_gpu_kernels_are_looked_up_once_and_errors_carry_the_log(tmp_path):
    module = cuda.launch.module("pool.cu", np.float32)
    assert module.get_function("maxpool2d_backward") is module.get_function("maxpool2d_backward")
    broken = tmp_path / "broken.cu"
    broken.write_text('extern "C" __global__ void broken(scalar_t* y) { y[0] = undefined_name; }\n')
    with pytest.raises(cuda.KernelCompileError) as caught:
        cuda._cupy_compile(str(broken), np.float32)
    message = str(caught.value)
    assert "NVRTC rejected" in message and "broken.cu" in message and "undefined_name" in message


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"no usable GPU: {GPU_REASON}")
def test_gpu_tf32_switch_follows_the_compute_capability():
    import cupy
    from cupy._core import _routines_linalg as linalg
    cc = cupy.cuda.Device().compute_capability
    try:
        if int(cc) < 80:
            with pytest.raises(minicnn.DeviceError, match=re.escape(
                    f"compute capability {backend.format_compute_capability(cc)}")):
                backend.allow_tf32(True)
            assert backend.tf32_allowed() is False
        else:
            backend.allow_tf32(True)
            assert backend.tf32_allowed() is True
            assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32
    finally:
        backend.allow_tf32(False)
    assert backend.tf32_allowed() is False
