"""CrossEntropyLoss against its formula written out in float64, and its backward against finite
differences."""
import numpy as np
import pytest

from minicnn import CrossEntropyLoss, ShapeError


def reference_ce(logits, targets, eps):
    """-sum_k q_k log softmax(z)_k averaged over the batch, q = (1-eps) one_hot + eps/K."""
    B, K = logits.shape
    total = 0.0
    for b in range(B):
        z = logits[b]
        logsumexp = np.log(np.sum(np.exp(z - z.max()))) + z.max()
        for k in range(K):
            q = (1 - eps) * (k == targets[b]) + eps / K
            total -= q * (z[k] - logsumexp)
    return total / B


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("B,K", [(1, 2), (5, 10), (3, 7)])
def test_forward_matches_formula(eps, B, K):
    rng = np.random.default_rng(B * K)
    logits = rng.standard_normal((B, K)) * 3
    targets = rng.integers(0, K, B)
    loss = CrossEntropyLoss(label_smoothing=eps)(logits, targets)
    assert isinstance(loss, np.ndarray) and loss.shape == ()
    np.testing.assert_allclose(loss, reference_ce(logits, targets, eps), rtol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_backward_matches_finite_differences(eps):
    rng = np.random.default_rng(1)
    logits, targets = rng.standard_normal((4, 6)), rng.integers(0, 6, 4)
    loss_fn = CrossEntropyLoss(eps)
    loss_fn(logits, targets)
    grad = loss_fn.backward()
    numeric = np.zeros_like(logits)
    for i in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[i] += 1e-6
        down[i] -= 1e-6
        numeric[i] = (reference_ce(up, targets, eps) - reference_ce(down, targets, eps)) / 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-8)
    # softmax minus a distribution: every row sums to zero
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-15)


def test_large_logits_do_not_overflow():
    logits = np.array([[1000.0, 0.0, -1000.0], [50.0, 50.0, 50.0]], dtype=np.float32)
    loss_fn = CrossEntropyLoss()
    loss = loss_fn(logits, np.array([0, 2]))
    np.testing.assert_allclose(loss, np.log(3) / 2, rtol=1e-6)
    assert np.isfinite(loss_fn.backward()).all()


def test_float32_stays_float32():
    logits = np.random.default_rng(2).standard_normal((8, 10)).astype(np.float32)
    loss_fn = CrossEntropyLoss()
    assert loss_fn(logits, np.arange(8)).dtype == np.float32
    assert loss_fn.backward().dtype == np.float32


@pytest.mark.parametrize("targets,err,match", [
    (np.array([0, 10]), ValueError, r"class indices in \[0, 10\), got \[10\]"),
    (np.array([-1, 3]), ValueError, r"got \[-1\]"),
    (np.array([0, 1, 2]), ShapeError, r"expected targets of shape \(2,\)"),
    (np.array([0.0, 1.0]), TypeError, "integer class indices"),
])
def test_bad_targets_are_refused(targets, err, match):
    logits = np.random.default_rng(3).standard_normal((2, 10))
    with pytest.raises(err, match=match):
        CrossEntropyLoss()(logits, targets)


def test_bad_logits_and_arguments():
    with pytest.raises(ShapeError, match=r"logits of shape \(B, K\)"):
        CrossEntropyLoss()(np.ones((2, 3, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropyLoss(label_smoothing=-0.1)
    with pytest.raises(RuntimeError, match="before the loss"):
        CrossEntropyLoss().backward()
