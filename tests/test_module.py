"""Module, Sequential and backend behaviour: parameter order, modes, state, summary, devices."""
import numpy as np
import pytest

import minicnn
from minicnn import Conv2d, Linear, MaxPool2d, Module, ReLU, Sequential, ShapeError
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


def test_sequential_runs_every_layer_own_forward_and_backward():
    """No layer is run by another or skipped: forward calls each layer's forward in order,
    backward each layer's backward in reverse (input_grad=False: not those before the first
    layer with parameters)."""
    calls = []

    class Logged(Module):
        def __init__(self, layer, name):
            self.layer, self.name = layer, name

        def forward(self, x):
            calls.append(("forward", self.name))
            return self.layer.forward(x)

        def backward(self, dy, input_grad=True):
            calls.append(("backward", self.name, input_grad))
            return self.layer.backward(dy, input_grad)
    layers = [minicnn.AvgPool2d(2), Conv2d(1, 2, 3), ReLU(), MaxPool2d(2), minicnn.Flatten(),
              Linear(8, 3), ReLU(), Linear(3, 2)]
    model = Sequential(*[Logged(m, type(m).__name__ + str(i)) for i, m in enumerate(layers)])
    x = np.random.default_rng(6).standard_normal((2, 1, 12, 12)).astype(np.float32)
    model.backward(np.ones_like(model(x)))
    names = [type(m).__name__ + str(i) for i, m in enumerate(layers)]
    assert calls == [("forward", n) for n in names] + [("backward", n, True)
                                                       for n in reversed(names)]
    calls.clear()
    model.backward(np.ones_like(model(x)), input_grad=False)
    assert calls[len(names):] == [("backward", n, n != "Conv2d1") for n in reversed(names[1:])]


def test_sequential_from_an_ordered_dict_names_its_layers():
    from collections import OrderedDict
    conv, relu, lin = Conv2d(1, 2, 3), ReLU(), Linear(8, 3)
    model = Sequential(OrderedDict([("conv", conv), ("act", relu), ("flat", minicnn.Flatten()),
                                    ("fc", lin)]))
    assert [n for n, _ in model.named_children()] == ["conv", "act", "flat", "fc"]
    assert model[0] is conv and model[-1] is lin and len(model) == 4
    assert list(model.state_dict()) == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    head = model[1:]
    assert isinstance(head, Sequential) and [n for n, _ in head.named_children()] == \
        ["act", "flat", "fc"] and head[2] is lin
    assert repr(model).splitlines()[1] == "  (conv): Conv2d(1, 2, kernel_size=(3, 3), stride=(1, " \
                                          "1), padding=(0, 0), bias=True)"
    y = model(np.ones((2, 1, 4, 4), np.float32))
    assert y.shape == (2, 3)
    for bad, error, match in [
            (OrderedDict([("a", conv), ("a.b", relu)]), ValueError, "without a dot"),
            (OrderedDict([("forward", conv)]), ValueError, "not attributes of Sequential"),
            (OrderedDict([("conv", "not a layer")]), TypeError, "layer 'conv' must be a Module")]:
        with pytest.raises(error, match=match):
            Sequential(bad)
