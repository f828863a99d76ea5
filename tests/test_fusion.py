"""Fused against plain: ``minicnn.fuse(model)`` computes what ``model`` computes.

Errors are max |fused - plain| / max |plain|: of the output, of the input gradient, and of each
layer's parameter gradients (relative to the largest gradient of that layer's parameters).

1. float64, on the example network, LeNet-5, VGG-11 (with BatchNorm and without) and 14 random
   stacks of Conv2d, ReLU, MaxPool2d, AvgPool2d, Flatten and Linear (seeded): outputs and input
   gradients within 1e-13, parameter gradients within 1e-12, and the parameters after 20 Adam
   steps (plain ``Adam`` and loss against ``FusedAdam`` and the fused loss) within 1e-11.
   They are not bit-identical because the fused modules sum in other orders, all of them sums
   of the same terms:
   - a convolution cut short for its pool (fewer rows) or with its rows in window order is a
     product of another shape, which BLAS blocks otherwise: a row's sums may round differently
     (the only source of differences in the outputs);
   - its weight gradient is ``cols.T @ dy2`` instead of ``dy2.T @ cols``, over the rows a pool
     reads only (the rows left out contribute exact zeros) and, with a tiling max pool, in
     window order;
   - its bias gradient is a product with a row of ones (``column_sums``) instead of NumPy's
     pairwise ``sum(axis=0)``;
   - its input gradient is ``col2im_matmul``, kh*kw products of column slices of the weight,
     instead of ``col2im`` of one product.
   Measured: outputs at most 2.3e-16 apart, input gradients 1.4e-15, parameter gradients
   2.1e-15, 20 Adam steps 1.4e-13.
   One exception, VGG-11 with BatchNorm (in the slow set): after 20 Adam steps its last
   convolution's weights agree to 1e-9. That layer sees 2x2 maps at batch 2, and most of its
   weight gradient's elements are 1e-9 to 1e-11 of the largest (many are exactly 0: ReLUs that
   never fire). Their last-bit differences are 1e-13 of the largest gradient, as everywhere, but
   1e-7 of their own size, and Adam divides each element by its own RMS: every step moves them
   by up to lr*1e-7. Its convolutions' biases are frozen there: BatchNorm takes the mean out, so
   their gradient is 0 in exact arithmetic, both sides compute noise, and Adam would turn the
   noise into steps of eps's size.
2. float32 on the same networks: outputs and input gradients within 1e-5, parameter gradients
   within 1e-5 (measured: 5.2e-7, 6.7e-7, 1.2e-6), 20 Adam steps within 2e-3 (the float32 training
   bound of the CPU-vs-GPU tests; measured 2.7e-4: Adam divides each gradient element by its
   own RMS, so the rounding differences of small elements grow into steps).
3. Bit for bit where the arithmetic is the same: a ReLU folded into a max pool (either side of
   it) or into a Linear, the fast window ops against the plain ones (im2col in both memory
   layouts, col2im, max pooling, threads or not), the fused loss against the plain loss on the
   CPU; and, on the small shapes tested, a convolution cut short or in window order against
   the full one's outputs (larger products BLAS may block otherwise, as in 1).
4. The fused kernels through the emulator: the fused example network (and convolutions with
   ReLUs and an overlapping pool) trained 3 steps with every kernel emulated equals its NumPy
   run (1e-12) and the plain run (1e-11); the one-kernel loss equals the plain loss (1e-13).
5. What fuse returns: names, state_dict keys and Parameter objects unchanged, what it prints,
   an optimizer made before fusing, checkpoints either way, modes, devices, summary, the given
   model left as it was; gradchecks of the fused modules.
"""
import copy

import numpy as np
import pytest

import minicnn
from minicnn import (AvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential,
                     ShapeError, fused, ops)
from minicnn.fused import FusedConv2d, FusedLinear, FusedMaxPool2d, windows
from minicnn.fused.modules import reach, tiles
from minicnn.models import ResNet, lenet5, mnist_cnn, vgg11
from minicnn.blocks import BasicBlock
from minicnn.testing import emulator, gradcheck

from conftest import unique_values
from test_kernel_paths import _train, convs_with_relus
from test_layers import CONV_CASES, POOL_CASES, _pair


def rel_err(got, want):
    want = np.asarray(want, dtype=np.float64)
    scale = np.max(np.abs(want)) if want.size else 0.0
    diff = np.max(np.abs(np.asarray(got, dtype=np.float64) - want)) if want.size else 0.0
    return diff / scale if scale > 0 else diff


# --- the networks ------------------------------------------------------------------------------

POOLS = [lambda: MaxPool2d(2), lambda: MaxPool2d((1, 2)), lambda: MaxPool2d(3, stride=2, padding=1),
         lambda: MaxPool2d(2, stride=3, padding=1), lambda: AvgPool2d(2),
         lambda: AvgPool2d(3, stride=2, padding=1)]


TAILS = ["P", "rP", "Pr", "r", "", "rPr", "rr"]     # after a convolution: ReLUs (r), a pool (P)


def random_stack(seed):
    """(a Sequential of convolutions, ReLUs, pools (max and average; tiling, overlapping,
    padded), a flatten and linear layers, its input shape), drawn from ``seed``; convolution b
    (0 or 1) is followed by ``TAILS[(seed + b) % 7]`` with the pool ``POOLS[(5*seed + b) % 6]``."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(9, 16)),
             int(rng.integers(9, 16)))
    _, C, H, W = shape
    layers = []
    first = [[], [ReLU(), MaxPool2d(2, stride=1)], [MaxPool2d(2, stride=1), ReLU()],
             [MaxPool2d(2, stride=1)]][int(rng.integers(4))]      # max pools not after a conv
    layers += first
    H, W = (H - 1, W - 1) if first else (H, W)
    for block in range(int(rng.integers(1, 3))):
        k, s, p = int(rng.integers(1, 4)), int(rng.integers(1, 3)), int(rng.integers(0, 2))
        O = int(rng.integers(2, 6))
        layers.append(Conv2d(C, O, k, stride=s, padding=p, bias=bool(rng.integers(4))))
        C, H, W = O, ops.out_size(H, k, s, p), ops.out_size(W, k, s, p)
        for kind in TAILS[(seed + block) % len(TAILS)]:
            layer = ReLU() if kind == "r" else POOLS[(5 * seed + block) % len(POOLS)]()
            try:
                C, H, W = layer.output_shape((1, C, H, W))[1:]
            except ShapeError:          # a window larger than the input: leave the pool out
                continue
            layers.append(layer)
    hidden = int(rng.integers(3, 9))
    layers += [Flatten(), Linear(C * H * W, hidden)] + [ReLU()] * int(rng.integers(2))
    layers.append(Linear(hidden, int(rng.integers(2, 6))))
    return Sequential(*layers), shape


NETWORKS = {
    "example": (mnist_cnn, (3, 1, 28, 28)),
    "LeNet-5": (lenet5, (3, 1, 28, 28)),
    "VGG-11": (vgg11, (2, 3, 32, 32)),
    "VGG-11 without BatchNorm": (lambda: vgg11(batch_norm=False), (2, 3, 32, 32)),
}
NETWORKS.update({f"random stack {seed}": (lambda seed=seed: random_stack(seed)[0],
                                          random_stack(seed)[1]) for seed in range(14)})


def test_the_random_stacks_cover_every_run_fuse_knows():
    found = set()
    for seed in range(14):
        model = minicnn.fuse(random_stack(seed)[0])
        for _, m in model.named_modules():
            if type(m) is FusedConv2d:
                found.add(("conv", m.relu, type(m.pool).__name__ if m.pool is not None else None,
                           tiles(m.pool) if m.pool is not None else None))
            elif type(m) in (FusedLinear, FusedMaxPool2d):
                found.add((type(m).__name__, m.relu))
    for run in [("conv", True, "MaxPool2d", True), ("conv", False, "MaxPool2d", True),
                ("conv", True, None, None), ("conv", False, None, None),
                ("conv", True, "AvgPool2d", False), ("conv", False, "AvgPool2d", False),
                ("conv", False, "FusedMaxPool2d", False), ("FusedLinear", True),
                ("FusedMaxPool2d", True), ("FusedMaxPool2d", False)]:
        assert run in found, run


def _run(model, x, dy):
    """(output, input gradient, {layer name: [its parameter gradients]}) of one step."""
    model.zero_grad()
    y = model(x)
    dx = model.backward(dy)
    grads = {}
    for name, m in model.named_modules():
        own = [v.grad.copy() for v in vars(m).values() if isinstance(v, minicnn.Parameter)]
        if own:
            grads[name] = own
    return y.copy(), dx.copy(), grads


def _errors(network, dtype):
    make, shape = NETWORKS[network]
    minicnn.set_default_dtype(dtype)
    minicnn.seed(0)
    model = make()
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(model.output_shape(shape)).astype(dtype)
    plain = _run(model, x, dy)
    fast = _run(minicnn.fuse(model), x, dy)
    assert plain[2].keys() == fast[2].keys()
    grads = max(rel_err(np.concatenate([g.ravel() for g in fast[2][k]]),
                        np.concatenate([g.ravel() for g in plain[2][k]])) for k in plain[2])
    return rel_err(fast[0], plain[0]), rel_err(fast[1], plain[1]), grads


@pytest.mark.parametrize("network", NETWORKS)
def test_fused_equals_plain_in_float64(network):
    y, dx, grads = _errors(network, np.float64)
    assert y <= 1e-13 and dx <= 1e-13, (y, dx)
    assert grads <= 1e-12, grads


@pytest.mark.parametrize("network", NETWORKS)
def test_fused_equals_plain_in_float32(network):
    y, dx, grads = _errors(network, np.float32)
    assert y <= 1e-5 and dx <= 1e-5, (y, dx)
    assert grads <= 1e-5, grads


def _twenty_steps(make, shape, dtype, freeze=lambda model: None, steps=20):
    """The parameters after ``steps`` Adam steps of a plain model and of the fused copy of it
    (FusedAdam, the fused loss), on the same random batches."""
    minicnn.set_default_dtype(dtype)
    minicnn.seed(0)
    model = make()
    freeze(model)
    fast = minicnn.fuse(copy.deepcopy(model))
    rng = np.random.default_rng(2)
    classes = model.output_shape(shape)[1]
    batches = [(rng.standard_normal(shape).astype(dtype), rng.integers(0, classes, shape[0]))
               for _ in range(steps)]
    runs = []
    for m, opt, loss_fn in ((model, minicnn.Adam, minicnn.CrossEntropyLoss),
                            (fast, fused.FusedAdam, fused.CrossEntropyLoss)):
        opt, loss_fn = opt(m.parameters(), lr=1e-3), loss_fn()
        for x, y in batches:
            loss_fn(m(x), y)
            opt.zero_grad()
            m.backward(loss_fn.backward(), input_grad=False)
            opt.step()
        runs.append([p.data.copy() for p in m.parameters()])
    return max(rel_err(b, a) for a, b in zip(*runs))


STEP_NETWORKS = ["example", "LeNet-5"] + [f"random stack {seed}" for seed in range(0, 14, 3)]


@pytest.mark.parametrize("network", STEP_NETWORKS)
def test_twenty_adam_steps_in_float64(network):
    assert _twenty_steps(*NETWORKS[network], np.float64) <= 1e-11


@pytest.mark.parametrize("network", ["example", "LeNet-5"])
def test_twenty_adam_steps_in_float32(network):
    assert _twenty_steps(*NETWORKS[network], np.float32) <= 2e-3


def _freeze_biases_before_batchnorm(model):
    layers = list(model.features)
    for conv, after in zip(layers, layers[1:]):
        if type(conv) is Conv2d and type(after) is BatchNorm2d:
            conv.bias.requires_grad = False


@pytest.mark.slow
def test_twenty_adam_steps_of_vgg11_in_float64():
    """Without BatchNorm, 1e-11; with it, 1e-9 and the convolutions' biases frozen (see the
    module's docstring for why)."""
    assert _twenty_steps(*NETWORKS["VGG-11 without BatchNorm"], np.float64) <= 1e-11
    assert _twenty_steps(*NETWORKS["VGG-11"], np.float64,
                         freeze=_freeze_biases_before_batchnorm) <= 1e-9


def test_small_resnets_fused_equal_plain_in_float64(float64):
    """Outside Sequentials (ResNet's stem, BasicBlock's convolutions) each Conv2d and MaxPool2d
    becomes its fused module; downsample Sequentials are fused as such."""
    for cifar_stem, size in ((True, 8), (False, 32)):
        minicnn.seed(3)
        model = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=5, cifar_stem=cifar_stem)
        fast = minicnn.fuse(model)
        assert type(fast.conv1) is FusedConv2d and type(fast.layer1[0].conv2) is FusedConv2d
        assert type(fast.layer2[0].downsample[0]) is FusedConv2d
        assert type(fast.maxpool) is (FusedMaxPool2d if not cifar_stem else minicnn.Identity)
        assert list(fast.state_dict()) == list(model.state_dict())
        rng = np.random.default_rng(4)
        x = rng.standard_normal((2, 3, size, size))
        dy = rng.standard_normal((2, 5))
        plain, got = _run(model, x, dy), _run(fast, x, dy)
        assert rel_err(got[0], plain[0]) <= 1e-13 and rel_err(got[1], plain[1]) <= 1e-13
        for k in plain[2]:
            for a, b in zip(got[2][k], plain[2][k]):
                assert rel_err(a, b) <= 1e-12, k


# --- bit for bit where the arithmetic is the same ------------------------------------------------

@pytest.mark.parametrize("layers", [
    lambda: [ReLU(), MaxPool2d(2)], lambda: [MaxPool2d(2), ReLU()],
    lambda: [ReLU(), MaxPool2d(3, stride=2, padding=1)], lambda: [MaxPool2d((2, 3), stride=1)],
    lambda: [Flatten(), Linear(120, 7), ReLU()],
], ids=["relu-pool", "pool-relu", "relu-overlapping-pool", "pool", "linear-relu"])
def test_folded_relus_are_bit_for_bit(layers, float64):
    """relu(max) = max(relu): the running maximum starting at 0 picks the same winners, and
    where no value is positive neither order sends a gradient; a Linear's ReLU in place, its
    output as the mask, does the same operations as a ReLU layer. Outputs, input gradients and
    parameter gradients are identical."""
    model = Sequential(*layers())
    fast = minicnn.fuse(model)
    assert len(fast) == len(model) - (ReLU in [type(m) for m in model])
    rng = np.random.default_rng(5)
    x = unique_values(rng, (3, 2, 6, 10)) - 0.6                     # many windows all negative
    y = model(x)
    dy = rng.standard_normal(y.shape)
    (y0, dx0, g0), (y1, dx1, g1) = _run(model, x, dy), _run(fast, x, dy)
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(dx1, dx0)
    for k in g0:
        np.testing.assert_array_equal(g1[k][0], g0[k][0])
        for a, b in zip(g1[k][1:], g0[k][1:]):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("relu", [False, True])
def test_windows_maxpool_is_ops_maxpool(relu):
    """The fast max pool (a running maximum, the batch split between threads, int8 argmax)
    against the plain one, and with ``relu`` against the plain one of relu(x)."""
    rng = np.random.default_rng(6)
    x = unique_values(rng, (7, 3, 9, 8)) - 0.5
    for k, s, p in (((2, 2), (2, 2), (0, 0)), ((3, 2), (2, 1), (1, 1)), ((2, 3), (3, 1), (1, 0))):
        y, argmax = windows.maxpool2d(x, *k, s, p, relu)
        want_y, want_argmax = ops.maxpool2d(np.maximum(x, 0) if relu else x, *k, s, p)
        np.testing.assert_array_equal(y, want_y)
        if not relu:
            np.testing.assert_array_equal(argmax, want_argmax)


@pytest.mark.parametrize("cin,cout,k,s,p,bhw", CONV_CASES)
def test_windows_im2col_and_col2im_are_the_plain_ops(cin, cout, k, s, p, bhw):
    """im2col of an NCHW-contiguous input (the transposed layout, read plane by plane) and of a
    channels-last one (the row layout) both equal ``ops.im2col``, exactly; so does col2im."""
    (kh, kw), st, pd = _pair(k), _pair(s), _pair(p)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((bhw[0], cin) + bhw[1:])
    want = ops.im2col(x, kh, kw, st, pd)
    nchw = windows.im2col(x, kh, kw, st, pd)
    last = windows.im2col(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
                          kh, kw, st, pd)
    np.testing.assert_array_equal(nchw, want)
    np.testing.assert_array_equal(last, want)
    assert nchw.T.flags.c_contiguous
    assert last.flags.c_contiguous or cin == 1      # one channel: both orders are one memory
    cols = rng.standard_normal(want.shape)
    np.testing.assert_array_equal(windows.col2im(cols, x.shape, kh, kw, st, pd),
                                  ops.col2im(cols, x.shape, kh, kw, st, pd))


@pytest.mark.parametrize("cin,cout,k,s,p,bhw", CONV_CASES)
def test_col2im_matmul_is_col2im_of_the_product(float64, cin, cout, k, s, p, bhw):
    """The CPU's input gradient without the (N, K) product equals col2im of the product
    (float64, to 1e-13: BLAS may round a product of a column slice differently)."""
    kh, kw = _pair(k)
    x_shape = (bhw[0], cin) + bhw[1:]
    oh = ops.out_size(x_shape[2], kh, _pair(s)[0], _pair(p)[0])
    ow = ops.out_size(x_shape[3], kw, _pair(s)[1], _pair(p)[1])
    rng = np.random.default_rng(15)
    dy2 = rng.standard_normal((bhw[0] * oh * ow, cout))
    w = rng.standard_normal((cout, kh * kw * cin))
    np.testing.assert_allclose(windows.col2im_matmul(dy2, w, x_shape, kh, kw, _pair(s), _pair(p)),
                               ops.col2im(dy2 @ w, x_shape, kh, kw, _pair(s), _pair(p)),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("k,s,p,shape", POOL_CASES)
def test_threaded_ops_equal_the_serial_ones(monkeypatch, k, s, p, shape):
    """Splitting the batch over threads changes nothing: every fast op, forward and backward."""
    kh, kw = _pair(k)
    st, pd = _pair(k if s is None else s), _pair(p)
    rng = np.random.default_rng(17)
    x = unique_values(rng, (7,) + shape[1:]) - 0.5          # 7 samples: uneven slices

    def run():
        y, argmax = windows.maxpool2d(x, kh, kw, st, pd)
        relu_out = np.maximum(x, 0)
        blocks = x.reshape(7, -1)[None].repeat(3, axis=0) * np.arange(1, 4)[:, None, None]
        cols = windows.im2col(x, kh, kw, st, pd)
        return [y, argmax, cols, windows.col2im(cols * 2, x.shape, kh, kw, st, pd),
                *windows.maxpool2d(x, kh, kw, st, pd, True),
                fused.relu_backward(x, relu_out), *windows.maxpool_blocks(blocks, True),
                windows.maxpool_blocks_backward(blocks[0], windows.maxpool_blocks(blocks)[1], 3)]
    monkeypatch.setattr(windows, "_PARALLEL_MIN", 1 << 60)
    serial = run()
    monkeypatch.setattr(windows, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(windows, "_THREADS", 3)
    for a, b in zip(run(), serial):
        np.testing.assert_array_equal(a, b)


def test_the_fused_loss_is_the_plain_loss():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((9, 5)) * 4
    targets = rng.integers(0, 5, 9)
    for smoothing in (0.0, 0.1):
        plain, fast = minicnn.CrossEntropyLoss(smoothing), fused.CrossEntropyLoss(smoothing)
        np.testing.assert_array_equal(fast(logits, targets), plain(logits, targets))
        np.testing.assert_array_equal(fast.backward(), plain.backward())
        with pytest.raises(ValueError, match=r"^CrossEntropyLoss: targets must be class indices "
                                             r"in \[0, 5\), got \[5\]$"):
            fast(logits, np.where(np.arange(9) == 3, 5, targets))
    assert repr(fused.CrossEntropyLoss(0.1)) == "CrossEntropyLoss(label_smoothing=0.1)"


# --- the fused modules, one by one -------------------------------------------------------------

@pytest.mark.parametrize("cin,cout,k,s,p,bhw", CONV_CASES)
def test_convolution_cut_short_for_a_pool(float64, cin, cout, k, s, p, bhw):
    """A FusedConv2d handed a pool it does not apply (an average pool) computes only the
    outputs the pool reads: they equal the full fused convolution's, to the bit, and backward
    gives the same dx and, within float64 rounding, the same parameter gradients as the full
    convolution with zeros where the pool does not read."""
    minicnn.seed(20)
    conv, pool, ref_pool = Conv2d(cin, cout, k, stride=s, padding=p), AvgPool2d(2), AvgPool2d(2)
    rng = np.random.default_rng(20)
    x = rng.standard_normal((bhw[0], cin) + bhw[1:])
    full_conv = FusedConv2d(conv)
    full = full_conv(x)
    if min(full.shape[2:]) < 2:
        pytest.skip("the convolution's output is smaller than the pool's window")
    h, w = reach(pool, full.shape[2:])
    cut = FusedConv2d(conv, pool=pool)
    y = cut(x)
    np.testing.assert_array_equal(y, ref_pool(full[:, :, :h, :w]))
    np.testing.assert_array_equal(y, ref_pool(full))
    dy = rng.standard_normal(y.shape)
    dx = cut.backward(dy)
    grads = [q.grad.copy() for q in conv.parameters()]
    conv.zero_grad()
    ref_pool(full_conv(x))
    np.testing.assert_allclose(dx, full_conv.backward(ref_pool.backward(dy)), rtol=1e-13,
                               atol=1e-13)
    for g, q in zip(grads, conv.parameters()):
        np.testing.assert_allclose(g, q.grad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("pool_size", [2, 3, (1, 2), (2, 1)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("cin,cout,k,s,p,bhw", CONV_CASES)
def test_convolution_applies_a_tiling_max_pool(float64, cin, cout, k, s, p, bhw, relu, pool_size):
    """``FusedConv2d(conv, relu, MaxPool2d(n))`` returns the pool's output of (the ReLU of) the
    convolution, to the bit, and its backward takes the pool's output gradient and gives the dx
    and parameter gradients of conv, ReLU and pool run one by one (float64, 1e-13: the gradient
    sums run over the rows in window order)."""
    minicnn.seed(22)
    conv, pool = Conv2d(cin, cout, k, stride=s, padding=p), MaxPool2d(pool_size)
    rng = np.random.default_rng(22)
    x = rng.standard_normal((bhw[0], cin) + bhw[1:])
    if min(conv.output_shape(x.shape)[2:]) < max(_pair(pool_size)):
        pytest.skip("the pool's window is larger than the convolution's output")
    assert tiles(pool)
    layer = FusedConv2d(conv, relu, pool)
    y = layer(x)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    grads = [q.grad.copy() for q in conv.parameters()]
    conv.zero_grad()
    act, alone = ReLU(), FusedConv2d(conv)
    h = act(alone(x)) if relu else alone(x)
    np.testing.assert_array_equal(y, pool(h))
    g = pool.backward(dy)
    ref_dx = alone.backward(act.backward(g) if relu else g)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-13, atol=1e-13)
    for a, b in zip(grads, conv.parameters()):
        np.testing.assert_allclose(a, b.grad, rtol=1e-13, atol=1e-13)


def test_pool_reach_is_the_part_of_the_input_its_windows_read():
    """``reach`` cuts an input to the rows and columns the windows read: pooling the cut input
    gives the same output, and the last row and column kept are read (every kernel and stride
    up to 4, every allowed padding, sizes up to 12)."""
    rng = np.random.default_rng(19)
    cut_somewhere = 0
    for k in range(1, 5):
        for s, p in ((s, p) for s in range(1, 5) for p in range(k // 2 + 1)):
            for n in range(max(1, k - 2 * p), 13):
                x = rng.standard_normal((1, 2, n, n + 1))
                for cls in (MaxPool2d, AvgPool2d):
                    pool = cls(k, stride=s, padding=p)
                    h, w = reach(pool, (n, n + 1))
                    assert (h, w) <= (n, n + 1)
                    np.testing.assert_array_equal(pool(x[:, :, :h, :w]), pool(x))
                    # the last row and column kept are read: a large value there shows
                    for at in (np.s_[:, :, h - 1, :w], np.s_[:, :, :h, w - 1]):
                        marked = x.copy()
                        marked[at] = 1e6
                        assert not np.array_equal(pool(marked), pool(x))
                    cut_somewhere += (h, w) != (n, n + 1)
    assert cut_somewhere > 100
    assert reach(MaxPool2d(2), (11, 11)) == (10, 10) and reach(MaxPool2d(2), (26, 26)) == (26, 26)


@pytest.mark.parametrize("pool", [MaxPool2d(4), AvgPool2d(4)])
def test_a_pool_too_large_for_the_convolution_names_itself(pool):
    """The fused convolution computes for its pool; a pool window larger than the
    convolution's output still raises the pool's ShapeError, as in the plain model."""
    x = np.ones((1, 1, 5, 5), dtype=np.float32)
    name = type(pool).__name__
    for model in (Sequential(Conv2d(1, 2, 3), pool), minicnn.fuse(Sequential(Conv2d(1, 2, 3),
                                                                             pool))):
        with pytest.raises(ShapeError, match=rf"{name}: input \(1, 2, 3, 3\) is smaller than the "
                                             r"kernel \(4, 4\)"):
            model(x)


@pytest.mark.parametrize("make,shape", [
    (lambda: FusedConv2d(Conv2d(2, 3, 3, padding=1), True, MaxPool2d(2)), (2, 2, 7, 6)),
    (lambda: FusedConv2d(Conv2d(2, 3, 2), True, AvgPool2d(2)), (2, 2, 7, 7)),
    (lambda: FusedConv2d(Conv2d(2, 3, 2, stride=2), False,
                         FusedMaxPool2d(MaxPool2d(3, stride=2, padding=1), relu=True)),
     (1, 2, 9, 8)),
    (lambda: FusedConv2d(Conv2d(2, 3, (3, 2), stride=(2, 1), padding=1, bias=False), True),
     (2, 2, 6, 5)),
    (lambda: FusedLinear(Linear(7, 4), relu=True), (3, 7)),
    (lambda: FusedMaxPool2d(MaxPool2d(2), relu=True), (2, 3, 6, 7)),
])
def test_fused_modules_gradcheck(make, shape, float64):
    x = unique_values(np.random.default_rng(8), shape) - 0.4
    gradcheck(make(), x)


# --- the kernels of the fused modules, through the emulator ------------------------------------

def _fused_example():
    return minicnn.fuse(mnist_cnn())


def _fused_convs_with_relus():
    return minicnn.fuse(convs_with_relus())


@pytest.mark.emulated
@pytest.mark.skipif(not emulator.available(), reason="no C++ compiler")
@pytest.mark.parametrize("make_model,kernels", [
    # both max pools are applied by the convolutions before them, in window order
    (_fused_example, {"im2col", "col2im", "maxpool_blocks_forward", "maxpool_blocks_backward",
                      "relu_backward", "softmax_cross_entropy", "adam_multi_tensor"}),
    # ReLUs in the bias passes; the overlapping max pool takes the ReLU after it
    (_fused_convs_with_relus, {"im2col", "col2im", "bias_relu_forward", "relu_backward",
                               "maxpool2d_forward", "maxpool2d_backward",
                               "softmax_cross_entropy", "adam_multi_tensor"}),
], ids=["example", "convs-with-relus"])
def test_fused_training_through_the_emulated_kernels(monkeypatch, make_model, kernels):
    """Every kernel the fused GPU step launches, except cuBLAS's products and CuPy's own
    elementwise work, runs emulated: the parameters after 3 steps equal the NumPy run's
    (float64, 1e-12), which equal the plain network's (1e-11)."""
    launched = set()
    emulated = _train(3, True, monkeypatch, launched, make_model, fused.CrossEntropyLoss)
    numpy = _train(3, False, monkeypatch, make_model=make_model, make_loss=fused.CrossEntropyLoss)
    plain_model = mnist_cnn if make_model is _fused_example else convs_with_relus
    plain = _train(3, False, monkeypatch, make_model=plain_model)
    for a, b, c in zip(emulated, numpy, plain):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        assert rel_err(b, c) <= 1e-11
    assert launched == kernels


@pytest.mark.emulated
@pytest.mark.skipif(not emulator.available(), reason="no C++ compiler")
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_loss_kernel_equals_the_plain_loss(monkeypatch, smoothing):
    from test_kernel_paths import _KernelNumpy
    rng = np.random.default_rng(9)
    logits, targets = rng.standard_normal((33, 10)) * 3, rng.integers(0, 10, 33)
    plain = minicnn.CrossEntropyLoss(smoothing)
    want = plain(logits, targets), plain.backward()
    monkeypatch.setattr(fused.ops, "get_array_module", lambda a: _KernelNumpy())
    monkeypatch.setattr(fused.ops.cuda, "launch", emulator.launch)
    fast = fused.CrossEntropyLoss(smoothing)
    got = fast._per_sample(logits, targets)
    assert rel_err(got[0].mean(), want[0]) <= 1e-13 and rel_err(got[1], want[1]) <= 1e-13


# --- what fuse returns ----------------------------------------------------------------------

FUSED_EXAMPLE = """\
Sequential(
  (0): FusedConv2d(1, 32, kernel_size=(3, 3), stride=(1, 1), padding=(0, 0), bias=True, relu=True, pool=MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0)))
  (3): FusedConv2d(32, 64, kernel_size=(3, 3), stride=(1, 1), padding=(0, 0), bias=True, relu=True, pool=MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0)))
  (6): Flatten(start_dim=1, end_dim=-1)
  (7): FusedLinear(in_features=1600, out_features=128, bias=True, relu=True)
  (9): Linear(in_features=128, out_features=10, bias=True)
)"""  # noqa: E501


def test_fuse_keeps_names_parameters_and_keys():
    model = mnist_cnn()
    layers = list(model)
    fast = minicnn.fuse(model)
    assert repr(fast) == FUSED_EXAMPLE
    assert [n for n, _ in fast.named_children()] == ["0", "3", "6", "7", "9"]
    assert list(fast.state_dict()) == list(model.state_dict())
    assert all(p is q for p, q in zip(fast.parameters(), model.parameters()))
    assert fast[0].weight is model[0].weight and fast[2] is model[6] and fast[4] is model[9]
    assert fast[0].pool is model[2]
    assert list(model) == layers and type(model[0]) is Conv2d          # the model is unchanged
    assert [n for n, _ in fast.named_modules()] == ["", "0", "0.pool", "3", "3.pool", "6", "7", "9"]
    assert fast.num_parameters() == model.num_parameters() == 225_034
    table = fast.summary((1, 1, 28, 28))
    assert "0 FusedConv2d" in table and "(1, 32, 13, 13)" in table and "225,034" in table
    assert minicnn.fuse(fast)[0] is fast[0]                # fusing again changes nothing


def test_fuse_rules_on_short_stacks():
    """Which module each run becomes, and the layers fuse leaves as they are."""
    bn, relu, relu_after, drop = BatchNorm2d(3), ReLU(), ReLU(), minicnn.Dropout(0.5)
    model = Sequential(Conv2d(2, 3, 3, padding=1), bn, relu, MaxPool2d(2),        # VGG's order
                       Conv2d(3, 3, 2), MaxPool2d(2), ReLU(),                      # ReLU after
                       Conv2d(3, 3, 1), ReLU(), AvgPool2d(2), relu_after,
                       Conv2d(3, 3, 1), ReLU(), MaxPool2d(3, stride=1, padding=1),
                       Flatten(), drop, Linear(3, 4), ReLU(), ReLU(), Linear(4, 2))
    fast = minicnn.fuse(model)
    kinds = [(name, type(m).__name__, getattr(m, "relu", None),
              type(getattr(m, "pool", None)).__name__) for name, m in fast.named_children()]
    assert kinds == [("0", "FusedConv2d", False, "NoneType"),
                     ("1", "BatchNorm2d", None, "NoneType"),
                     ("2", "FusedMaxPool2d", True, "NoneType"),
                     ("4", "FusedConv2d", True, "MaxPool2d"),
                     ("7", "FusedConv2d", True, "AvgPool2d"), ("10", "ReLU", None, "NoneType"),
                     ("11", "FusedConv2d", False, "FusedMaxPool2d"),
                     ("14", "Flatten", None, "NoneType"), ("15", "Dropout", None, "NoneType"),
                     ("16", "FusedLinear", True, "NoneType"), ("18", "ReLU", None, "NoneType"),
                     ("19", "Linear", None, "NoneType")]
    assert fast[1] is bn and fast[5] is relu_after and fast[8] is drop
    assert fast[6].pool.relu is True and not tiles(model[13])
    x = np.random.default_rng(10).standard_normal((2, 2, 12, 12)).astype(np.float32)
    fast.eval()
    model.eval()
    np.testing.assert_allclose(fast(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="fuse: expected a minicnn Module, got list"):
        minicnn.fuse([Conv2d(1, 1, 1)])


def test_an_optimizer_made_before_fusing_trains_the_fused_model():
    model = mnist_cnn()
    opt = minicnn.Adam(model.parameters(), lr=1e-3)
    fast = minicnn.fuse(model)
    data = minicnn.mnist_sample(train=False)
    x, y = data[:16]
    before = [p.data.copy() for p in fast.parameters()]
    history = minicnn.fit(fast, fused.CrossEntropyLoss(), opt,
                          minicnn.DataLoader(minicnn.ArrayDataset(x, y), batch_size=8),
                          progress=False, verbose=False)
    assert opt.step_count == 2 and np.isfinite(history.epochs[0]["train_loss"])
    for p, b, q in zip(fast.parameters(), before, model.parameters()):
        assert not np.array_equal(p.data, b) and p is q


def test_checkpoints_load_either_way(tmp_path):
    minicnn.seed(1)
    plain = mnist_cnn()
    minicnn.save(plain, tmp_path / "plain.npz")
    minicnn.seed(2)
    fast = minicnn.fuse(mnist_cnn())
    minicnn.load(fast, tmp_path / "plain.npz")
    for (k, a), (j, b) in zip(fast.state_dict().items(), plain.state_dict().items()):
        assert k == j
        np.testing.assert_array_equal(a, b)
    minicnn.seed(3)
    vgg = minicnn.fuse(vgg11(num_classes=4))                # buffers too (BatchNorm)
    for _, m in vgg.named_modules():
        if isinstance(m, BatchNorm2d):
            m.running_mean[...] = 0.25
    minicnn.save(vgg, tmp_path / "fused.npz")
    again = vgg11(num_classes=4)
    minicnn.load(again, tmp_path / "fused.npz")
    for (k, a), (j, b) in zip(again.state_dict().items(), vgg.state_dict().items()):
        assert k == j
        np.testing.assert_array_equal(a, b)


def test_modes_and_devices_reach_every_module():
    fast = minicnn.fuse(mnist_cnn())
    fast.eval()
    assert not any(m.training for _, m in fast.named_modules())
    fast(np.zeros((2, 1, 28, 28), np.float32))
    assert all(m._cache is None for _, m in fast.named_modules())
    fast.train()
    assert all(m.training for _, m in fast.named_modules())
    assert fast.to("cpu") is fast and fast.device == "cpu"


def test_sequential_subclasses_keep_their_class():
    model = vgg11(num_classes=3, batch_norm=False)
    fast = minicnn.fuse(model)
    assert type(fast) is type(model) and fast is not model and fast.features is not model.features
    assert fast.classifier is model.classifier and fast.avgpool is model.avgpool
    assert [type(m).__name__ for m in fast.features][:3] == ["FusedConv2d", "FusedConv2d",
                                                             "FusedConv2d"]
    assert list(fast.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("layers,fused_as", [
    # the pool tiles the conv's 6x6 output: the conv applies it, with the ReLU
    (lambda: [Conv2d(2, 3, 3), ReLU(), MaxPool2d(2)], ["conv relu MaxPool2d"]),
    (lambda: [Conv2d(2, 3, 3), ReLU(), Conv2d(3, 2, 3, bias=False), ReLU(), Flatten()],
     ["conv relu", "conv relu", "Flatten"]),
    (lambda: [Flatten(), Linear(128, 3), ReLU(), ReLU(), Linear(3, 2, bias=False), ReLU()],
     ["Flatten", "linear relu", "ReLU", "linear relu"]),   # a second ReLU in a row stays
    # an overlapping max pool takes the ReLU; the 2x2 one after it is not after a conv
    (lambda: [Conv2d(2, 3, 3, padding=1), ReLU(), MaxPool2d(3, stride=1, padding=1),
              MaxPool2d(2), Flatten(), Linear(48, 5), ReLU(), Linear(5, 4)],
     ["conv FusedMaxPool2d relu", "maxpool", "Flatten", "linear relu", "Linear"]),
    (lambda: [Conv2d(2, 3, 3), AvgPool2d(2), ReLU(), Flatten()],
     ["conv AvgPool2d", "ReLU", "Flatten"]),
    # 8x8 -> 7x7, of which a 2x2 average pool reads 6x6 (the ReLU in the bias pass); then
    # 3x3 -> 2x2, which the max pool reads whole and the conv applies
    (lambda: [Conv2d(2, 3, 2), ReLU(), AvgPool2d(2), Conv2d(3, 4, 2), ReLU(), MaxPool2d(2)],
     ["conv relu AvgPool2d", "conv relu MaxPool2d"]),
    # a padded pool: 2x2 windows with stride 3 and padding 1 over 8x8 read 7x7
    (lambda: [Conv2d(2, 3, 1), ReLU(), MaxPool2d(2, stride=3, padding=1)],
     ["conv FusedMaxPool2d relu"]),
    # the conv applies a 2x2 pool over the 6x6 of its 7x7 output it reads, and the ReLU after
    # it; then 3x3 -> 3x3 -> a pool with stride (2, 3) that does not tile, which takes the
    # first of the two ReLUs before it
    (lambda: [Conv2d(2, 3, 2), MaxPool2d(2), ReLU(), Conv2d(3, 2, 1), ReLU(), ReLU(),
              MaxPool2d(3, stride=(2, 3)), Flatten()],
     ["conv relu MaxPool2d", "conv relu", "maxpool relu", "Flatten"]),
])
def test_fuse_on_short_stacks_of_each_run(layers, fused_as, float64):
    """What each run becomes, and the fused model's outputs and gradients against the plain
    one's (float64, 1e-13 and 1e-12), including windows whose values are all negative (no
    gradient in either order) and overlapping windows."""
    minicnn.seed(4)
    model = Sequential(*layers())
    fast = minicnn.fuse(model)

    def describe(m):
        if type(m) is FusedConv2d:
            pool = m.pool
            return " ".join(["conv"] + ["relu"] * m.relu + ([] if pool is None else
                                                              [type(pool).__name__] +
                                                              ["relu"] * getattr(pool, "relu", 0)))
        if type(m) in (FusedLinear, FusedMaxPool2d):
            return ("linear" if type(m) is FusedLinear else "maxpool") + " relu" * m.relu
        return type(m).__name__
    assert [describe(m) for m in fast] == fused_as
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 8, 8)) - 0.3            # many windows wholly negative
    dy = rng.standard_normal(model.output_shape(x.shape))
    (y0, dx0, g0), (y1, dx1, g1) = _run(model, x, dy), _run(fast, x, dy)
    assert rel_err(y1, y0) <= 1e-13 and rel_err(dx1, dx0) <= 1e-13
    for k in g0:
        assert rel_err(np.concatenate([g.ravel() for g in g1[k]]),
                       np.concatenate([g.ravel() for g in g0[k]])) <= 1e-12
