"""Module, Sequential and backend behaviour: parameter order, modes, state, summary, devices."""
import numpy as np
import pytest

import minicnn
from minicnn import Conv2d, Linear, MaxPool2d, ReLU, Sequential, ShapeError
from minicnn.models import mnist_cnn


def test_parameters_in_definition_order_weight_before_bias():
    model = mnist_cnn()
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias",
                     "9.weight", "9.bias"]
    assert [p.shape for p in model.parameters()] == [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,),
                                                     (128, 1600), (128,), (10, 128), (10,)]
    assert model.num_parameters() == 225_034


def test_sequential_is_indexable_and_runs_backward_in_reverse():
    model = Sequential(Linear(3, 4), ReLU(), Linear(4, 2))
    assert len(model) == 3 and isinstance(model[1], ReLU) and isinstance(model[-1], Linear)
    assert isinstance(model[:2], Sequential) and len(model[:2]) == 2
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    by_hand = model[2](model[1](model[0](x)))
    y = model(x)               # (a forward of the layers in between would replace their caches)
    np.testing.assert_allclose(y, by_hand, rtol=1e-6)
    dx = model.backward(np.ones_like(y))
    # layer by layer by hand, backward in reverse order: the same numbers
    h = model[0].weight.grad.copy()
    model.zero_grad()
    model[2](model[1](model[0](x)))
    d = model[2].backward(np.ones_like(y))
    d = model[1].backward(d)
    np.testing.assert_allclose(model[0].backward(d), dx, rtol=1e-6)
    np.testing.assert_allclose(model[0].weight.grad, h, rtol=1e-6)


def test_backward_accumulates_into_grad_and_zero_grad_clears():
    lin = Linear(3, 2)
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal((4, 2)).astype(np.float32)
    lin(x)
    lin.backward(dy)
    once = lin.weight.grad.copy()
    lin(x)
    lin.backward(dy)
    np.testing.assert_allclose(lin.weight.grad, 2 * once, rtol=1e-6)
    lin.zero_grad()
    assert not lin.weight.grad.any()


def test_train_eval_flags_reach_every_layer():
    model = mnist_cnn().eval()
    assert not any(m.training for _, m in model.named_modules())
    model.train()
    assert all(m.training for _, m in model.named_modules())


def test_state_dict_round_trip_and_strictness():
    a, b = mnist_cnn(), mnist_cnn()
    state = a.state_dict()
    assert list(state) == [n for n, _ in a.named_parameters()]
    b.load_state_dict(state)
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)
    state["0.weight"][...] = 7          # a copy: the model keeps its values
    assert not (a[0].weight.data == 7).any()
    with pytest.raises(KeyError, match=r"missing keys \['9.bias'\]"):
        b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "9.bias"})
    with pytest.raises(ShapeError, match=r"'0.weight' expected shape \(32, 1, 3, 3\), got \(3, 3\)"):
        b.load_state_dict({**a.state_dict(), "0.weight": np.ones((3, 3))})
    b.load_state_dict({"0.bias": np.arange(32.0)}, strict=False)
    np.testing.assert_array_equal(b[0].bias.data, np.arange(32.0))


def test_summary_lists_shapes_and_counts():
    text = mnist_cnn().summary((1, 1, 28, 28))
    assert "(1, 32, 13, 13)" in text and "(1, 64, 5, 5)" in text and "(1, 1600)" in text
    assert "18,496" in text and "total parameters: 225,034" in text
    with pytest.raises(ShapeError, match=r"expected 1 input channels"):
        mnist_cnn().summary((1, 3, 28, 28))


def test_repr_reads_like_pytorch():
    text = repr(Sequential(Conv2d(1, 2, 3), MaxPool2d(2)))
    assert "(0): Conv2d(1, 2, kernel_size=(3, 3)" in text and "(1): MaxPool2d(kernel_size=(2, 2)" in text


def test_seed_makes_init_reproducible():
    minicnn.seed(5)
    a = mnist_cnn()
    minicnn.seed(5)
    b = mnist_cnn()
    minicnn.seed(6)
    c = mnist_cnn()
    np.testing.assert_array_equal(a[3].weight.data, b[3].weight.data)
    assert not np.array_equal(a[3].weight.data, c[3].weight.data)


def test_default_dtype():
    assert minicnn.get_default_dtype() == np.float32
    minicnn.set_default_dtype(np.float64)
    assert Linear(2, 2).weight.dtype == np.float64
    with pytest.raises(TypeError, match="expected float16, float32 or float64, got int32"):
        minicnn.set_default_dtype(np.int32)
    with pytest.raises(ValueError, match="non-negative integer"):
        minicnn.seed(-1)


def test_cpu_device_and_array_helpers():
    dev = minicnn.device("cpu")
    assert dev == "cpu" and dev.xp is np and str(dev) == "cpu"
    model = mnist_cnn().to("cpu")
    assert model.device == "cpu"
    x = np.arange(3.0)
    assert minicnn.to_device(x, "cpu") is x
    assert minicnn.to_numpy(x) is x
    assert minicnn.get_array_module(x) is np
    with pytest.raises(ValueError, match="expected 'cpu', 'cuda' or 'auto', got 'gpu'"):
        minicnn.device("gpu")


def test_cuda_request_says_why_it_cannot(monkeypatch):
    reason = minicnn.backend.cuda_unavailable_reason()
    if reason is None:
        pytest.skip("a usable GPU is present: the error path cannot be reached here")
    with pytest.raises(minicnn.DeviceError, match="device\\('cuda'\\) is not available: "):
        minicnn.device("cuda")
    with pytest.raises(minicnn.DeviceError):
        mnist_cnn().to("cuda")


def test_missing_cupy_is_reported_not_raised(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    reason = minicnn.backend.cuda_unavailable_reason()
    assert "CuPy is not installed" in reason and "minicnn[cuda12]" in reason


def test_auto_falls_back_to_cpu_and_says_why_once(monkeypatch, capsys):
    monkeypatch.setattr(minicnn.backend, "cuda_unavailable_reason", lambda: "no GPU here")
    monkeypatch.setattr(minicnn.backend, "_auto_announced", False)
    assert minicnn.device("auto") == "cpu"
    assert minicnn.device("auto") == "cpu"
    out = capsys.readouterr().out
    assert out.count("device 'auto' chose cpu (no GPU here)") == 1


def test_backward_without_input_grad_skips_dx_but_not_parameter_grads():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    model = Sequential(MaxPool2d(2), Conv2d(1, 2, 3), ReLU(), minicnn.Flatten(), Linear(8, 3))
    dy = rng.standard_normal((3, 3)).astype(np.float32)
    model(x)
    dx = model.backward(dy)
    grads = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    model(x)
    assert model.backward(dy, input_grad=False) is None
    for p, g in zip(model.parameters(), grads):
        np.testing.assert_array_equal(p.grad, g)
    assert dx.shape == x.shape
    assert model[0]._cache is None          # the pooling before the first conv was not run back


def test_training_steps_reuse_host_memory():
    """A step's large temporaries come back from the allocator, not as fresh pages from the OS:
    before minicnn kept freed memory, each step at batch 128 cost ~4,900 page faults (a third of
    its time on a 2-core machine); with it, ~0."""
    import resource
    if not minicnn.backend.keep_freed_memory():
        pytest.skip("not Linux with glibc: the allocator setting does not apply")
    model, loss_fn = mnist_cnn(), minicnn.CrossEntropyLoss()
    opt = minicnn.Adam(model.parameters())
    x = np.random.default_rng(5).standard_normal((128, 1, 28, 28)).astype(np.float32)
    y = np.arange(128) % 10

    def step():
        loss_fn(model(x), y)
        opt.zero_grad()
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    assert per_step < 200, f"{per_step:.0f} page faults per step"


def test_keep_freed_memory_can_be_refused(monkeypatch):
    monkeypatch.setenv("MINICNN_KEEP_FREED_MEMORY", "0")
    assert minicnn.backend.keep_freed_memory() is False


def test_importing_minicnn_first_shortens_openblas_spin():
    """OpenBLAS's idle threads spinning after each product slowed the elementwise work of a CPU
    step by 30-45%; minicnn asks for a short spin unless the user chose a value."""
    import os
    import subprocess
    import sys
    code = "import minicnn, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.strip() == "4", run.stderr
    env["OPENBLAS_THREAD_TIMEOUT"] = "20"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.strip() == "20", run.stderr


def _in_given_order(model, x, dy):
    """Forward and backward through ``model``'s layers one by one, in the order they were given
    (what Sequential would do without its plan): (output, dx, parameter gradients)."""
    layers = list(model)
    for layer in layers:
        x = layer.forward(x)
    g = dy
    for layer in reversed(layers):
        g = layer.backward(g)
    return x, g, [p.grad.copy() for p in model.parameters()]


@pytest.mark.parametrize("layers,relu_in,pooled,cropped", [
    # the pool tiles the conv's 6x6 output: the conv applies it, with the ReLU
    (lambda: [Conv2d(2, 3, 3), ReLU(), MaxPool2d(2)], [Conv2d], 1, []),
    (lambda: [Conv2d(2, 3, 3), ReLU(), Conv2d(3, 2, 3, bias=False), ReLU(), minicnn.Flatten()],
     [Conv2d, Conv2d], 0, []),
    (lambda: [minicnn.Flatten(), Linear(128, 3), ReLU(), ReLU(), Linear(3, 2, bias=False),
              ReLU()], [Linear, Linear], 0, []),    # a second ReLU in a row runs on its own
    # an overlapping max pool stays a layer; the 2x2 one after it is not after a conv
    (lambda: [Conv2d(2, 3, 3, padding=1), ReLU(), MaxPool2d(3, stride=1, padding=1),
              MaxPool2d(2), minicnn.Flatten(), Linear(48, 5), ReLU(), Linear(5, 4)],
     [MaxPool2d, Linear], 0, []),
    (lambda: [Conv2d(2, 3, 3), minicnn.AvgPool2d(2), ReLU(), minicnn.Flatten()], [], 0, []),
    # 8x8 -> 7x7, of which a 2x2 average pool reads 6x6 (the ReLU fuses into the conv); then
    # 3x3 -> 2x2, which the max pool reads whole and the conv applies
    (lambda: [Conv2d(2, 3, 2), ReLU(), minicnn.AvgPool2d(2), Conv2d(3, 4, 2), ReLU(),
              MaxPool2d(2)], [Conv2d, Conv2d], 1, [(6, 6)]),
    # a padded pool: 2x2 windows with stride 3 and padding 1 over 8x8 read 7x7
    (lambda: [Conv2d(2, 3, 1), ReLU(), MaxPool2d(2, stride=3, padding=1)], [MaxPool2d], 0,
     [(7, 7)]),
    # the conv applies a 2x2 pool over the 6x6 of its 7x7 output it reads, and the ReLU after
    # it; then 3x3 -> 3x3 -> an overlapping-free pool with stride (2, 3) that stays a layer,
    # after the second of two ReLUs, which it takes
    (lambda: [Conv2d(2, 3, 2), MaxPool2d(2), ReLU(), Conv2d(3, 2, 1), ReLU(), ReLU(),
              MaxPool2d(3, stride=(2, 3)), minicnn.Flatten()], [Conv2d, Conv2d, MaxPool2d], 1,
     [(6, 6)]),
])
def test_sequential_plan_gives_the_same_bits_as_the_given_order(layers, relu_in, pooled, cropped,
                                                                   float64):
    """Sequential runs a ReLU before a max pool after it instead, and a ReLU after a max pool, or
    after a Conv2d or Linear, inside that layer, and a convolution before a pool computes only the
    outputs the pool reads, and applies a max pool whose windows tile them: outputs, input
    gradients and parameter gradients must not change by a bit (float64), including windows whose
    values are all negative (no gradient in either order) and overlapping windows. The one
    exception: a convolution cut short or pooling in window order sums its weight and bias
    gradients over fewer (exactly zero) terms or in another order, which BLAS may group
    differently, so they are compared to 1e-13 relative."""
    minicnn.seed(4)
    model = Sequential(*layers())
    plan = model._plan()
    kinds = [type(m) for m, _ in plan]
    assert all(not (a is ReLU and b is MaxPool2d) for a, b in zip(kinds, kinds[1:]))
    assert [type(m) for m, opts in plan if opts.get("relu")] == relu_in
    handed = [(opts["pool"], after) for (m, opts), (after, _) in zip(plan, plan[1:] + [(None, 0)])
              if "pool" in opts]
    absorbed = [p for p, after in handed if p is not after]    # applied by the convolution
    assert len(absorbed) == pooled and all(minicnn.layers.pooled_by_conv(p) for p in absorbed)
    assert all(p not in [m for m, _ in plan] for p in absorbed)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 8, 8)) - 0.3            # many windows wholly negative
    crops = []                             # the output sizes the convolutions were cut to
    for m, opts in plan:
        if "pool" in opts:
            def forward(x, _forward=m.forward, _m=m, **kw):
                full = _m.output_shape(x.shape)[2:]
                if "pool" in kw and kw["pool"].reach(full) != full:
                    crops.append(kw["pool"].reach(full))
                return _forward(x, **kw)
            m.forward = forward
    out = model(x)
    dy = rng.standard_normal(out.shape)
    dx = model.backward(dy)
    grads = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    ref_out, ref_dx, ref_grads = _in_given_order(model, x, dy)
    assert crops == cropped
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(dx, ref_dx)
    for g, r in zip(grads, ref_grads):
        if cropped or pooled:   # sums over other terms or in another order: the last bits
            np.testing.assert_allclose(g, r, rtol=1e-13, atol=1e-15)
        else:
            np.testing.assert_array_equal(g, r)
