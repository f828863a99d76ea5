"""The CUDA paths of minicnn/ops.py and minicnn/fused/windows.py, run through the kernel
emulator: what a GPU would execute, minus cuBLAS and CuPy, checked on a machine without one.

Each ``*_kernel`` function (allocation, geometry, argument order, int32 argmax) is compared with
its NumPy op, and then the plain example network trains with every call of a kernel of kernels/
(im2col, col2im, max pooling) routed through the emulator and is compared with the NumPy run:
float64, 1e-12. tests/test_fusion.py does the same for the fused network.
"""
import numpy as np
import pytest

import minicnn
from minicnn import fused, losses, ops
from minicnn.fused import windows
from minicnn.models import mnist_cnn
from minicnn.testing import emulator

from conftest import unique_values

pytestmark = [pytest.mark.emulated,
              pytest.mark.skipif(not emulator.available(),
                                 reason=f"no C++ compiler: {emulator.unavailable_reason()}")]

CASES = [  # (B, C, H, W), kernel, stride, pad
    ((2, 3, 9, 8), (3, 3), (1, 1), (0, 0)),
    ((1, 2, 7, 11), (2, 3), (2, 1), (1, 1)),
    ((3, 1, 10, 10), (3, 2), (3, 2), (1, 0)),
]


@pytest.mark.parametrize("shape,k,s,p", CASES)
def test_kernel_paths_match_the_numpy_ops(shape, k, s, p):
    rng = np.random.default_rng(0)
    x = unique_values(rng, shape) - 0.5
    launch = emulator.launch
    cols = ops.im2col(x, *k, s, p)
    np.testing.assert_array_equal(ops.im2col_kernel(x, *k, s, p, launch=launch), cols)
    dcols = rng.standard_normal(cols.shape)
    np.testing.assert_array_equal(ops.col2im_kernel(dcols, shape, *k, s, p, launch=launch),
                                  ops.col2im(dcols, shape, *k, s, p))
    y, argmax = ops.maxpool2d(x, *k, s, p)
    y_k, argmax_k = ops.maxpool2d_kernel(x, *k, s, p, launch=launch)
    assert argmax_k.dtype == np.int32
    np.testing.assert_array_equal(y_k, y)
    np.testing.assert_array_equal(argmax_k, argmax)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_array_equal(
        ops.maxpool2d_backward_kernel(dy, argmax, shape, *k, s, p, launch=launch),
        ops.maxpool2d_backward(dy, argmax, shape, *k, s, p))
    np.testing.assert_allclose(ops.avgpool2d_kernel(x, *k, s, p, launch=launch),
                               ops.avgpool2d(x, *k, s, p), rtol=1e-12)
    np.testing.assert_array_equal(ops.avgpool2d_backward_kernel(dy, shape, *k, s, p, launch=launch),
                                  ops.avgpool2d_backward(dy, shape, *k, s, p))


@pytest.mark.parametrize("shape,k,s,p", CASES)
def test_window_kernels_for_the_leading_windows_only(shape, k, s, p):
    """The fast path's im2col and col2im over the leading windows only (a convolution cut short
    for a pool): the kernels equal the NumPy ops, which equal the plain ops' leading rows (im2col)
    and the plain col2im of the full columns with zeros for the windows left out."""
    rng = np.random.default_rng(1)
    x = unique_values(rng, shape) - 0.5
    full = ops.im2col(x, *k, s, p)
    OH, OW = ops.out_size(shape[2], k[0], s[0], p[0]), ops.out_size(shape[3], k[1], s[1], p[1])
    for used in ((OH - 1, OW), (OH, OW - 1), (1, 1)):
        cols = windows.im2col(x, *k, s, p, used)
        np.testing.assert_array_equal(
            cols, full.reshape(shape[0], OH, OW, -1)[:, :used[0], :used[1]].reshape(cols.shape))
        np.testing.assert_array_equal(
            windows.im2col_kernel(x, *k, s, p, used, launch=emulator.launch), cols)
        dcols = rng.standard_normal(cols.shape)
        padded = np.zeros((shape[0], OH, OW, full.shape[1]))
        padded[:, :used[0], :used[1]] = dcols.reshape(shape[0], *used, -1)
        dx = windows.col2im(dcols, shape, *k, s, p, used)
        np.testing.assert_array_equal(dx, ops.col2im(padded.reshape(full.shape), shape, *k, s, p))
        np.testing.assert_array_equal(
            windows.col2im_kernel(dcols, shape, *k, s, p, used, launch=emulator.launch), dx)
    with pytest.raises(ValueError, match=r"used windows \(%d, 1\) must lie within the output "
                                         r"size" % (OH + 1)):
        windows.im2col(x, *k, s, p, (OH + 1, 1))


@pytest.mark.parametrize("shape,k,s,p", CASES)
def test_im2col_rows_in_blocks_are_the_rows_window_by_window(shape, k, s, p):
    """im2col's block order (th, tw) holds the plain order's rows, offset (p, q) of every
    th x tw window in one block, also for the leading windows only; the kernel agrees."""
    rng = np.random.default_rng(2)
    x = unique_values(rng, shape) - 0.5
    OH, OW = ops.out_size(shape[2], k[0], s[0], p[0]), ops.out_size(shape[3], k[1], s[1], p[1])
    for th, tw in ((2, 2), (2, 1), (1, 3)):
        used = (OH - OH % th, OW - OW % tw)
        if min(used) == 0:
            continue
        plain = windows.im2col(x, *k, s, p, used)
        cols = windows.im2col(x, *k, s, p, used, (th, tw))
        back = cols.reshape(th, tw, shape[0], used[0] // th, used[1] // tw, -1)
        np.testing.assert_array_equal(back.transpose(2, 3, 0, 4, 1, 5).reshape(plain.shape), plain)
        np.testing.assert_array_equal(
            windows.im2col_kernel(x, *k, s, p, used, (th, tw), launch=emulator.launch), cols)
    with pytest.raises(ValueError, match=r"blocks \(2, 2\) must divide the output size"):
        windows.im2col(x, *k, s, p, (1, OW), (2, 2))


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_pooling_kernels_read_other_layouts(layout):
    """A convolution's output is an NCHW view of a channels-last buffer: the forward pooling
    kernels read it where it lies; any other layout is copied first. Same results either way."""
    rng = np.random.default_rng(3)
    base = unique_values(rng, (2, 7, 9, 3)) - 0.5                      # B, H, W, C
    x = base.transpose(0, 3, 1, 2)                                     # NCHW view, channels-last
    if layout == "strided":
        x = np.concatenate([x, x], axis=3)[:, :, :, ::2]              # neither layout contiguous
    assert not x.flags.c_contiguous
    y, argmax = ops.maxpool2d_kernel(x, 2, 3, (2, 1), (1, 1), launch=emulator.launch)
    want_y, want_argmax = ops.maxpool2d(np.ascontiguousarray(x), 2, 3, (2, 1), (1, 1))
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(argmax, want_argmax)
    for relu in (False, True):          # the fast path's max pool, with a ReLU folded in
        y, argmax = windows.maxpool2d_kernel(x, 2, 3, (2, 1), (1, 1), relu, launch=emulator.launch)
        want_y, want_argmax = windows.maxpool2d(np.ascontiguousarray(x), 2, 3, (2, 1), (1, 1),
                                                relu)
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(argmax, want_argmax)
    np.testing.assert_allclose(ops.avgpool2d_kernel(x, 3, 2, (1, 2), (1, 0), launch=emulator.launch),
                               ops.avgpool2d(np.ascontiguousarray(x), 3, 2, (1, 2), (1, 0)),
                               rtol=1e-12)


class _KernelNumpy:
    """NumPy under another name: ops then takes its CUDA branch, and allocates with NumPy."""

    def __getattr__(self, name):
        return getattr(np, name)


def _train(steps, through_kernels, monkeypatch, launched=None, make_model=mnist_cnn,
           make_loss=minicnn.CrossEntropyLoss):
    """The parameters after ``steps`` steps of ``make_model()`` (float64, FusedAdam), every op of
    minicnn on its kernel path with the kernels run by the emulator when ``through_kernels``
    (the names launched go into ``launched``), else the NumPy run."""
    def launch(file, name, *args):
        launched.add(name)
        emulator.launch(file, name, *args)
    kernel_numpy = _KernelNumpy()                 # one module, as cupy is
    with monkeypatch.context() as m:
        if through_kernels:
            for module in (ops, windows, fused.ops, fused.adam, losses):
                m.setattr(module, "get_array_module", lambda a: kernel_numpy)
            m.setattr(ops.cuda, "launch", launch)
        minicnn.set_default_dtype(np.float64)
        minicnn.seed(1)
        model = make_model()
        opt = fused.FusedAdam(model.parameters(), lr=1e-3)     # on the CPU: optim.Adam's update
        loss_fn = make_loss()
        data = minicnn.mnist_sample(train=False)
        for step in range(steps):
            x, y = data[np.arange(step * 8, step * 8 + 8)]
            loss_fn(model(x), y)
            opt.zero_grad()
            model.backward(loss_fn.backward())
            opt.step()
        return [p.data.copy() for p in model.parameters()]


def convs_with_relus():
    """Convolutions followed by ReLUs, and an overlapping max pool followed by a ReLU."""
    from minicnn import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
    return Sequential(Conv2d(1, 4, 3), ReLU(), Conv2d(4, 3, 3, stride=2, padding=1), ReLU(),
                      MaxPool2d(3, stride=2, padding=1), ReLU(), Flatten(), Linear(3 * 7 * 7, 10))


@pytest.mark.parametrize("make_model", [mnist_cnn, convs_with_relus])
def test_training_through_the_emulated_kernels_matches_numpy(monkeypatch, make_model):
    """Every kernel the plain GPU step launches, except cuBLAS's products and CuPy's own
    elementwise work, runs emulated: the parameters after 3 steps equal the NumPy run's
    (float64)."""
    launched = set()
    for a, b in zip(_train(3, True, monkeypatch, launched, make_model),
                    _train(3, False, monkeypatch, make_model=make_model)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert launched == {"im2col", "col2im", "maxpool2d_forward", "maxpool2d_backward",
                        "adam_multi_tensor"}


@pytest.mark.parametrize("make_loss", [minicnn.CrossEntropyLoss, fused.CrossEntropyLoss],
                         ids=["plain", "fused"])
def test_loss_on_the_kernel_path_defers_the_target_check(monkeypatch, make_loss):
    """On a GPU the loss reads nothing back: a bad target leaves NaN and a device flag that
    ``check()`` raises on (once: it clears the flag)."""
    kernel_numpy = _KernelNumpy()                 # one module, as cupy is
    monkeypatch.setattr(losses, "get_array_module", lambda a: kernel_numpy)
    monkeypatch.setattr(fused.ops, "get_array_module", lambda a: kernel_numpy)
    monkeypatch.setattr(fused.ops.cuda, "launch", emulator.launch)
    loss_fn = make_loss()
    logits = np.random.default_rng(2).standard_normal((4, 3))
    loss_fn(logits, np.array([0, 1, 2, 1]))
    loss_fn.check()                                           # nothing wrong yet
    assert np.isnan(loss_fn(logits, np.array([0, 3, 2, 1])))  # no exception here...
    loss_fn(logits, np.array([0, 1, 2, 1]))                   # ...and the flag stays set
    with pytest.raises(ValueError, match=r"class indices in \[0, K\)"):
        loss_fn.check()
    loss_fn.check()
