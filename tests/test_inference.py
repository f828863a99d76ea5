"""predict, the metrics and Grad-CAM: against plain references, and leaving the model as it was.

Tolerances: float32 probabilities against a float64 softmax of the same logits, rtol 1e-6 and
atol 1e-7 (a few float32 roundings of exp and one division); Grad-CAM's captured gradient
against central differences in float64, atol 1e-5 / rtol 1e-4 (the project's gradcheck
tolerances); everything else is compared exactly.
"""
from collections import OrderedDict

import numpy as np
import pytest

import minicnn
from minicnn import gradcam, metrics
from minicnn.data import ArrayDataset
from minicnn.layers import (AdaptiveAvgPool2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d,
                            ReLU)
from minicnn.models import mnist_cnn
from minicnn.module import Sequential, ShapeError
from minicnn.normalization import BatchNorm1d, BatchNorm2d


def _images(n, shape=(1, 28, 28), seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(dtype)


def _softmax64(logits):
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _small_net():
    """Conv, BatchNorm, ReLU, pool, Dropout and Linear: every kind of mode-dependent layer."""
    return Sequential(Conv2d(1, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2),
                      Flatten(), Dropout(0.5), Linear(4 * 6 * 6, 5))


def _state(model):
    """Everything predict and capture must leave alone: modes, caches, gradients, flags, buffers."""
    return ([(name, m.training, vars(m).get("_cache"), vars(m).get("_relu_out"))
             for name, m in model.named_modules()],
            [(p.grad.copy(), p.requires_grad) for p in model.parameters()],
            [b.copy() for b in model.buffers()])


def _assert_state_equal(before, after):
    assert [(n, t) for n, t, _, _ in before[0]] == [(n, t) for n, t, _, _ in after[0]]
    assert all(c is None and r is None for _, _, c, r in after[0]), "a cache was left behind"
    for (g0, f0), (g1, f1) in zip(before[1], after[1]):
        assert f0 == f1 and np.array_equal(g0, g1)
    for b0, b1 in zip(before[2], after[2]):
        assert np.array_equal(b0, b1)


# --- predict -------------------------------------------------------------------------------------

def test_predict_equals_the_eval_forward_batch_by_batch():
    """70 inputs in batches of 32 (the last one 6): the classes are the argmax of the logits of
    a manual eval-mode forward over the same batches, exactly; probabilities as stated above."""
    model = mnist_cnn()
    x = _images(70)
    pred = minicnn.predict(model, x, batch_size=32)
    assert isinstance(pred, minicnn.Prediction)
    classes, probs = pred                                   # unpacks as a pair
    model.eval()
    logits = np.concatenate([model(x[i:i + 32]) for i in range(0, 70, 32)])
    model.train()
    assert classes.dtype == np.int64 and classes.shape == (70,)
    assert np.array_equal(classes, logits.argmax(axis=1))
    assert probs.dtype == np.float32 and probs.shape == (70, 10)
    np.testing.assert_allclose(probs, _softmax64(logits), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-6)
    # one batch or many: the same answers (each batch's rows are computed alone)
    whole = minicnn.predict(model, x, batch_size=1000)
    assert np.array_equal(whole.classes, classes)


def test_predict_restores_every_mode_and_keeps_nothing():
    """A model in training mode holding a frozen BatchNorm in eval mode (transfer learning): the
    modes come back as they were, no layer keeps a cache, BatchNorm's running statistics and the
    gradients are untouched, and Dropout is off (two calls agree)."""
    model = _small_net()
    model[1].eval().freeze()
    model[1].running_mean[...] = np.random.default_rng(3).standard_normal(4)
    for p in model.parameters():
        p.grad[...] = np.random.default_rng(4).standard_normal(p.shape)
    before = _state(model)
    x = _images(9, (1, 12, 12))
    first = minicnn.predict(model, x, batch_size=4)
    _assert_state_equal(before, _state(model))
    assert model.training and not model[1].training
    second = minicnn.predict(model, x, batch_size=4)
    assert np.array_equal(first.probabilities, second.probabilities)


def test_predict_takes_a_dataset_and_float64_models(float64):
    model = mnist_cnn()
    x = _images(5, dtype=np.float64)
    labels = np.arange(5)
    pred = minicnn.predict(model, ArrayDataset(x, labels), progress=False)
    assert pred.probabilities.dtype == np.float64
    model.eval()
    np.testing.assert_allclose(pred.probabilities, _softmax64(model(x)), rtol=1e-12, atol=0)


def test_softmax_does_not_overflow():
    """Logits of 1000 would overflow exp in float32 (and float64) without the shift."""
    logits = np.array([[1000.0, 1001.0, 999.0], [-1000.0, 0.0, 5.0]], dtype=np.float32)
    probs = minicnn.inference.softmax(logits)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, _softmax64(logits), rtol=1e-6, atol=1e-7)


def test_predict_refuses_bad_inputs_with_clear_errors():
    model = mnist_cnn()
    with pytest.raises(TypeError, match="expected a minicnn Module"):
        minicnn.predict(lambda x: x, _images(2))
    with pytest.raises(TypeError, match="floating-point inputs, got dtype uint8"):
        minicnn.predict(model, np.zeros((2, 1, 28, 28), dtype=np.uint8))
    with pytest.raises(ShapeError, match=r"batch dimension first.*x\[None\]"):
        minicnn.predict(model, np.ones(28, dtype=np.float32))
    with pytest.raises(ValueError, match="at least one sample"):
        minicnn.predict(model, _images(0))
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            minicnn.predict(model, _images(2), batch_size=bad)
    with pytest.raises(TypeError, match="NumPy or CuPy array"):
        minicnn.predict(model, [[1.0]])
    with pytest.raises(ShapeError, match=r"logits \(B, K\)"):
        minicnn.predict(Sequential(Conv2d(1, 2, 3)), _images(2))
    assert model.training                     # restored after the failed call too
    with pytest.raises(ShapeError, match="Conv2d"):    # the layer's own check names it
        minicnn.predict(model, _images(2, (3, 28, 28)))


# --- metrics -------------------------------------------------------------------------------------

def _loop_confusion(targets, predictions, k):
    cm = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(targets, predictions):
        cm[t, p] += 1
    return cm


def test_confusion_matrix_equals_a_loop():
    rng = np.random.default_rng(0)
    targets, predictions = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    cm = metrics.confusion_matrix(targets, predictions)
    assert cm.dtype == np.int64 and cm.shape == (7, 7)
    assert np.array_equal(cm, _loop_confusion(targets, predictions, 7))
    assert cm.sum() == 500
    wider = metrics.confusion_matrix(targets.astype(np.uint8), predictions, num_classes=9)
    assert np.array_equal(wider, _loop_confusion(targets, predictions, 9))
    # rows are true classes: one sample of class 2 predicted as 5
    assert metrics.confusion_matrix(np.array([2]), np.array([5]))[2, 5] == 1


def test_per_class_accuracy_and_accuracy():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 5, 300)
    targets[targets == 3] = 4                               # class 3 has no samples
    predictions = np.where(rng.random(300) < 0.7, targets, rng.integers(0, 5, 300))
    cm = metrics.confusion_matrix(targets, predictions, num_classes=5)
    expected = [np.mean(predictions[targets == c] == c) if (targets == c).any() else np.nan
                for c in range(5)]
    np.testing.assert_array_equal(metrics.per_class_accuracy(cm), expected)
    np.testing.assert_array_equal(metrics.per_class_accuracy(targets, predictions, 5), expected)
    assert metrics.accuracy(targets, predictions) == np.mean(targets == predictions)
    pred = minicnn.Prediction(predictions, np.zeros((300, 5)))
    assert metrics.accuracy(targets, pred) == metrics.accuracy(targets, predictions)


def test_metrics_refuse_bad_inputs():
    t = np.array([0, 1, 2])
    with pytest.raises(ShapeError, match="same shape"):
        metrics.confusion_matrix(t, np.array([0, 1]))
    with pytest.raises(ShapeError, match="argmax"):
        metrics.accuracy(t, np.zeros((3, 4)))
    with pytest.raises(TypeError, match="integer class indices"):
        metrics.confusion_matrix(t, t.astype(np.float32))
    with pytest.raises(ValueError, match=">= 0, got -1"):
        metrics.confusion_matrix(t, np.array([0, -1, 2]))
    with pytest.raises(ValueError, match="below num_classes=2, got 2"):
        metrics.confusion_matrix(t, t, num_classes=2)
    with pytest.raises(ValueError, match="num_classes must be given"):
        metrics.confusion_matrix(t[:0], t[:0])
    assert metrics.confusion_matrix(t[:0], t[:0], num_classes=3).sum() == 0
    with pytest.raises(ValueError, match="at least one sample"):
        metrics.accuracy(t[:0], t[:0])
    with pytest.raises(ShapeError, match="square"):
        metrics.per_class_accuracy(np.ones((2, 3)))
    with pytest.raises(ValueError, match="negative"):
        metrics.per_class_accuracy(-np.eye(2))


# --- Grad-CAM ------------------------------------------------------------------------------------

def test_grad_cam_maps_have_the_input_size_are_non_negative_and_leave_the_model_alone():
    model = mnist_cnn()
    for p in model.parameters():
        p.grad[...] = 0.5
    before = _state(model)
    x = _images(3)
    maps = gradcam.grad_cam(model, x)
    assert maps.shape == (3, 28, 28) and maps.dtype == np.float32
    assert maps.min() >= 0 and np.allclose(maps.reshape(3, -1).max(axis=1), 1)
    one = gradcam.grad_cam(model, x[1], target_class=4, normalize=False)
    assert one.shape == (28, 28) and one.min() >= 0
    _assert_state_equal(before, _state(model))
    assert model.training


def test_grad_cam_peaks_where_the_class_evidence_is():
    """Channel 0 of the input is bright only in the top-left 8x8 quarter, channel 1 only outside
    it. The net passes each channel through (1x1 convolution = identity, ReLU, 2x2 max pool),
    averages it, and class c's logit is channel c's mean: class 0's score depends on the
    top-left quarter alone, class 1's on the rest. Grad-CAM at the pool (8x8, stretched to
    16x16) must put class 0's heat in that quarter and nothing beyond the one-pixel band that
    bilinear interpolation blurs across the edge; class 1's outside it."""
    conv = Conv2d(2, 2, 1)
    conv.weight.data[...] = np.eye(2).reshape(2, 2, 1, 1)
    conv.bias.data[...] = 0
    head = Linear(2, 2)
    head.weight.data[...] = np.eye(2)
    head.bias.data[...] = 0
    model = Sequential(conv, ReLU(), MaxPool2d(2), AdaptiveAvgPool2d(1), Flatten(), head)
    rng = np.random.default_rng(2)
    x = np.zeros((1, 2, 16, 16), dtype=np.float32)
    quarter = np.zeros((16, 16), dtype=bool)
    quarter[:8, :8] = True
    x[0, 0][quarter] = rng.uniform(0.5, 1.0, quarter.sum())
    x[0, 1][~quarter] = rng.uniform(0.5, 1.0, (~quarter).sum())
    evidence0 = gradcam.grad_cam(model, x[0], target_class=0, layer=2)
    assert quarter[np.unravel_index(evidence0.argmax(), evidence0.shape)]
    assert evidence0[9:, :].max() == 0 and evidence0[:, 9:].max() == 0
    evidence1 = gradcam.grad_cam(model, x[0], target_class=1, layer=2)
    assert not quarter[np.unravel_index(evidence1.argmax(), evidence1.shape)]
    assert evidence1[:7, :7].max() == 0


def _central_differences(score, activations, eps=1e-6):
    """d score / d activations, element by element: (score(a + eps) - score(a - eps)) / 2 eps."""
    numeric = np.zeros_like(activations)
    for i in np.ndindex(*activations.shape):
        a = activations.copy()
        a[i] += eps
        plus = score(a)
        a[i] -= 2 * eps
        numeric[i] = (plus - score(a)) / (2 * eps)
    return numeric


def test_captured_gradient_matches_finite_differences(float64):
    """dA from the hand-written backward of the layers after the chosen one, against central
    differences of sum_b logits[b, c_b] in eval mode, for every element of A (2x4x6x6), with
    BatchNorm on running statistics that differ from the batch's and a Dropout that must stay
    off; eps 1e-6."""
    model = Sequential(Conv2d(1, 4, 3, padding=1), ReLU(), MaxPool2d(2), Conv2d(4, 4, 3, padding=1),
                       BatchNorm2d(4), ReLU(), Flatten(), Linear(4 * 6 * 6, 8), ReLU(),
                       Dropout(0.5), Linear(8, 5))
    rng = np.random.default_rng(5)
    bn = model[4]
    bn.running_mean[...] = rng.standard_normal(4)
    bn.running_var[...] = rng.uniform(0.5, 2.0, 4)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, 4)
    bn.bias.data[...] = rng.standard_normal(4) * 0.1
    x = rng.standard_normal((2, 1, 12, 12))
    classes = np.array([3, 1])
    cap = gradcam.capture(model, x, layer=3, target_class=classes)
    assert cap.activations.shape == cap.gradients.shape == (2, 4, 6, 6)
    assert np.array_equal(cap.classes, classes)
    model.eval()
    assert np.array_equal(cap.logits, model(x))
    assert np.array_equal(cap.activations, model[:4](x))
    tail = model[4:]

    def score(a):
        return tail(a)[np.arange(2), classes].sum()

    numeric = _central_differences(score, cap.activations)
    np.testing.assert_allclose(cap.gradients, numeric, atol=1e-5, rtol=1e-4)
    assert np.abs(numeric).max() > 1e-3                     # not a test of zeros
    assert bn.weight.requires_grad and bn.bias.requires_grad and not bn.training


def test_captured_gradient_through_a_batchnorm_without_running_statistics(float64):
    """A BatchNorm with track_running_stats=False normalises by the batch in either mode, so the
    capture must run it in training mode (eval mode keeps nothing for its backward): dA against
    central differences of sum_b logits[b, c_b], eps 1e-6, atol 1e-5 / rtol 1e-4."""
    model = Sequential(Conv2d(1, 3, 3), ReLU(), Flatten(), Linear(3 * 4 * 4, 5),
                       BatchNorm1d(5, track_running_stats=False), Linear(5, 4))
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 1, 6, 6))
    classes = np.array([0, 2, 3])
    cap = gradcam.capture(model, x, layer=1, target_class=classes)
    tail = model[2:]

    def score(a):
        return tail(a)[np.arange(3), classes].sum()

    numeric = _central_differences(score, cap.activations)
    np.testing.assert_allclose(cap.gradients, numeric, atol=1e-5, rtol=1e-4)
    assert np.abs(numeric).max() > 1e-3                     # not a test of zeros
    assert model.training and model[4].training


def test_grad_cam_runs_on_a_fused_model():
    fast = minicnn.fuse(mnist_cnn())
    layer = gradcam.default_layer(fast)
    assert type(gradcam.named_layers(fast)[layer][1]).__name__ == "FusedConv2d"
    maps = gradcam.grad_cam(fast, _images(2))
    assert maps.shape == (2, 28, 28) and maps.min() >= 0
    assert all(vars(m).get("_cache") is None and vars(m).get("_relu_out") is None
               for _, m in fast.named_modules())


def test_layers_are_found_by_index_name_or_object_in_nested_sequentials():
    features = Sequential(Conv2d(1, 2, 3), ReLU())
    model = Sequential(OrderedDict([("features", features), ("flatten", Flatten()),
                                    ("fc", Linear(2 * 6 * 6, 3))]))
    names = [n for n, _ in gradcam.named_layers(model)]
    assert names == ["features.0", "features.1", "flatten", "fc"]
    assert gradcam.find_layer(model, "features.1") == 1
    assert gradcam.find_layer(model, -1) == 3
    assert gradcam.find_layer(model, features[0]) == 0
    assert gradcam.default_layer(model) == 1                # the ReLU after the last conv
    x = _images(1, (1, 8, 8))
    model.eval()
    assert np.array_equal(gradcam.forward_to(model, x, "features.0"), features[0](x))
    with pytest.raises(ValueError, match="no layer named 'conv'.*features.0"):
        gradcam.find_layer(model, "conv")
    with pytest.raises(ValueError, match="out of range"):
        gradcam.find_layer(model, 4)
    with pytest.raises(TypeError, match="Sequential model"):
        gradcam.find_layer(minicnn.models.resnet18(), 0)


def test_grad_cam_refuses_bad_requests():
    model = mnist_cnn()
    x = _images(2)
    with pytest.raises(ValueError, match="last"):
        gradcam.grad_cam(model, x, layer=-1)
    with pytest.raises(ShapeError, match=r"\(B, C, h, w\)"):
        gradcam.grad_cam(model, x, layer=7)
    with pytest.raises(ValueError, match=r"in 0\.\.9"):
        gradcam.grad_cam(model, x, target_class=10)
    with pytest.raises(ShapeError, match="one target class per image"):
        gradcam.grad_cam(model, x, target_class=[1, 2, 3])
    with pytest.raises(ShapeError, match=r"\(C, H, W\)"):
        gradcam.grad_cam(model, x[0, 0])
    with pytest.raises(ValueError, match="no convolution"):
        gradcam.grad_cam(Sequential(Flatten(), Linear(4, 2)), _images(1, (1, 2, 2)))
    assert model.training
    assert all(vars(m).get("_cache") is None for _, m in model.named_modules())
