"""The CUDA paths of minicnn/ops.py, run through the kernel emulator: what a GPU would execute,
minus cuBLAS and CuPy, checked on a machine without one.

Each ``ops.*_kernel`` function (allocation, geometry, argument order, int32 argmax) is compared
with its NumPy op, and then the example network trains with every im2col/col2im/pooling call
routed through the emulated kernels and is compared with the NumPy run: float64, 1e-12.
"""
import numpy as np
import pytest

import minicnn
from minicnn import ops
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


class _KernelNumpy:
    """NumPy under another name: ops then takes its CUDA branch, and allocates with NumPy."""

    def __getattr__(self, name):
        return getattr(np, name)


def _train(steps, through_kernels, monkeypatch):
    with monkeypatch.context() as m:
        if through_kernels:
            m.setattr(ops, "get_array_module", lambda a: _KernelNumpy())
            m.setattr(ops.cuda, "launch", emulator.launch)
        minicnn.set_default_dtype(np.float64)
        minicnn.seed(1)
        model = mnist_cnn()
        opt = minicnn.Adam(model.parameters(), lr=1e-3)
        loss_fn = minicnn.CrossEntropyLoss()
        data = minicnn.mnist_sample(train=False)
        for step in range(steps):
            x, y = data[np.arange(step * 8, step * 8 + 8)]
            loss_fn(model(x), y)
            opt.zero_grad()
            model.backward(loss_fn.backward())
            opt.step()
        return [p.data.copy() for p in model.parameters()]


def test_training_through_the_emulated_kernels_matches_numpy(monkeypatch):
    for a, b in zip(_train(3, True, monkeypatch), _train(3, False, monkeypatch)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
