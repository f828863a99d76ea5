"""The CUDA-graph step under a strict stand-in for CuPy's stream capture (minicnn.testing.capture).

The stand-in refuses, inside a recording, what CUDA or CuPy would refuse or a replay would not
repeat: products through CuPy's cuBLAS wrapper, reads back to the host, copies from the host,
allocations the graph does not keep, state first made by the recorded step. First the stand-in
itself is shown strict, then the real step (``fit(cuda_graph=True)``, ``GraphStep`` and
``CudaRecorder``) is recorded under it, with every kernel run by the emulator: of the plain
example network with the plain loss, and of the fused one (``minicnn.fuse``) with the fused loss.
The recorded step computes its products with the fast tier's GEMM kernel (kernels/gemm_tiled.cu,
split-K included), or with the one an enclosing ``ops.products_by_kernel`` block names.
"""
import contextlib

import numpy as np
import pytest

import minicnn
from minicnn import ops
from minicnn import cuda
from minicnn.fused import FusedAdam, graph
from minicnn.fused.gemm import matmul_tiled
from minicnn.data import ArrayDataset, DataLoader
from minicnn.models import mnist_cnn
from minicnn.testing import emulator
from minicnn.testing.capture import CaptureViolation, StrictRecorder, fake_cupy

pytestmark = [pytest.mark.emulated,
              pytest.mark.skipif(not emulator.available(),
                                 reason=f"no C++ compiler: {emulator.unavailable_reason()}")]


@pytest.fixture
def cupy(monkeypatch):
    with fake_cupy() as module:
        monkeypatch.setattr(graph, "CudaRecorder", StrictRecorder)
        yield module


def _record(body, warm=True):
    """Record ``body`` once with a StrictRecorder (after one eager run when ``warm``) and replay."""
    recorder = StrictRecorder()
    if warm:
        recorder.warm(body)
    recorder.record(body).launch()


# --- the stand-in is strict ------------------------------------------------------------------------

@pytest.mark.parametrize("read", [float, int, bool, lambda a: a.item(), lambda a: a.get(),
                                  lambda a: a.tolist(), minicnn.to_numpy],
                         ids=["float", "int", "bool", "item", "get", "tolist", "to_numpy"])
def test_reads_back_to_the_host_are_refused(cupy, read):
    a = cupy.asarray(np.array(2.5))
    read(a)                                          # outside a recording: allowed
    with pytest.raises(CaptureViolation, match="device-to-host read"):
        _record(lambda: read(a.sum()))


@pytest.mark.parametrize("product", [lambda a: a @ a, lambda a: np.matmul(a, a),
                                     lambda a: np.dot(a, a), lambda a: np.tensordot(a, a, 1)],
                         ids=["@", "matmul", "dot", "tensordot"])
def test_products_through_cupy_are_refused(cupy, product):
    a = cupy.asarray(np.random.default_rng(0).standard_normal((3, 3)))
    product(a)
    with pytest.raises(CaptureViolation, match=r"cuBLAS wrapper refuses .* \(cublas.pyx"):
        _record(lambda: product(a))


def test_the_product_kernel_is_recorded(cupy):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((7, 3))
    da, db = cupy.asarray(a), cupy.asarray(b)
    out = cupy.empty((5, 3))

    def body():
        with ops.products_by_kernel():
            out[...] = ops.matmul(da, db)
    _record(body)
    np.testing.assert_allclose(out.get(), a @ b, rtol=1e-12)


def test_copies_from_the_host_are_refused(cupy):
    a = cupy.zeros(3)
    host = np.arange(3.0)
    for copy in (lambda: cupy.asarray(host), lambda: a.set(host),
                 lambda: a.__setitem__(slice(None), host)):
        copy()
        with pytest.raises(CaptureViolation, match="host-to-device copy"):
            _record(copy)


def test_state_first_made_inside_a_recording_is_refused(cupy):
    state = {}

    def body():
        if "sums" not in state:
            state["sums"] = cupy.zeros(2)
        state["sums"] += 1
    with pytest.raises(CaptureViolation, match="made with initial values inside the recording"):
        _record(body, warm=False)
    state.clear()
    _record(body)                                   # made by the eager step before: fine
    np.testing.assert_array_equal(state["sums"].get(), [2.0, 2.0])   # warm-up, replay: a recording runs nothing


def test_allocations_outside_the_recordings_allocator_are_refused(cupy, monkeypatch):
    a = cupy.ones(4)
    monkeypatch.setattr(StrictRecorder, "_on_stream",
                        lambda self, fn, allocator=None: fn())     # a recorder that forgets it
    with pytest.raises(CaptureViolation, match="shared memory pool"):
        _record(lambda: a * 2)


def test_device_and_host_arrays_do_not_mix(cupy):
    with pytest.raises(TypeError, match="host \\(NumPy\\) array"):
        cupy.ones(3) + np.ones(3)


# --- the training step records -------------------------------------------------------------------

def _fused_example():
    return minicnn.fuse(mnist_cnn())


NETWORKS = {"plain": (mnist_cnn, minicnn.CrossEntropyLoss),
            "fused": (_fused_example, minicnn.fused.CrossEntropyLoss)}


def _fit(cuda_graph, make_model=mnist_cnn, n=40, batch=8, products=matmul_tiled,
         make_loss=minicnn.CrossEntropyLoss):
    """One epoch at ``batch`` over ``n`` random images, float64, on the fake GPU, inside
    ``ops.products_by_kernel(products)`` (None: outside any such block)."""
    minicnn.set_default_dtype(np.float64)
    minicnn.seed(0)
    model = make_model().to("cuda")
    opt = FusedAdam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.standard_normal((n, 1, 28, 28)), rng.integers(0, 10, n))
    loader = DataLoader(data, batch_size=batch, device="cuda")
    block = ops.products_by_kernel(products) if products else contextlib.nullcontext()
    with block:
        history = minicnn.fit(model, make_loss(), opt, loader, epochs=1,
                              progress=False, verbose=False, cuda_graph=cuda_graph)
    return [minicnn.to_numpy(p.data) for p in model.parameters()], history


class _KernelNames:
    """Within the block, ``names`` lists the kernel of every launch (through the fake's launch)."""

    def __enter__(self):
        self.names, self._launch = [], cuda.launch

        def recording(file, name, n, *args):
            self.names.append(name)
            return self._launch(file, name, n, *args)
        cuda.launch = recording
        return self

    def __exit__(self, *exc):
        cuda.launch = self._launch


@pytest.mark.parametrize("network", NETWORKS)
def test_the_example_network_records_and_trains_like_the_eager_step(cupy, network):
    """Five batches of 8 and one of 4: three warm-up steps, the fourth recorded and launched, the
    fifth a replay, the last (another shape) eager. Recorded and replayed under the capture
    rules, the step gives the parameters of the eager run with the same products (the tiled
    kernel, which the graph step picks itself) to the last bit."""
    make_model, make_loss = NETWORKS[network]
    eager, eager_hist = _fit(False, make_model, n=44, make_loss=make_loss, products=matmul_tiled)
    with _KernelNames() as launched:
        graphed, graph_hist = _fit(True, make_model, n=44, make_loss=make_loss, products=None)
    for a, b in zip(eager, graphed):
        np.testing.assert_array_equal(a, b)
    assert eager_hist.epochs[0]["train_loss"] == graph_hist.epochs[0]["train_loss"]
    # the weight gradient of the first convolution, (9, 5408) @ (5408, 32), splits K
    assert {"gemm_tiled", "gemm_tiled_reduce"} <= set(launched.names)
    assert "gemm" not in launched.names


def test_an_enclosing_block_chooses_the_graph_steps_kernel(cupy):
    """Inside ``ops.products_by_kernel()`` (the reference kernel, kernels/gemm.cu) the recorded
    step uses that kernel, so it stays bit-identical with an eager run in the same block;
    ``GraphStep(matmul=...)`` names one itself; by default it picks the tiled kernel."""
    rng = np.random.default_rng(3)
    w, x = cupy.asarray(rng.standard_normal((7, 40))), cupy.asarray(rng.standard_normal((40, 9)))
    out = cupy.empty((7, 9))

    def body(a, b):
        out[...] = ops.matmul(w, a)
    with ops.products_by_kernel():
        body(x, x)
        eager = out.get()
        with _KernelNames() as launched:
            step = graph.GraphStep(body, lambda: None, warmup=1)
            for _ in range(3):                  # warm-up, record and launch, replay
                step(x, x)
    # the warm-up, the recording, and the stand-in graph's two launches (each runs the step again)
    assert launched.names == ["gemm"] * 4 and step.replays == 2
    np.testing.assert_array_equal(out.get(), eager)
    assert graph.GraphStep(body, None, matmul=ops.matmul_kernel)._products() is ops.matmul_kernel
    assert graph.GraphStep(body, None)._products() is matmul_tiled


def test_cublas_products_in_the_recorded_step_are_caught(cupy, monkeypatch):
    """Without the kernel products, the step's first product is refused, as CuPy would."""
    monkeypatch.setattr(ops, "products_by_kernel", contextlib.nullcontext)
    with pytest.raises(CaptureViolation, match="matrix product through CuPy"):
        _fit(True, products=None)


def _batchnorm_net():
    from minicnn import BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
    return Sequential(Conv2d(1, 4, 3), BatchNorm2d(4, momentum=None), ReLU(), MaxPool2d(2),
                      Flatten(), Linear(4 * 13 * 13, 10))


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_batchnorm_with_a_cumulative_average_records(cupy, fuse):
    """momentum=None: the factor 1/num_batches_tracked is computed on the device, not read back,
    so the step records, and every replay uses the new count."""
    def make():
        return minicnn.fuse(_batchnorm_net()) if fuse else _batchnorm_net()
    (eager, _), (graphed, _) = _fit(False, make), _fit(True, make)
    for a, b in zip(eager, graphed):
        np.testing.assert_array_equal(a, b)


def test_a_graph_step_needs_a_warm_up_step():
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        graph.GraphStep(lambda x, y: None, lambda: None, warmup=0)
