"""CPU-vs-GPU parity: every layer, the loss, the optimizers and 20 training steps give the same
numbers on both backends, and two GPU runs are bit-identical. Run with ``pytest -m gpu``.

Tolerances (relative to the largest reference magnitude): float64 1e-12 for forward and backward
of every layer; float32 1e-6 for pooling, ReLU, flatten and dropout (same operations, same order),
5e-4 for convolution and linear layers (cuBLAS and OpenBLAS sum in different orders).
"""
import contextlib
import copy

import numpy as np
import pytest

import minicnn
from minicnn import AvgPool2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from minicnn.backend import cuda_unavailable_reason
from minicnn.fused import FusedAdam, FusedConv2d, FusedLinear, FusedMaxPool2d
from minicnn.models import mnist_cnn

from conftest import unique_values

REASON = cuda_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"no usable GPU: {REASON}")]

LAYERS = [  # (factory, input shape, float32 tolerance)
    (lambda: Conv2d(3, 8, 3), (2, 3, 9, 9), 5e-4),
    (lambda: Conv2d(2, 5, (2, 3), stride=2, padding=1), (1, 2, 7, 8), 5e-4),
    (lambda: Conv2d(4, 3, 3, stride=3, padding=2), (3, 4, 11, 10), 5e-4),
    (lambda: MaxPool2d(2), (2, 3, 8, 7), 1e-6),
    (lambda: MaxPool2d(3, stride=2, padding=1), (2, 2, 9, 11), 1e-6),
    (lambda: AvgPool2d(3, stride=1, padding=1), (1, 3, 6, 5), 1e-6),
    (lambda: AvgPool2d((2, 3), stride=(2, 1)), (2, 2, 7, 9), 1e-6),
    (lambda: Linear(20, 7), (5, 20), 5e-4),
    (lambda: ReLU(), (2, 3, 4, 5), 1e-6),
    (lambda: Flatten(), (2, 3, 4, 5), 1e-6),
    (lambda: Dropout(0.4), (4, 30), 1e-6),
    (lambda: FusedConv2d(Conv2d(3, 8, 3), relu=True), (2, 3, 9, 9), 5e-4),
    (lambda: FusedLinear(Linear(20, 7), relu=True), (5, 20), 5e-4),
    (lambda: FusedMaxPool2d(MaxPool2d(3, stride=2, padding=1), relu=True), (2, 2, 9, 11), 1e-6),
]


def _close(gpu, cpu, rtol):
    ref = np.asarray(cpu)
    err = np.max(np.abs(minicnn.to_numpy(gpu) - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= rtol, f"max error {err:.3g} relative to the largest value exceeds {rtol}"


def _run(layer, x, dy):
    minicnn.seed(7)                       # dropout draws the same mask on both backends
    y = layer(x)
    return y, layer.backward(dy), [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("make,shape,tol32", LAYERS)
def test_layer_parity(make, shape, tol32, dtype):
    minicnn.set_default_dtype(dtype)
    cpu_layer = make()
    gpu_layer = copy.deepcopy(cpu_layer).to("cuda")
    rng = np.random.default_rng(1)
    x = unique_values(rng, shape).astype(dtype) - 0.5
    dy = rng.standard_normal(cpu_layer.output_shape(shape)).astype(dtype)
    y_cpu, dx_cpu, g_cpu = _run(cpu_layer, x, dy)
    y_gpu, dx_gpu, g_gpu = _run(gpu_layer, minicnn.to_device(x, "cuda"), minicnn.to_device(dy, "cuda"))
    tol = 1e-12 if dtype == np.float64 else tol32
    _close(y_gpu, y_cpu, tol)
    _close(dx_gpu, dx_cpu, tol)
    for a, b in zip(g_gpu, g_cpu):
        _close(a, b, tol)


def test_non_contiguous_and_odd_inputs():
    minicnn.set_default_dtype(np.float64)
    conv = Conv2d(3, 4, 3, padding=1)
    gconv = copy.deepcopy(conv).to("cuda")
    x = np.random.default_rng(2).standard_normal((5, 7, 3, 1)).transpose(3, 2, 0, 1)   # (1,3,5,7)
    _close(gconv(minicnn.to_device(x, "cuda")), conv(x), 1e-12)
    pool, gx = MaxPool2d(3, stride=2), minicnn.to_device(x[:, :, ::-1, :], "cuda")
    _close(pool(gx), pool(x[:, :, ::-1, :]), 1e-12)


def _train(device, steps=20, dtype=np.float64, fused=False):
    """The parameters after ``steps`` Adam steps of the example network; ``fused``: the fused
    network (``minicnn.fuse``), FusedAdam and the fused loss."""
    minicnn.set_default_dtype(dtype)
    minicnn.seed(3)
    model = (minicnn.fuse(mnist_cnn()) if fused else mnist_cnn()).to(device)
    opt = (FusedAdam if fused else minicnn.Adam)(model.parameters(), lr=1e-3)
    loss_fn = minicnn.fused.CrossEntropyLoss() if fused else minicnn.CrossEntropyLoss()
    data = minicnn.mnist_sample(train=True)
    loader = minicnn.DataLoader(data, batch_size=32, shuffle=True, device=device)
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        loss_fn(model(x.astype(dtype)), y)
        opt.zero_grad()
        model.backward(loss_fn.backward())
        opt.step()
    return [minicnn.to_numpy(p.data) for p in model.parameters()]


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 2e-3)])
def test_twenty_training_steps_match_the_cpu(dtype, tol, fused):
    for g, c in zip(_train("cuda", dtype=dtype, fused=fused),
                    _train("cpu", dtype=dtype, fused=fused)):
        _close(g, c, tol)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_two_gpu_runs_are_bit_identical(fused):
    for a, b in zip(_train("cuda", dtype=np.float32, fused=fused),
                    _train("cuda", dtype=np.float32, fused=fused)):
        np.testing.assert_array_equal(a, b)


def test_moving_keeps_values_and_optimizer_state_follows(tmp_path):
    import cupy
    model = mnist_cnn()
    before = model.state_dict()
    model.to("cuda").to("cpu")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
    model.to("cuda")
    assert model.device == "cuda" and isinstance(model[0].weight.data, cupy.ndarray)
    opt = minicnn.Adam(model.parameters())
    x = minicnn.to_device(np.random.default_rng(4).standard_normal((4, 1, 28, 28)).astype(np.float32), "cuda")
    loss_fn = minicnn.CrossEntropyLoss()
    loss_fn(model(x), cupy.arange(4))
    model.backward(loss_fn.backward())
    opt.step()
    assert isinstance(opt.state[0]["exp_avg"], cupy.ndarray)
    minicnn.save(model, tmp_path / "gpu.npz", optimizer=opt)
    cpu_model = mnist_cnn()
    cpu_opt = minicnn.Adam(cpu_model.parameters())
    minicnn.load(cpu_model, tmp_path / "gpu.npz", optimizer=cpu_opt)
    for name, value in cpu_model.state_dict().items():
        np.testing.assert_array_equal(value, minicnn.to_numpy(dict(model.named_parameters())[name].data))
    np.testing.assert_array_equal(cpu_opt.state[0]["exp_avg"], opt.state[0]["exp_avg"].get())


def test_optimizer_state_follows_a_model_moved_after_it_was_made():
    import cupy
    minicnn.set_default_dtype(np.float64)
    x = np.random.default_rng(5).standard_normal((4, 1, 28, 28))
    y = np.arange(4)
    runs = []
    for move in (False, True):
        minicnn.seed(2)
        model = mnist_cnn()
        opt = minicnn.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn = minicnn.CrossEntropyLoss()
        for step in range(3):
            if move and step == 1:
                model.to("cuda")
            dev = model.device
            loss_fn(model(minicnn.to_device(x, dev)), minicnn.to_device(y, dev))
            opt.zero_grad()
            model.backward(loss_fn.backward())
            opt.step()
        if move:
            assert isinstance(opt.state[0]["momentum_buffer"], cupy.ndarray)
        runs.append([minicnn.to_numpy(p.data) for p in model.parameters()])
    for a, b in zip(*runs):
        _close(a, b, 1e-12)


def _fit(cuda_graph, epochs=2, products_by_kernel=True, fused=True):
    """Two epochs on 1,000 bundled images at batch 128 (7 full batches and one of 104, which
    runs eagerly), OneCycleLR changing the learning rate every step, the fused example network
    and loss (``fused``) or the plain ones. The graph step computes its products with minicnn's
    GEMM kernel; ``products_by_kernel`` makes the eager step do so too."""
    from minicnn import ops
    minicnn.seed(5)
    model = (minicnn.fuse(mnist_cnn()) if fused else mnist_cnn()).to("cuda")
    opt = FusedAdam(model.parameters(), lr=1e-3)
    data = minicnn.mnist_sample(train=False)
    loader = minicnn.DataLoader(data, batch_size=128, shuffle=True, device="cuda")
    sched = minicnn.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * len(loader))
    with ops.products_by_kernel() if products_by_kernel else contextlib.nullcontext():
        loss_fn = minicnn.fused.CrossEntropyLoss() if fused else minicnn.CrossEntropyLoss()
        history = minicnn.fit(model, loss_fn, opt, loader, epochs=epochs, scheduler=sched,
                              scheduler_interval="batch", progress=False, verbose=False,
                              cuda_graph=cuda_graph)
    return [minicnn.to_numpy(p.data) for p in model.parameters()], history


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_cuda_graph_gives_the_parameters_of_the_eager_path(fused):
    """The recorded step replays the very kernels of the eager step on the same memory, so the
    parameters after the same steps are bit-identical, and so are the epoch metrics."""
    (eager, eager_hist), (graphed, graph_hist) = _fit(False, fused=fused), _fit(True, fused=fused)
    for a, b in zip(eager, graphed):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(eager_hist.epochs, graph_hist.epochs):
        assert (a["train_loss"], a["train_accuracy"]) == (b["train_loss"], b["train_accuracy"])


def test_gemm_kernel_training_stays_close_to_cublas_training():
    """The same two epochs with cuBLAS's products: float32, other summation orders; after 16
    steps the parameters agree to 2e-3 of the largest (the 20-step CPU bound above)."""
    for a, b in zip(_fit(False)[0], _fit(False, products_by_kernel=False)[0]):
        _close(a, b, 2e-3)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_gemm_kernel_matches_cublas(dtype, tol):
    """ops.matmul_kernel against CuPy's matmul, transposed views and batches included."""
    import cupy
    from minicnn import ops
    rng = np.random.default_rng(6)
    for (m, k, n) in ((1, 1, 1), (17, 33, 5), (128, 288, 64), (200, 31, 129)):
        a = cupy.asarray(rng.standard_normal((m, k)).astype(dtype))
        b = cupy.asarray(rng.standard_normal((k, n)).astype(dtype))
        _close(ops.matmul_kernel(a, b), (a.astype(np.float64) @ b.astype(np.float64)).get(), tol)
        _close(ops.matmul_kernel(cupy.ascontiguousarray(a.T).T, b), (a @ b).get(), tol)
        _close(ops.matmul_kernel(a, cupy.ascontiguousarray(b.T).T), (a @ b).get(), tol)
    x = cupy.asarray(rng.standard_normal((2, 3, 7, 9)).astype(dtype))
    w = cupy.asarray(rng.standard_normal((9, 4)).astype(dtype))
    h = cupy.asarray(rng.standard_normal((5, 7)).astype(dtype))
    _close(ops.matmul_kernel(x, w), (x @ w).get(), tol)
    _close(ops.matmul_kernel(h, x), (h @ x).get(), tol)


def test_cuda_graph_step_is_replayed():
    import cupy
    from minicnn.fused.graph import GraphStep
    calls = []
    step = GraphStep(lambda x, y: calls.append(1) or x.__imul__(2), lambda: None, warmup=1)
    x = cupy.ones(4, dtype=cupy.float32)
    for _ in range(4):
        step(x, x)
    assert len(calls) == 2 and step.replays == 3       # warm-up, record; then graph launches only
    np.testing.assert_array_equal(step._x.get(), np.full(4, 2, np.float32))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("pool", [lambda: MaxPool2d(2), lambda: MaxPool2d((1, 3)),
                                  lambda: AvgPool2d(2),
                                  lambda: FusedMaxPool2d(MaxPool2d(3, 2, 1), relu=True)],
                         ids=["max2", "max1x3", "avg2", "max3-overlapping"])
def test_fused_convolution_with_its_pool_matches_the_cpu(pool, dtype):
    """``FusedConv2d(conv, relu, pool)``: a tiling max pool applied by the convolution (im2col
    in blocks, maxpool_blocks kernels), or another pool it is cut short for."""
    minicnn.set_default_dtype(dtype)
    pool = pool()
    cpu_conv = FusedConv2d(Conv2d(3, 6, 3), relu=not isinstance(pool, FusedMaxPool2d), pool=pool)
    gpu_conv = copy.deepcopy(cpu_conv).to("cuda")
    rng = np.random.default_rng(3)
    x = unique_values(rng, (2, 3, 11, 12)).astype(dtype) - 0.5
    y_cpu = cpu_conv(x)
    y_gpu = gpu_conv(minicnn.to_device(x, "cuda"))
    dy = rng.standard_normal(y_cpu.shape).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 5e-4
    _close(y_gpu, y_cpu, tol)
    _close(gpu_conv.backward(minicnn.to_device(dy, "cuda")), cpu_conv.backward(dy), tol)
    for a, b in zip(gpu_conv.parameters(), cpu_conv.parameters()):
        _close(a.grad, b.grad, tol)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_fused_kernels_match_the_cpu(dtype, tol):
    from minicnn import fused
    rng = np.random.default_rng(9)
    y, bias = rng.standard_normal((37, 5)).astype(dtype), rng.standard_normal(5).astype(dtype)
    _close(fused.bias_relu(minicnn.to_device(y, "cuda"), minicnn.to_device(bias, "cuda")),
           fused.bias_relu(y.copy(), bias), tol)
    logits, t = rng.standard_normal((33, 10)).astype(dtype), rng.integers(0, 10, 33)
    for got, want in zip(fused.softmax_cross_entropy(minicnn.to_device(logits, "cuda"),
                                                     minicnn.to_device(t, "cuda"), 0.1),
                         fused.softmax_cross_entropy(logits, t, 0.1)):
        _close(got, want, tol)


def test_tf32_switch_changes_float32_products_only_when_asked():
    import cupy
    a = cupy.asarray(np.random.default_rng(4).standard_normal((256, 256)).astype(np.float32))
    exact = a.astype(cupy.float64) @ a.astype(cupy.float64)
    err = lambda: float(cupy.abs(a @ a - exact).max() / cupy.abs(exact).max())   # noqa: E731
    assert err() < 1e-5                                     # off by default: float32 products
    if int(cupy.cuda.Device().compute_capability) < 80:        # e.g. "90" on an H100
        pytest.skip("TF32 needs an Ampere or newer GPU")
    try:
        minicnn.backend.allow_tf32(True)
        assert 1e-5 < err() < 1e-2                          # 10-bit mantissas: about 1e-3
    finally:
        minicnn.backend.allow_tf32(False)
    assert err() < 1e-5


def test_cuda_graph_records_batchnorm_with_a_cumulative_average():
    """BatchNorm(momentum=None) reads its batch count on the device, so the step records and
    each replay uses the new count: the same running statistics as the eager step's."""
    from minicnn import BatchNorm2d, Sequential, ops
    runs = []
    for cuda_graph in (False, True):
        minicnn.seed(8)
        model = Sequential(Conv2d(1, 4, 3), BatchNorm2d(4, momentum=None), ReLU(), MaxPool2d(2),
                           Flatten(), Linear(4 * 13 * 13, 10)).to("cuda")
        opt = FusedAdam(model.parameters(), lr=1e-3)
        loader = minicnn.DataLoader(minicnn.mnist_sample(train=False), batch_size=100,
                                    device="cuda")
        with ops.products_by_kernel():
            minicnn.fit(model, minicnn.CrossEntropyLoss(), opt, loader, progress=False,
                        verbose=False, cuda_graph=cuda_graph)
        runs.append({k: v for k, v in model.state_dict().items()})
    for name, value in runs[0].items():
        np.testing.assert_array_equal(value, runs[1][name], err_msg=name)
    assert int(runs[1]["1.num_batches_tracked"]) == 10
