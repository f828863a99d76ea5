"""BatchNorm1d/2d: hand-written backward against finite differences (float64), running statistics
against PyTorch's formula written out here and against torch.nn.BatchNorm (when installed), eval
mode, errors, and buffers in state_dict / load_state_dict / to()."""
import numpy as np
import pytest

import minicnn
import minicnn.module
from minicnn import Sequential, ShapeError
from minicnn.layers import Conv2d
from minicnn.normalization import BatchNorm1d, BatchNorm2d
from minicnn.testing import gradcheck

BN_CASES = [  # class, input shape, affine
    (BatchNorm2d, (3, 2, 4, 5), True),
    (BatchNorm2d, (1, 3, 3, 2), True),      # batch 1: statistics over H and W alone
    (BatchNorm2d, (2, 2, 3, 3), False),
    (BatchNorm1d, (5, 3), True),
    (BatchNorm1d, (2, 3), True),            # two values per channel: the smallest allowed
    (BatchNorm1d, (3, 2, 4), True),
    (BatchNorm1d, (4, 3), False),
]


def _randomise(bn, rng):
    """Non-trivial weight, bias and running statistics (never test on the ones/zeros init)."""
    if bn.affine:
        bn.weight.data[...] = rng.uniform(0.5, 2.0, bn.num_features)
        bn.bias.data[...] = rng.standard_normal(bn.num_features)
    bn.running_mean[...] = rng.standard_normal(bn.num_features)
    bn.running_var[...] = rng.uniform(0.5, 2.0, bn.num_features)
    return bn


def _input(rng, shape):
    """Channels with different means and scales."""
    C = shape[1]
    per_channel = (1, C) + (1,) * (len(shape) - 2)
    return (rng.standard_normal(shape) * rng.uniform(0.5, 3.0, C).reshape(per_channel)
            + rng.standard_normal(C).reshape(per_channel))


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _reference_train(x, weight, bias, eps):
    """PyTorch's training-mode batchnorm written out: biased variance normalises."""
    axes = _axes(x)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    shape = mean.shape
    return (x - mean) / np.sqrt(var + eps) * weight.reshape(shape) + bias.reshape(shape)


@pytest.mark.parametrize("cls,shape,affine", BN_CASES)
def test_batchnorm_train_gradcheck_and_forward(float64, cls, shape, affine):
    rng = np.random.default_rng(20)
    bn = _randomise(cls(shape[1], affine=affine), rng)
    x = _input(rng, shape)
    weight = bn.weight.data if affine else np.ones(shape[1])
    bias = bn.bias.data if affine else np.zeros(shape[1])
    np.testing.assert_allclose(bn(x), _reference_train(x, weight, bias, bn.eps),
                               rtol=1e-12, atol=1e-12)
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    report = gradcheck(bn, x)
    assert set(report) == {"input"} | ({"weight", "bias"} if affine else set())
    # gradcheck works on a copy: its forwards moved the copy's running statistics, not ours
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_running_statistics_do_not_change_the_training_output(float64):
    """Why gradcheck's many forwards (each one updating the running statistics) are harmless:
    in training mode the output depends on the batch alone."""
    rng = np.random.default_rng(21)
    bn = _randomise(BatchNorm2d(3), rng)
    x = _input(rng, (2, 3, 4, 4))
    y1 = bn(x)
    bn.running_mean[...] = 100.0
    bn.running_var[...] = 1e-3
    np.testing.assert_array_equal(bn(x), y1)


def test_backward_does_not_mutate_dy_and_accumulates(float64):
    rng = np.random.default_rng(22)
    bn = _randomise(BatchNorm2d(2), rng)
    x, dy = _input(rng, (3, 2, 3, 3)), rng.standard_normal((3, 2, 3, 3))
    dy0 = dy.copy()
    bn(x)
    dx = bn.backward(dy)
    np.testing.assert_array_equal(dy, dy0)
    once = bn.weight.grad.copy(), bn.bias.grad.copy()
    bn(x)
    assert bn.backward(dy, input_grad=False) is None
    np.testing.assert_allclose(bn.weight.grad, 2 * once[0], rtol=1e-12)
    np.testing.assert_allclose(bn.bias.grad, 2 * once[1], rtol=1e-12)
    # the gradient of a normalised input sums to zero over each channel
    np.testing.assert_allclose(dx.sum(axis=(0, 2, 3)), 0, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("cls,shape", [(BatchNorm2d, (4, 3, 2, 3)), (BatchNorm1d, (6, 3)),
                                       (BatchNorm1d, (2, 3, 5))])
def test_running_statistics_follow_pytorchs_formula(float64, cls, shape, momentum):
    rng = np.random.default_rng(23)
    bn = cls(shape[1], momentum=momentum)
    mean_ref, var_ref = np.zeros(shape[1]), np.ones(shape[1])
    for step in range(1, 5):
        x = _input(rng, shape)
        bn(x)
        n = x.size // shape[1]
        batch_mean = x.mean(axis=_axes(x))
        batch_var_unbiased = x.var(axis=_axes(x)) * n / (n - 1)
        f = 1 / step if momentum is None else momentum
        mean_ref = (1 - f) * mean_ref + f * batch_mean
        var_ref = (1 - f) * var_ref + f * batch_var_unbiased
        np.testing.assert_allclose(bn.running_mean, mean_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(bn.running_var, var_ref, rtol=1e-12)
        assert bn.num_batches_tracked.dtype == np.int64 and bn.num_batches_tracked.shape == ()
        assert int(bn.num_batches_tracked) == step
    # eval mode normalises with the running statistics and moves nothing
    bn.eval()
    x = _input(rng, shape)
    shaped = (1, shape[1]) + (1,) * (len(shape) - 2)
    expected = (x - mean_ref.reshape(shaped)) / np.sqrt(var_ref.reshape(shaped) + bn.eps)
    np.testing.assert_allclose(bn(x), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, mean_ref, rtol=1e-12, atol=1e-14)
    assert int(bn.num_batches_tracked) == 4 and bn._cache is None


def test_eval_mode_is_an_affine_map_with_its_backward(float64):
    rng = np.random.default_rng(24)
    bn = _randomise(BatchNorm2d(3), rng).eval()
    x, dy = _input(rng, (1, 3, 2, 2)), rng.standard_normal((1, 3, 2, 2))   # batch 1 is fine
    scale = bn.weight.data / np.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.data - bn.running_mean * scale
    np.testing.assert_allclose(bn(x), x * scale.reshape(1, 3, 1, 1) + shift.reshape(1, 3, 1, 1),
                               rtol=1e-12, atol=1e-12)
    # eval mode keeps no input, so weight and bias cannot get a gradient: it asks for freeze()
    with pytest.raises(RuntimeError, match=r"BatchNorm2d.backward after an eval-mode forward.*"
                                           r"freeze\(\)"):
        bn.backward(dy)
    bn.freeze()
    dx = bn.backward(dy)
    # central differences of L = sum(bn(x) * dy) in eval mode
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = 1e-6
        numeric[i] = (np.sum(bn(x + e) * dy) - np.sum(bn(x - e) * dy)) / 2e-6
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)
    assert not bn.weight.grad.any() and not bn.bias.grad.any()
    assert bn.backward(dy, input_grad=False) is None
    # without affine parameters there is nothing to freeze
    plain = _randomise(BatchNorm1d(3, affine=False), rng).eval()
    x1 = _input(rng, (2, 3))
    plain(x1)
    np.testing.assert_allclose(plain.backward(np.ones((2, 3))),
                               np.ones((2, 3)) / np.sqrt(plain.running_var + plain.eps),
                               rtol=1e-12)


def test_training_forward_then_eval_backward_uses_the_cache(float64):
    """What forward kept decides backward: a training-mode forward is backpropagated as one even
    when the layer was switched to eval in between."""
    rng = np.random.default_rng(25)
    bn = _randomise(BatchNorm2d(2), rng)
    x, dy = _input(rng, (2, 2, 3, 3)), rng.standard_normal((2, 2, 3, 3))
    bn(x)
    dx_train = bn.backward(dy)
    bn(x)
    bn.eval()
    np.testing.assert_allclose(bn.backward(dy), dx_train, rtol=1e-12)


def test_without_running_statistics_eval_uses_the_batch(float64):
    rng = np.random.default_rng(26)
    bn = BatchNorm2d(2, track_running_stats=False)
    assert bn.running_mean is None and list(bn.state_dict()) == ["weight", "bias"]
    assert list(bn.named_buffers()) == []
    x = _input(rng, (2, 2, 3, 3))
    y_train = bn(x)
    bn.eval()
    np.testing.assert_allclose(bn(x), y_train, rtol=1e-12)
    assert bn._cache is None
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(x[:1, :, :1, :1])


def test_errors_name_the_layer_and_shapes():
    with pytest.raises(ShapeError, match=r"BatchNorm2d: expected input of shape \(B, 4, H, W\), "
                                         r"got shape \(2, 3, 5, 5\)"):
        BatchNorm2d(4)(np.ones((2, 3, 5, 5), dtype=np.float32))
    with pytest.raises(ShapeError, match=r"BatchNorm2d: expected input of shape \(B, 4, H, W\), "
                                         r"got shape \(2, 4, 5\)"):
        BatchNorm2d(4)(np.ones((2, 4, 5), dtype=np.float32))
    with pytest.raises(ShapeError, match=r"BatchNorm1d: expected input of shape \(B, 3\) or "
                                         r"\(B, 3, L\), got shape \(2, 5\)"):
        BatchNorm1d(3)(np.ones((2, 5), dtype=np.float32))
    with pytest.raises(ShapeError, match=r"BatchNorm1d"):
        BatchNorm1d(3).output_shape((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"BatchNorm1d: Expected more than 1 value per channel "
                                         r"when training, got input size \(1, 3\)"):
        BatchNorm1d(3)(np.ones((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel"):
        BatchNorm2d(3)(np.ones((1, 3, 1, 1), dtype=np.float32))
    with pytest.raises(TypeError, match=r"BatchNorm2d: expected a floating-point input"):
        BatchNorm2d(3)(np.ones((2, 3, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"num_features must be a positive int"):
        BatchNorm2d(0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\] or None"):
        BatchNorm2d(3, momentum=1.5)
    with pytest.raises(ValueError, match=r"eps must be a positive number"):
        BatchNorm2d(3, eps=0)
    with pytest.raises(RuntimeError, match=r"without a training-mode forward"):
        BatchNorm2d(3).backward(np.ones((2, 3, 2, 2)))
    # eval mode takes a single value per channel
    assert BatchNorm1d(3).eval()(np.ones((1, 3), dtype=np.float32)).shape == (1, 3)


def test_float32_default_dtype_and_shapes():
    bn = BatchNorm2d(3)
    assert bn.weight.dtype == np.float32 and bn.running_var.dtype == np.float32
    x = _input(np.random.default_rng(27), (2, 3, 4, 4))          # float64 in, float32 out
    y = bn(x)
    assert y.dtype == np.float32 and bn.output_shape(x.shape) == y.shape
    assert bn.running_mean.dtype == np.float32
    assert bn.backward(np.ones_like(y)).dtype == np.float32


# --- buffers in the Module contract ---------------------------------------------------------------

def _net():
    return Sequential(Conv2d(2, 3, 3, bias=False), BatchNorm2d(3), BatchNorm2d(3, affine=False))


def test_buffers_in_state_dict_with_pytorchs_names_and_order():
    net = _net()
    assert list(net.state_dict()) == [
        "0.weight",
        "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "2.running_mean", "2.running_var", "2.num_batches_tracked"]
    assert [n for n, _ in net.named_buffers()] == [
        "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "2.running_mean", "2.running_var", "2.num_batches_tracked"]
    # buffers are not parameters: optimizers never see them
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "1.weight", "1.bias"]
    assert net.state_dict()["1.num_batches_tracked"].dtype == np.int64


def test_state_dict_ordering_is_pytorchs_own_parameters_buffers_then_children():
    class Mixed(minicnn.Module):
        def __init__(self):
            self.child = BatchNorm1d(2)
            self.scale = minicnn.module.new_param(np.ones(2))
            self.register_buffer("count", np.zeros((), dtype=np.int64))
    assert list(Mixed().state_dict()) == [
        "scale", "count", "child.weight", "child.bias", "child.running_mean",
        "child.running_var", "child.num_batches_tracked"]


def test_load_state_dict_restores_buffers_strictly_and_atomically():
    rng = np.random.default_rng(28)
    a, b = _net(), _net()
    for _ in range(3):
        a(_input(rng, (2, 2, 5, 5)).astype(np.float32))
    state = a.state_dict()
    b.load_state_dict(state)
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    assert int(b[1].num_batches_tracked) == 3 and isinstance(b[1].num_batches_tracked, np.ndarray)
    # a copy: changing the dict does not change the model
    state["1.running_mean"][...] = 7
    assert not (a[1].running_mean == 7).any()

    fresh = _net()
    snap = fresh.state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['1.running_var'\]"):
        fresh.load_state_dict({k: v for k, v in a.state_dict().items() if k != "1.running_var"})
    bad = a.state_dict()
    bad["2.running_var"] = np.ones(4)        # the last entry: everything before it is fine
    with pytest.raises(ShapeError, match=r"'2.running_var' expected shape \(3,\), got \(4,\)"):
        fresh.load_state_dict(bad)
    for k, v in fresh.state_dict().items():   # nothing was written
        np.testing.assert_array_equal(v, snap[k])


def test_to_moves_buffers(monkeypatch):
    net = _net()
    moved = []

    def fake_to_device(x, dev):
        moved.append(id(x))
        return np.array(x, copy=True)
    monkeypatch.setattr(minicnn.module, "to_device", fake_to_device)
    before = net.buffers()
    net.to("cpu")
    assert {id(b) for b in before} <= set(moved)
    assert all(new is not old for new, old in zip(net.buffers(), before))   # the moved copies
    assert isinstance(net[1].running_mean, np.ndarray)


def test_register_buffer_checks_its_arguments():
    bn = BatchNorm2d(2)
    with pytest.raises(ValueError, match=r"name must be an identifier"):
        bn.register_buffer("a.b", np.zeros(1))
    with pytest.raises(TypeError, match=r"'extra' must be an array or None"):
        bn.register_buffer("extra", [1, 2])
    with pytest.raises(ValueError, match=r"'weight' is already a parameter or sub-module"):
        bn.register_buffer("weight", np.zeros(2))


# --- PyTorch side by side -------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls,tname,shape", [(BatchNorm2d, "BatchNorm2d", (3, 4, 3, 5)),
                                             (BatchNorm1d, "BatchNorm1d", (5, 4)),
                                             (BatchNorm1d, "BatchNorm1d", (2, 4, 6))])
def test_matches_torch_over_several_steps(float64, cls, tname, shape, momentum):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: the side-by-side check "
                                                "needs it")
    rng = np.random.default_rng(29)
    bn = _randomise(cls(shape[1], momentum=momentum), rng)
    ref = getattr(torch.nn, tname)(shape[1], momentum=momentum).double()
    ref.load_state_dict({k: torch.tensor(v) for k, v in bn.state_dict().items()})
    for _ in range(3):
        x, dy = _input(rng, shape), rng.standard_normal(shape)
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt)
        yt.backward(torch.tensor(dy))
        np.testing.assert_allclose(bn(x), yt.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(bn.backward(dy), xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn.weight.grad, ref.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.bias.grad, ref.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(bn.state_dict()[k], v.numpy(), rtol=1e-12, atol=1e-14)
    bn.eval()
    ref.eval()
    x = _input(rng, shape)
    np.testing.assert_allclose(bn(x), ref(torch.tensor(x)).detach().numpy(), rtol=1e-10,
                               atol=1e-12)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ref.train()(torch.ones((1, shape[1]) + (1,) * (len(shape) - 2)))   # PyTorch's message
