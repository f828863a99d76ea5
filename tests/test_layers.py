"""Every layer's backward against finite differences (float64), and its forward against the
definition PyTorch documents (reference loops in float64 here; PyTorch itself when installed)."""
import numpy as np
import pytest

import minicnn
from minicnn import AvgPool2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, ShapeError
from minicnn.testing import gradcheck

from conftest import unique_values

CONV_CASES = [  # in, out, kernel, stride, padding, (B, H, W)
    (1, 2, 3, 1, 0, (2, 5, 5)),
    (2, 3, 3, 2, 1, (1, 7, 6)),          # batch 1, odd sizes
    (3, 2, (2, 3), 3, 2, (2, 8, 7)),     # non-square kernel, stride 3, padding 2
    (2, 2, (3, 1), (1, 2), (2, 0), (1, 6, 5)),
    (1, 1, 1, 1, 0, (3, 4, 4)),
]
POOL_CASES = [  # kernel, stride, padding, (B, C, H, W)
    (2, None, 0, (2, 3, 6, 6)),
    (3, 2, 1, (1, 2, 7, 5)),             # overlapping windows, padding, odd sizes
    ((2, 3), 1, (1, 1), (2, 2, 5, 6)),   # non-square, stride 1
    (2, 3, 0, (1, 2, 8, 7)),             # stride larger than kernel: gaps
    (3, None, 1, (2, 1, 7, 7)),
]


def conv_reference(x, w, b, stride, pad):
    """Direct convolution by loops, float64: the definition."""
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    OH = (H + 2 * pad[0] - kh) // stride[0] + 1
    OW = (W + 2 * pad[1] - kw) // stride[1] + 1
    y = np.zeros((B, O, OH, OW))
    for i in range(OH):
        for j in range(OW):
            patch = xp[:, :, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw]
            y[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return y


def pool_reference(x, k, s, p, reduce):
    """Pooling by loops over windows; max ignores padding, mean divides by the full window."""
    B, C, H, W = x.shape
    OH, OW = (H + 2 * p[0] - k[0]) // s[0] + 1, (W + 2 * p[1] - k[1]) // s[1] + 1
    fill = -np.inf if reduce == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (p[0],) * 2, (p[1],) * 2), constant_values=fill)
    y = np.zeros((B, C, OH, OW))
    for i in range(OH):
        for j in range(OW):
            win = xp[:, :, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]]
            y[:, :, i, j] = win.max(axis=(2, 3)) if reduce == "max" else win.mean(axis=(2, 3))
    return y


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("cin,cout,k,s,p,bhw", CONV_CASES)
def test_conv2d_gradcheck_and_forward(float64, cin, cout, k, s, p, bhw):
    rng = np.random.default_rng(1)
    conv = Conv2d(cin, cout, k, s, p)
    x = rng.standard_normal((bhw[0], cin) + bhw[1:])
    ref = conv_reference(x, conv.weight.data, conv.bias.data, _pair(s), _pair(p))
    np.testing.assert_allclose(conv(x), ref, rtol=1e-12, atol=1e-12)
    gradcheck(conv, x)


def test_conv2d_without_bias_gradcheck(float64):
    conv = Conv2d(2, 3, 2, bias=False)
    assert [n for n, _ in conv.named_parameters()] == ["weight"]
    gradcheck(conv, np.random.default_rng(2).standard_normal((2, 2, 4, 5)))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradcheck_and_forward(float64, bias):
    rng = np.random.default_rng(3)
    lin = Linear(7, 4, bias=bias)
    x = rng.standard_normal((3, 7))
    ref = x @ lin.weight.data.T + (lin.bias.data if bias else 0)
    np.testing.assert_allclose(lin(x), ref, rtol=1e-12)
    gradcheck(lin, x)
    gradcheck(lin, x[:1])


@pytest.mark.parametrize("k,s,p,shape", POOL_CASES)
@pytest.mark.parametrize("cls,reduce", [(MaxPool2d, "max"), (AvgPool2d, "mean")])
def test_pool_gradcheck_and_forward(float64, cls, reduce, k, s, p, shape):
    x = unique_values(np.random.default_rng(4), shape) - 0.5
    pool = cls(k, s, p)
    ref = pool_reference(x, _pair(k), _pair(k if s is None else s), _pair(p), reduce)
    np.testing.assert_allclose(pool(x), ref, rtol=1e-12, atol=1e-15)
    gradcheck(pool, x)


def test_maxpool_first_maximum_wins_ties():
    x = np.array([[[[1.0, 3.0, 3.0, 0.5],
                    [3.0, 2.0, 0.5, 0.5]]]])
    pool = MaxPool2d(2)
    np.testing.assert_array_equal(pool(x), [[[[3.0, 3.0]]]])
    dx = pool.backward(np.array([[[[10.0, 20.0]]]]))
    np.testing.assert_array_equal(dx, [[[[0, 10, 20, 0], [0, 0, 0, 0]]]])


def test_maxpool_padding_never_wins():
    x = -1 - unique_values(np.random.default_rng(5), (1, 2, 4, 4))   # all values below zero
    pool = MaxPool2d(3, stride=2, padding=1)
    y = pool(x)
    assert (y < -1).all()
    np.testing.assert_allclose(y, pool_reference(x, (3, 3), (2, 2), (1, 1), "max"), rtol=0)


def test_avgpool_counts_padding_as_zeros():
    x = np.full((1, 1, 2, 2), 4.0)
    np.testing.assert_array_equal(AvgPool2d(2, stride=1, padding=1)(x),
                                  [[[[1, 2, 1], [2, 4, 2], [1, 2, 1]]]])


def test_relu_and_flatten_gradcheck(float64):
    x = unique_values(np.random.default_rng(6), (2, 3, 4, 5)) - 0.5
    gradcheck(ReLU(), x)
    gradcheck(Flatten(), x)
    assert Flatten()(x).shape == (2, 60)
    assert Flatten(start_dim=2)(x).shape == (2, 3, 20)


def test_dropout_gradcheck_scaling_and_eval(float64):
    x = np.random.default_rng(7).standard_normal((4, 50)) + 3
    d = Dropout(0.3)
    gradcheck(d, x)
    y = d(x)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.7, rtol=1e-12)
    big = Dropout(0.3)(np.ones((200, 500)))
    assert abs((big == 0).mean() - 0.3) < 0.01            # 100,000 draws: sd of the rate ~0.0015
    d.eval()
    np.testing.assert_array_equal(d(x), x)
    np.testing.assert_array_equal(Dropout(1.0)(x), np.zeros_like(x))


def test_dropout_masks_follow_the_seed():
    x = np.ones((3, 40), dtype=np.float32)
    minicnn.seed(11)
    a = Dropout(0.5)(x)
    minicnn.seed(11)
    b = Dropout(0.5)(x)
    np.testing.assert_array_equal(a, b)


def test_default_init_matches_pytorch_bounds():
    minicnn.seed(8)
    conv, lin = Conv2d(32, 64, 3), Linear(1600, 128)
    for layer, fan_in in ((conv, 32 * 9), (lin, 1600)):
        bound = 1 / np.sqrt(fan_in)
        for p in (layer.weight, layer.bias):
            assert p.dtype == np.float32
            assert np.abs(p.data).max() <= bound
            assert np.abs(p.data).max() > 0.95 * bound        # uniform fills the whole range
            assert abs(p.data.std() - bound / np.sqrt(3)) < 0.1 * bound


def test_layers_compute_in_their_parameters_dtype():
    conv = Conv2d(1, 2, 3)
    y = conv(np.random.default_rng(9).standard_normal((1, 1, 5, 5)))   # float64 input
    assert y.dtype == np.float32


def test_eval_mode_caches_nothing():
    model = minicnn.Sequential(Conv2d(1, 2, 3), ReLU(), MaxPool2d(2), Flatten(), Linear(2, 3))
    model.eval()
    model(np.random.default_rng(10).standard_normal((2, 1, 4, 4)).astype(np.float32))
    assert all(m._cache is None for _, m in model.named_modules())
    with pytest.raises(RuntimeError, match="without a training-mode forward"):
        model.backward(np.ones((2, 3), dtype=np.float32))


@pytest.mark.parametrize("layer,x,match", [
    (Conv2d(3, 4, 3), np.ones((2, 1, 8, 8)), r"expected 3 input channels .* got shape \(2, 1, 8, 8\)"),
    (Conv2d(3, 4, 3), np.ones((3, 8, 8)), r"Conv2d: expected a 4-D input .* got shape \(3, 8, 8\)"),
    (Conv2d(1, 4, 5), np.ones((1, 1, 3, 3)), r"Conv2d: input \(1, 1, 3, 3\) is smaller than the kernel"),
    (Linear(10, 2), np.ones((4, 9)), r"Linear: expected input shape \(B, 10\), got \(4, 9\)"),
    (Linear(10, 2), np.ones((4, 2, 5)), r"Linear: expected a 2-D input"),
    (MaxPool2d(2), np.ones((4, 4)), r"MaxPool2d: expected a 4-D input"),
    (AvgPool2d(3), np.ones((1, 1, 2, 2)), r"AvgPool2d: input \(1, 1, 2, 2\) is smaller"),
])
def test_wrong_shapes_name_the_layer(layer, x, match):
    with pytest.raises(ShapeError, match=match):
        layer(x)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kernel_size"):
        Conv2d(1, 2, 0)
    with pytest.raises(ValueError, match="out_channels"):
        Conv2d(1, -2, 3)
    with pytest.raises(ValueError, match="padding"):
        MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="Dropout: p"):
        Dropout(1.5)
    with pytest.raises(TypeError, match="floating-point"):
        Linear(2, 2)(np.ones((1, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="expected an array"):
        Linear(2, 2)([[1.0, 2.0]])


def test_maxpool_backward_with_gradients_in_another_memory_order(float64):
    """dy in NCHW order while the pooled input (and so argmax) is channels-last."""
    rng = np.random.default_rng(16)
    x = np.ascontiguousarray(unique_values(rng, (2, 6, 6, 3))).transpose(0, 3, 1, 2)
    pool = MaxPool2d(2)
    y = pool(x)
    dy = rng.standard_normal(y.shape)
    dx = pool.backward(dy)
    ref = np.zeros_like(x)
    for b, c, i, j in np.ndindex(y.shape):
        win = x[b, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        a, bb = np.unravel_index(np.argmax(win), win.shape)
        ref[b, c, 2 * i + a, 2 * j + bb] += dy[b, c, i, j]
    np.testing.assert_array_equal(dx, ref)


@pytest.mark.parametrize("cin,cout,k,s,p,bhw", CONV_CASES)
def test_im2col_in_either_memory_layout(cin, cout, k, s, p, bhw):
    """im2col of an NCHW-contiguous input and of a channels-last one both equal a loop over
    windows (float64, exact); col2im is its adjoint: <im2col(x), G> = <x, col2im(G)>."""
    from minicnn import ops
    (kh, kw), (sh, sw), (ph, pw) = _pair(k), _pair(s), _pair(p)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((bhw[0], cin) + bhw[1:])
    B, C, H, W = x.shape
    OH, OW = ops.out_size(H, kh, sh, ph), ops.out_size(W, kw, sw, pw)
    ref = np.zeros((B, OH, OW, kh, kw, C))
    for b, oh, ow, i, j in np.ndindex(B, OH, OW, kh, kw):
        h, w = oh * sh - ph + i, ow * sw - pw + j
        if 0 <= h < H and 0 <= w < W:
            ref[b, oh, ow, i, j] = x[b, :, h, w]
    ref = ref.reshape(B * OH * OW, -1)
    nchw = ops.im2col(x, kh, kw, (sh, sw), (ph, pw))
    last = ops.im2col(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
                      kh, kw, (sh, sw), (ph, pw))
    np.testing.assert_array_equal(nchw, ref)
    np.testing.assert_array_equal(last, ref)
    G = rng.standard_normal(ref.shape)
    np.testing.assert_allclose(np.sum(nchw * G), np.sum(x * ops.col2im(G, x.shape, kh, kw,
                                                                        (sh, sw), (ph, pw))),
                               rtol=1e-12)
