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


@pytest.mark.parametrize("cin,cout,k,s,p,bhw", CONV_CASES)
def test_col2im_matmul_is_col2im_of_the_product(float64, cin, cout, k, s, p, bhw):
    """The CPU's fused input gradient equals col2im of the product (float64, to 1e-13: BLAS may
    round a product of a column slice differently from the full product)."""
    from minicnn import ops
    kh, kw = _pair(k)
    x_shape = (bhw[0], cin) + bhw[1:]
    oh = ops.out_size(x_shape[2], kh, _pair(s)[0], _pair(p)[0])
    ow = ops.out_size(x_shape[3], kw, _pair(s)[1], _pair(p)[1])
    rng = np.random.default_rng(15)
    dy2 = rng.standard_normal((bhw[0] * oh * ow, cout))
    w = rng.standard_normal((cout, kh * kw * cin))
    np.testing.assert_allclose(ops.col2im_matmul(dy2, w, x_shape, kh, kw, _pair(s), _pair(p)),
                               ops.col2im(dy2 @ w, x_shape, kh, kw, _pair(s), _pair(p)),
                               rtol=1e-13, atol=1e-13)


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


@pytest.mark.parametrize("k,s,p,shape", POOL_CASES)
def test_threaded_ops_equal_the_serial_ones(monkeypatch, k, s, p, shape):
    """Splitting the batch over threads changes nothing: every op, forward and backward."""
    from minicnn import ops
    kh, kw = _pair(k)
    st, pd = _pair(k if s is None else s), _pair(p)
    rng = np.random.default_rng(17)
    x = unique_values(rng, (7,) + shape[1:]) - 0.5          # 7 samples: uneven slices

    def run():
        y, argmax = ops.maxpool2d(x, kh, kw, st, pd)
        dy = np.random.default_rng(18).standard_normal(y.shape)
        r, mask = ops.relu(x)
        return [y, argmax, ops.maxpool2d_backward(dy, argmax, x.shape, kh, kw, st, pd),
                ops.avgpool2d_backward(dy, x.shape, kh, kw, st, pd), ops.im2col(x, kh, kw, st, pd),
                r, mask, ops.relu_backward(x, mask), *ops.maxpool2d(x, kh, kw, st, pd, relu=True)]
    monkeypatch.setattr(ops, "_PARALLEL_MIN", 1 << 60)
    serial = run()
    monkeypatch.setattr(ops, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(ops, "_THREADS", 3)
    for a, b in zip(run(), serial):
        np.testing.assert_array_equal(a, b)


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
                    h, w = pool.reach((n, n + 1))
                    assert (h, w) <= (n, n + 1)
                    np.testing.assert_array_equal(pool(x[:, :, :h, :w]), pool(x))
                    # the last row and column kept are read: a large value there shows
                    for at in (np.s_[:, :, h - 1, :w], np.s_[:, :, :h, w - 1]):
                        marked = x.copy()
                        marked[at] = 1e6
                        assert not np.array_equal(pool(marked), pool(x))
                    cut_somewhere += (h, w) != (n, n + 1)
    assert cut_somewhere > 100


@pytest.mark.parametrize("cin,cout,k,s,p,bhw", CONV_CASES)
def test_convolution_cut_short_for_a_pool(float64, cin, cout, k, s, p, bhw):
    """``Conv2d.forward(x, pool=...)`` with a pool it does not apply (an average pool) computes
    the leading outputs the pool reads: they equal the
    full output's (to the bit), and backward gives the same dx and, within float64 rounding, the
    same parameter gradients as the full convolution with zeros where the pool does not read."""
    minicnn.seed(20)
    conv = Conv2d(cin, cout, k, stride=s, padding=p)
    rng = np.random.default_rng(20)
    x = rng.standard_normal((bhw[0], cin) + bhw[1:])
    full = conv(x)
    pool = AvgPool2d(2)
    h, w = pool.reach(full.shape[2:])
    y = conv.forward(x, pool=pool)
    assert y.shape == full.shape[:2] + (h, w)
    np.testing.assert_array_equal(y, full[:, :, :h, :w])
    dy = rng.standard_normal(y.shape)
    dx = conv.backward(dy)
    grads = [p.grad.copy() for p in conv.parameters()]
    conv.zero_grad()
    conv(x)
    dy_full = np.zeros(full.shape)
    dy_full[:, :, :h, :w] = dy
    np.testing.assert_allclose(dx, conv.backward(dy_full), rtol=1e-13, atol=1e-13)
    for g, p in zip(grads, conv.parameters()):
        np.testing.assert_allclose(g, p.grad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("cin,cout,k,s,p,bhw", CONV_CASES)
def test_im2col_in_either_memory_layout(cin, cout, k, s, p, bhw):
    """im2col of an NCHW-contiguous input (transposed layout, read plane by plane) and of a
    channels-last one (row layout) both equal a loop over windows (float64, exact)."""
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
    assert nchw.T.flags.c_contiguous
    assert last.flags.c_contiguous or cin == 1      # one channel: both orders are one memory


@pytest.mark.parametrize("pool_size", [2, 3, (1, 2), (2, 1)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("cin,cout,k,s,p,bhw", CONV_CASES)
def test_convolution_applies_a_tiling_max_pool(float64, cin, cout, k, s, p, bhw, relu, pool_size):
    """``Conv2d.forward(x, relu, pool=MaxPool2d(n))`` returns the pool's output of (the ReLU of)
    the convolution, to the bit, and its backward takes the pool's output gradient and gives the
    dx and parameter gradients of conv, ReLU and pool run one by one (float64, 1e-13: the
    gradient sums run over the rows in window order)."""
    minicnn.seed(22)
    conv, pool = Conv2d(cin, cout, k, stride=s, padding=p), MaxPool2d(pool_size)
    rng = np.random.default_rng(22)
    x = rng.standard_normal((bhw[0], cin) + bhw[1:])
    if min(pool.output_shape(conv.output_shape(x.shape))[2:]) < 1:
        pytest.skip("the pool's window is larger than the convolution's output")
    assert minicnn.layers.pooled_by_conv(pool)
    y = conv.forward(x, relu=relu, pool=pool)
    dy = rng.standard_normal(y.shape)
    dx = conv.backward(dy)
    grads = [p.grad.copy() for p in conv.parameters()]
    conv.zero_grad()
    act = ReLU()
    h = act(conv(x)) if relu else conv(x)
    ref = pool(h)
    np.testing.assert_array_equal(y, ref)
    g = pool.backward(dy)
    ref_dx = conv.backward(act.backward(g) if relu else g)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-13, atol=1e-13)
    for a, b in zip(grads, conv.parameters()):
        np.testing.assert_allclose(a, b.grad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("pool", [MaxPool2d(4), AvgPool2d(4)])
def test_a_pool_too_large_for_the_convolution_names_itself(pool):
    """Inside a Sequential the convolution computes for its pool; a pool window larger than the
    convolution's output still raises the pool's ShapeError, as without the plan."""
    model = minicnn.Sequential(Conv2d(1, 2, 3), pool)
    x = np.ones((1, 1, 5, 5), dtype=np.float32)
    name = type(pool).__name__
    with pytest.raises(ShapeError, match=rf"{name}: input \(1, 2, 3, 3\) is smaller than the "
                                         r"kernel \(4, 4\)"):
        model(x)
