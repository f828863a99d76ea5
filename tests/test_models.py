"""Identity, AdaptiveAvgPool2d, BasicBlock and the model zoo (LeNet-5, VGG-11, ResNet-18): backward
against finite differences, ResNet-18 against a PyTorch re-implementation on the same weights,
torchvision's state_dict names, head replacement, freeze()."""
import copy

import numpy as np
import pytest

import minicnn
from minicnn import SGD, Adam, CrossEntropyLoss, Linear, Sequential, ShapeError
from minicnn.backend import cuda_unavailable_reason
from minicnn.blocks import BasicBlock, downsample
from minicnn.layers import AdaptiveAvgPool2d, Identity
from minicnn.models import ResNet, lenet5, mnist_cnn, resnet18, vgg11
from minicnn.normalization import BatchNorm1d, BatchNorm2d
from minicnn.testing import gradcheck
from minicnn.weights import load_torch_weights

from conftest import unique_values


def _randomise_bn(model, rng):
    """Non-trivial BatchNorm weights, biases and running statistics in every BatchNorm2d."""
    for _, m in model.named_modules():
        if isinstance(m, BatchNorm2d):
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.num_features)
            m.bias.data[...] = rng.uniform(-0.3, 0.3, m.num_features)
            m.running_mean[...] = rng.uniform(-0.2, 0.2, m.num_features)
            m.running_var[...] = rng.uniform(0.5, 1.5, m.num_features)
    return model


# --- Identity and AdaptiveAvgPool2d ---------------------------------------------------------------

def test_identity_passes_values_and_gradients(float64):
    x = np.random.default_rng(30).standard_normal((2, 3, 4))
    layer = Identity(54, unused="argument")
    assert layer(x) is x and layer.output_shape((2, 3, 4)) == (2, 3, 4)
    gradcheck(layer, x)
    assert layer.backward(x, input_grad=False) is None


def adaptive_reference(x, oh, ow):
    """PyTorch's rule by loops: cell i averages rows floor(i*H/oh) .. ceil((i+1)*H/oh) - 1."""
    B, C, H, W = x.shape
    y = np.zeros((B, C, oh, ow))
    for i in range(oh):
        for j in range(ow):
            h0, h1 = (i * H) // oh, -((-(i + 1) * H) // oh)
            w0, w1 = (j * W) // ow, -((-(j + 1) * W) // ow)
            y[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return y


ADAPTIVE_CASES = [  # output_size, input shape, expected (OH, OW)
    (1, (2, 3, 5, 4), (1, 1)),              # global average pooling
    ((1, 1), (1, 2, 3, 7), (1, 1)),
    (2, (2, 2, 4, 6), (2, 2)),              # divides evenly
    ((2, 3), (1, 2, 5, 7), (2, 3)),         # overlapping windows
    ((3, None), (2, 1, 4, 5), (3, 5)),      # None keeps the input's size
    (6, (1, 2, 4, 3), (6, 6)),              # larger than the input: windows repeat pixels
]


@pytest.mark.parametrize("size,shape,out", ADAPTIVE_CASES)
def test_adaptive_avgpool_gradcheck_and_forward(float64, size, shape, out):
    x = unique_values(np.random.default_rng(31), shape) - 0.5
    pool = AdaptiveAvgPool2d(size)
    y = pool(x)
    assert y.shape == shape[:2] + out == pool.output_shape(shape)
    np.testing.assert_allclose(y, adaptive_reference(x, *out), rtol=1e-12, atol=1e-15)
    gradcheck(pool, x)


@pytest.mark.parametrize("size,shape,out", ADAPTIVE_CASES)
def test_adaptive_avgpool_matches_pytorch(float64, size, shape, out):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: the side-by-side check "
                                                "needs it")
    x = unique_values(np.random.default_rng(32), shape)
    pool = AdaptiveAvgPool2d(size)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.AdaptiveAvgPool2d(size)(xt)
    dy = np.random.default_rng(33).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(pool(x), yt.detach().numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pool.backward(dy), xt.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_adaptive_avgpool_errors():
    with pytest.raises(ValueError, match=r"AdaptiveAvgPool2d: output_size must be a positive int"):
        AdaptiveAvgPool2d(0)
    with pytest.raises(ValueError, match=r"output_size"):
        AdaptiveAvgPool2d((1, 2, 3))
    with pytest.raises(ShapeError, match=r"AdaptiveAvgPool2d: expected a 4-D input"):
        AdaptiveAvgPool2d(1)(np.ones((2, 3, 4), dtype=np.float32))


# --- BasicBlock -----------------------------------------------------------------------------------

BLOCK_CASES = [  # in_planes, planes, stride, (B, H, W)
    (2, 2, 1, (2, 4, 5)),                   # identity shortcut
    (2, 3, 2, (2, 5, 5)),                   # downsample: stride 2, odd size, wider
    (3, 2, 1, (3, 3, 4)),                   # downsample: narrower, stride 1
]


@pytest.mark.parametrize("cin,planes,stride,bhw", BLOCK_CASES)
def test_basic_block_gradcheck(float64, cin, planes, stride, bhw):
    rng = np.random.default_rng(34)
    short = None if (cin, stride) == (planes, 1) else downsample(cin, planes, stride)
    block = _randomise_bn(BasicBlock(cin, planes, stride, short), rng)
    x = rng.standard_normal((bhw[0], cin) + bhw[1:])
    y = block(x)
    assert y.shape == block.output_shape(x.shape)
    assert y.shape[2] == -(-bhw[1] // stride) and (y >= 0).all()
    report = gradcheck(block, x)
    assert ("downsample.0.weight" in report) == (short is not None)


def test_basic_block_forward_by_hand_and_input_grad_false(float64):
    rng = np.random.default_rng(35)
    block = _randomise_bn(BasicBlock(2, 3, 2, downsample(2, 3, 2)), rng)
    x = rng.standard_normal((2, 2, 5, 5))
    main = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    np.testing.assert_allclose(block(x), np.maximum(main + block.downsample(x), 0), rtol=1e-12)
    dy = rng.standard_normal((2, 3, 3, 3))
    block(x)
    block.backward(dy)
    grads = [p.grad.copy() for p in block.parameters()]
    block.zero_grad()
    block(x)
    assert block.backward(dy, input_grad=False) is None
    for p, g in zip(block.parameters(), grads):
        np.testing.assert_allclose(p.grad, g, rtol=1e-12)


def test_basic_block_names_and_errors():
    block = BasicBlock(4, 8, 2, downsample(4, 8, 2))
    assert list(block.state_dict()) == [
        "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
        "bn1.num_batches_tracked", "conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean",
        "bn2.running_var", "bn2.num_batches_tracked", "downsample.0.weight",
        "downsample.1.weight", "downsample.1.bias", "downsample.1.running_mean",
        "downsample.1.running_var", "downsample.1.num_batches_tracked"]
    assert block.conv1.bias is None and block.conv1.stride == (2, 2)
    with pytest.raises(ValueError, match=r"BasicBlock: with in_planes=4, planes=8, stride=2 the "
                                         r"identity shortcut does not fit"):
        BasicBlock(4, 8, 2)
    with pytest.raises(ShapeError, match=r"BasicBlock: the shortcut gives shape \(1, 8, 4, 4\) "
                                         r"but the residual branch \(1, 8, 2, 2\)"):
        BasicBlock(4, 8, 2, downsample(4, 8, 1)).output_shape((1, 4, 4, 4))
    with pytest.raises(ShapeError, match=r"Conv2d: expected 4 input channels"):
        block.output_shape((1, 3, 8, 8))


# --- ResNet-18: torchvision's names ---------------------------------------------------------------

def torchvision_resnet18_keys():
    """The state_dict keys of torchvision.models.resnet18(), in order: its documented structure
    (conv1/bn1 stem, layer1..4 of two BasicBlocks each, a downsample in the first block of
    layer2..4, fc), each module's parameters, then its buffers, then its children."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in bn]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys += [f"{p}.conv1.weight"] + [f"{p}.bn1.{k}" for k in bn]
            keys += [f"{p}.conv2.weight"] + [f"{p}.bn2.{k}" for k in bn]
            if layer > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{k}" for k in bn]
    return keys + ["fc.weight", "fc.bias"]


def test_resnet18_state_dict_keys_are_torchvisions():
    model = resnet18()
    keys = list(model.state_dict())
    assert len(keys) == 122
    assert keys == torchvision_resnet18_keys()
    assert keys[:7] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                        "bn1.running_var", "bn1.num_batches_tracked", "layer1.0.conv1.weight"]
    assert "layer2.0.downsample.0.weight" in keys and "layer1.0.downsample.0.weight" not in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]
    # the ImageNet stem has the same names (only conv1's shape differs)
    imagenet = resnet18(num_classes=1000, cifar_stem=False)
    assert list(imagenet.state_dict()) == keys
    assert imagenet.conv1.weight.shape == (64, 3, 7, 7)
    assert model.conv1.weight.shape == (64, 3, 3, 3)


def test_resnet18_shapes_and_parameter_counts():
    model = resnet18()
    assert model.num_parameters() == 11_173_962
    x = np.random.default_rng(36).standard_normal((2, 3, 32, 32)).astype(np.float32)
    y = model(x)
    assert y.shape == (2, 10) == model.output_shape(x.shape) and y.dtype == np.float32
    assert np.isfinite(y).all()
    assert model.backward(np.ones_like(y)).shape == x.shape
    assert isinstance(model.maxpool, Identity)
    imagenet = resnet18(num_classes=1000, cifar_stem=False)
    assert imagenet.num_parameters() == 11_689_512            # torchvision's resnet18
    assert imagenet.output_shape((1, 3, 224, 224)) == (1, 1000)
    assert imagenet(x).shape == (2, 1000)                      # any size >= 32 pools to 1x1
    with pytest.raises(ShapeError, match=r"Conv2d: expected 3 input channels"):
        model.output_shape((1, 1, 32, 32))


# --- ResNet-18 side by side with PyTorch ----------------------------------------------------------

def _torch_resnet18(torch, num_classes, cifar_stem):
    """torchvision's resnet18 written out in PyTorch (torchvision is not needed)."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or cin != planes:
                self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                                nn.BatchNorm2d(planes))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if cifar_stem:
                self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            else:
                self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU()
            self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
            cin, layers = 64, []
            for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
                layers.append(nn.Sequential(Block(cin, planes, stride), Block(planes, planes, 1)))
                cin = planes
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return Net().double()


def close(actual, desired, name=""):
    """float64 agreement relative to the array's scale: 20 layers of BatchNorm over as few as two
    values per channel (B=2 at 1x1) amplify rounding, so small entries are compared to the
    largest one (llm.c's tol + |ref| * eps)."""
    np.testing.assert_allclose(actual, desired, rtol=1e-7, atol=1e-9 * np.abs(desired).max(),
                               err_msg=name)


@pytest.mark.parametrize("cifar_stem,shape", [(True, (2, 3, 8, 8)), (False, (2, 3, 24, 24))])
def test_resnet18_matches_pytorch(float64, tmp_path, cifar_stem, shape):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: the side-by-side check "
                                                "needs it")
    torch.manual_seed(0)
    ref = _torch_resnet18(torch, 5, cifar_stem)
    rng = np.random.default_rng(37)
    with torch.no_grad():     # non-trivial BatchNorm state on the PyTorch side
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(3)
    assert list(ref.state_dict()) == torchvision_resnet18_keys()
    # PyTorch's weights into minicnn through a file, as a user would
    path = tmp_path / "resnet18.npz"
    np.savez(path, **{k: v.numpy() for k, v in ref.state_dict().items()})
    model = resnet18(num_classes=5, cifar_stem=cifar_stem)
    load_torch_weights(model, path)

    x = rng.standard_normal(shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = ref(xt)
    dy = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    y = model(x)
    close(y, yt.detach().numpy())
    close(model.backward(dy), xt.grad.numpy())
    torch_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        close(p.grad, torch_params[name].grad.numpy(), name)
    state = model.state_dict()       # running statistics moved the same way
    for name, v in ref.state_dict().items():
        np.testing.assert_allclose(state[name], v.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
    assert int(state["layer4.1.bn2.num_batches_tracked"]) == 4
    model.eval()
    ref.eval()
    x = rng.standard_normal(shape)
    close(model(x), ref(torch.tensor(x)).detach().numpy())


# --- head replacement, freezing, training ---------------------------------------------------------

def _batch(rng, n=4, size=8, classes=3):
    return (rng.standard_normal((n, 3, size, size)).astype(np.float32),
            rng.integers(0, classes, n))


def test_replacing_the_head_keeps_the_order_and_trains():
    rng = np.random.default_rng(38)
    model = resnet18()
    model.fc = Linear(512, 3)
    keys = list(model.state_dict())
    assert keys == torchvision_resnet18_keys() and model.state_dict()["fc.weight"].shape == (3, 512)
    assert model.parameters()[-1] is model.fc.bias
    assert model.output_shape((4, 3, 8, 8)) == (4, 3)
    x, t = _batch(rng)
    loss_fn = CrossEntropyLoss()
    opt = SGD(model.parameters(), lr=0.01)
    before = [p.data.copy() for p in model.parameters()]
    loss0 = loss_fn(model(x), t)
    opt.zero_grad()
    model.backward(loss_fn.backward(), input_grad=False)
    opt.step()
    assert all(not np.array_equal(p.data, b) for p, b in zip(model.parameters(), before))
    assert float(loss_fn(model(x), t)) < float(loss0)


def test_freeze_stops_updates_but_not_backward():
    rng = np.random.default_rng(39)
    model = resnet18()
    model.fc = Linear(512, 3)
    assert model.freeze() is model
    assert not any(p.requires_grad for p in model.parameters())
    model.fc.unfreeze()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    x, t = _batch(rng)
    loss_fn = CrossEntropyLoss()
    for opt in (SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
                Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)):
        before = {n: p.data.copy() for n, p in model.named_parameters()}
        loss_fn(model(x), t)
        opt.zero_grad()
        dx = model.backward(loss_fn.backward())            # through the frozen backbone
        opt.step()
        assert dx.shape == x.shape and np.isfinite(dx).all()
        for n, p in model.named_parameters():
            changed = not np.array_equal(p.data, before[n])
            assert changed == n.startswith("fc."), n
    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_batchnorm_in_eval_mode_inside_a_training_network(float64):
    """torchvision's FrozenBatchNorm2d idiom: bn.eval().freeze() keeps the running statistics
    and the affine parameters, while the convolutions around it train."""
    rng = np.random.default_rng(40)
    block = _randomise_bn(BasicBlock(2, 2), rng)
    for bn in (block.bn1, block.bn2):
        bn.eval().freeze()
    x = rng.standard_normal((1, 2, 3, 3))          # batch 1 with 1x1... fine in eval mode
    dy = rng.standard_normal((1, 2, 3, 3))
    block(x)
    dx = block.backward(dy)
    stats = block.bn1.running_mean.copy()
    eps = 1e-6
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        numeric[i] = (np.sum(block(x + e) * dy) - np.sum(block(x - e) * dy)) / (2 * eps)
    np.testing.assert_allclose(dx, numeric, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(block.bn1.running_mean, stats)
    assert block.conv1.weight.grad.any() and not block.bn1.weight.grad.any()


# --- LeNet-5 and VGG-11 ---------------------------------------------------------------------------

def test_lenet5_shapes_and_a_training_step():
    model = lenet5()
    assert model.num_parameters() == 61_706
    assert model.output_shape((2, 1, 28, 28)) == (2, 10)
    rng = np.random.default_rng(41)
    x, t = rng.standard_normal((8, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 8)
    loss_fn, opt = CrossEntropyLoss(), Adam(model.parameters(), lr=1e-3)
    loss0 = float(loss_fn(model(x), t))
    for _ in range(3):
        loss_fn(model(x), t)
        opt.zero_grad()
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    assert float(loss_fn(model(x), t)) < loss0
    assert lenet5(num_classes=4).output_shape((1, 1, 28, 28)) == (1, 4)


def test_vgg11_shapes_names_and_backward():
    model = vgg11()
    assert model.num_parameters() == 9_231_114
    assert vgg11(batch_norm=False).num_parameters() == 9_225_610
    keys = list(model.state_dict())
    assert keys[:7] == ["features.0.weight", "features.0.bias", "features.1.weight",
                        "features.1.bias", "features.1.running_mean", "features.1.running_var",
                        "features.1.num_batches_tracked"]
    assert keys[-2:] == ["classifier.weight", "classifier.bias"]
    assert sum(isinstance(m, BatchNorm2d) for m in model.features) == 8
    x = np.random.default_rng(42).standard_normal((2, 3, 32, 32)).astype(np.float32)
    y = model(x)
    assert y.shape == (2, 10) == model.output_shape(x.shape)
    assert model.backward(np.ones_like(y)).shape == x.shape
    assert vgg11(num_classes=4, in_channels=1).output_shape((1, 1, 32, 32)) == (1, 4)


def test_mnist_cnn_unchanged():
    assert mnist_cnn().num_parameters() == 225_034
    assert isinstance(mnist_cnn(), Sequential)


def test_resnet_class_and_seeded_construction():
    minicnn.seed(5)
    a = resnet18()
    minicnn.seed(5)
    b = resnet18()
    assert isinstance(a, ResNet)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=n)
    # torchvision's init: kaiming-normal (fan_out) convolutions, BatchNorm ones/zeros
    w = a.layer3[0].conv1.weight.data
    assert abs(float(w.std()) - np.sqrt(2 / (256 * 9))) < 0.05 * np.sqrt(2 / (256 * 9))
    assert (a.bn1.weight.data == 1).all() and (a.bn1.bias.data == 0).all()


# --- checkpoints (minicnn.save / minicnn.load) with buffers ---------------------------------------

def test_checkpoint_round_trip_with_buffers(tmp_path):
    rng = np.random.default_rng(43)
    a, b = vgg11(num_classes=3), vgg11(num_classes=3)
    x, _ = _batch(rng, n=2, size=32)
    a(x)
    path = tmp_path / "vgg.ckpt"
    minicnn.save(a, path)
    minicnn.load(b, path)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        np.testing.assert_array_equal(va, vb, err_msg=k)
    assert int(b.features[1].num_batches_tracked) == 1


def test_checkpoint_without_buffers_fails_clearly(tmp_path):
    """A file that lacks the running statistics (saved from a model without BatchNorm's buffers,
    e.g. track_running_stats=False) does not load into one that has them."""
    plain = Sequential(minicnn.Conv2d(1, 2, 3), BatchNorm2d(2, track_running_stats=False))
    path = tmp_path / "plain.ckpt"
    minicnn.save(plain, path)
    tracked = Sequential(minicnn.Conv2d(1, 2, 3), BatchNorm2d(2))
    snap = tracked.state_dict()
    with pytest.raises(minicnn.CheckpointError, match=r"1\.running_mean"):
        minicnn.load(tracked, path)
    for k, v in tracked.state_dict().items():
        np.testing.assert_array_equal(v, snap[k])


# --- CPU vs GPU (pytest -m gpu) -----------------------------------------------------------------

GPU_CASES = [  # name, factory, input shape, float32 tolerance
    ("BatchNorm2d", lambda: BatchNorm2d(3), (2, 3, 5, 4), 1e-5),
    ("BatchNorm1d", lambda: BatchNorm1d(4), (6, 4), 1e-5),
    ("AdaptiveAvgPool2d(1)", lambda: AdaptiveAvgPool2d(1), (2, 3, 5, 4), 1e-6),
    ("AdaptiveAvgPool2d((2, 3))", lambda: AdaptiveAvgPool2d((2, 3)), (2, 3, 5, 7), 1e-6),
    ("BasicBlock", lambda: BasicBlock(2, 4, 2, downsample(2, 4, 2)), (2, 2, 6, 6), 5e-4),
    # 16x16 and batch 8: at 8x8 and batch 2 the last BatchNorms normalise two values per
    # channel, and float32 on the CPU alone is 0.13 from float64 (see the test below)
    ("resnet18", lambda: resnet18(num_classes=3), (8, 3, 16, 16), 5e-4),
]


@pytest.mark.parametrize("name,make,shape,tol32", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_parity_cases_are_well_conditioned(name, make, shape, tol32):
    """A CPU-vs-GPU tolerance means something only where rounding does not blow up: on the CPU,
    float32 must be within tol32 / 8 of float64 for the same weights and inputs, so the GPU
    comparison has 8x headroom over float32's own error."""
    models = {}
    for dtype in (np.float64, np.float32):
        minicnn.set_default_dtype(dtype)
        minicnn.seed(0)
        models[dtype] = make()
    models[np.float32].load_state_dict(
        {k: v.astype(np.float32) for k, v in models[np.float64].state_dict().items()})
    rng = np.random.default_rng(44)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(models[np.float64].output_shape(shape))
    results = {}
    for dtype, model in models.items():
        y = model(x.astype(dtype))
        dx = model.backward(dy.astype(dtype))
        results[dtype] = [y, dx] + [p.grad for p in model.parameters()]
    worst = max(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b))
                for a, b in zip(results[np.float32], results[np.float64]))
    assert worst <= tol32 / 8, f"{name}: float32 is {worst:.3g} from float64 on the CPU alone"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,make,shape,tol32", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_parity(name, make, shape, tol32, dtype):
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no usable GPU: {reason}")
    minicnn.set_default_dtype(dtype)
    cpu = make()
    gpu = copy.deepcopy(cpu).to("cuda")
    assert all(minicnn.get_array_module(b).__name__ == "cupy" for b in gpu.buffers())
    rng = np.random.default_rng(44)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(cpu.output_shape(shape)).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else tol32

    def close(g, c):
        ref = np.asarray(c)
        err = np.max(np.abs(minicnn.to_numpy(g) - ref)) / max(np.max(np.abs(ref)), 1e-30)
        assert err <= tol, f"{name}: error {err:.3g} relative to the largest value > {tol}"

    close(gpu(minicnn.to_device(x, "cuda")), cpu(x))
    close(gpu.backward(minicnn.to_device(dy, "cuda")), cpu.backward(dy))
    for pg, pc in zip(gpu.parameters(), cpu.parameters()):
        close(pg.grad, pc.grad)
    for (k, vg), vc in zip(gpu.state_dict().items(), cpu.state_dict().values()):
        close(vg, vc)
    gpu.eval()
    cpu.eval()
    close(gpu(minicnn.to_device(x, "cuda")), cpu(x))
