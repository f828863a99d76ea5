"""minicnn's layers side by side with PyTorch's on the same weights and inputs (float64)."""
import numpy as np
import pytest

from minicnn import AvgPool2d, Conv2d, MaxPool2d

from conftest import unique_values
from test_layers import CONV_CASES, POOL_CASES

torch = pytest.importorskip("torch", reason="PyTorch not installed: the side-by-side check needs it")


@pytest.mark.parametrize("cin,cout,k,s,p,bhw", CONV_CASES)
def test_conv2d_matches_pytorch(float64, cin, cout, k, s, p, bhw):
    rng = np.random.default_rng(12)
    conv = Conv2d(cin, cout, k, s, p)
    ref = torch.nn.Conv2d(cin, cout, k, s, p).double()
    ref.weight.data = torch.tensor(conv.weight.data)
    ref.bias.data = torch.tensor(conv.bias.data)
    x = rng.standard_normal((bhw[0], cin) + bhw[1:])
    xt = torch.tensor(x, requires_grad=True)
    yt = ref(xt)
    dy = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(conv(x), yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(conv.backward(dy), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(conv.weight.grad, ref.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(conv.bias.grad, ref.bias.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k,s,p,shape", POOL_CASES)
@pytest.mark.parametrize("cls,tcls", [(MaxPool2d, "MaxPool2d"), (AvgPool2d, "AvgPool2d")])
def test_pool_matches_pytorch(float64, cls, tcls, k, s, p, shape):
    x = unique_values(np.random.default_rng(13), shape)
    pool, ref = cls(k, s, p), getattr(torch.nn, tcls)(k, s, p)
    xt = torch.tensor(x, requires_grad=True)
    yt = ref(xt)
    dy = np.random.default_rng(14).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(pool(x), yt.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(pool.backward(dy), xt.grad.numpy(), rtol=1e-12, atol=1e-15)
