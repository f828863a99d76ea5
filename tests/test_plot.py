"""minicnn.plot: each function returns a matplotlib Figure with the axes and images it promises,
opens no pyplot window, and draws with the Agg backend; a clear error without matplotlib."""
import io
import sys

import numpy as np
import pytest

import minicnn
from minicnn import plot
from minicnn.data import mnist_sample
from minicnn.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU
from minicnn.module import Sequential, ShapeError
from minicnn.train import History

matplotlib = pytest.importorskip("matplotlib", reason="minicnn.plot needs matplotlib "
                                                      "(pip install -e '.[plot]')")
from matplotlib.figure import Figure  # noqa: E402


@pytest.fixture(scope="module")
def data():
    test = mnist_sample(train=False)
    return test.images[:40], test.labels[:40]


@pytest.fixture
def model():
    """An untrained small net: plots do not need a good one, and this one is fast."""
    return Sequential(Conv2d(1, 6, 3), ReLU(), MaxPool2d(2), Flatten(), Linear(6 * 13 * 13, 10))


def _images(fig):
    return sum(len(ax.images) for ax in fig.axes)


def _drawn(fig):
    """The figure renders to PNG (Agg) and no pyplot figure was opened on the way."""
    assert isinstance(fig, Figure)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
    return fig


def test_training_curves():
    history = History()
    for epoch in (1, 2, 3):
        history.append({"epoch": epoch, "train_loss": 1 / epoch, "train_accuracy": 1 - 0.1 / epoch,
                        "val_loss": 1.2 / epoch, "val_accuracy": 1 - 0.2 / epoch})
    fig = _drawn(plot.training_curves(history))
    assert len(fig.axes) == 2 and [len(ax.lines) for ax in fig.axes] == [2, 2]
    assert list(fig.axes[0].lines[1].get_ydata()) == history["val_loss"]
    train_only = History()
    train_only.append({"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.9})
    assert [len(ax.lines) for ax in plot.training_curves(train_only).axes] == [1, 1]
    with pytest.raises(ValueError, match="no epochs"):
        plot.training_curves(History())
    with pytest.raises(TypeError, match="History"):
        plot.training_curves([0.5, 0.4])


def test_filters(model):
    fig = _drawn(plot.filters(model))                       # the model's first convolution
    assert len(fig.axes) == 6 and _images(fig) == 6
    assert fig.axes[0].images[0].get_array().shape == (3, 3)
    colour = _drawn(plot.filters(Conv2d(3, 10, 5), max_filters=4))
    assert len(colour.axes) == 4 and colour.axes[0].images[0].get_array().shape == (5, 5, 3)
    assert len(plot.filters(Conv2d(4, 2, 3), channel=3).axes) == 2
    with pytest.raises(ValueError, match="channel must be in 0..0"):
        plot.filters(model, channel=1)
    with pytest.raises(ValueError, match="no convolution"):
        plot.filters(Sequential(Flatten(), Linear(4, 2)))
    fast = minicnn.fuse(Sequential(Conv2d(1, 6, 3), ReLU(), MaxPool2d(2)))
    assert len(plot.filters(fast).axes) == 6


def test_feature_maps(model, data):
    images, _ = data
    fig = _drawn(plot.feature_maps(model, images[0], layer=1))
    assert len(fig.axes) == 6 and _images(fig) == 6
    assert fig.axes[0].images[0].get_array().shape == (26, 26)
    pooled = plot.feature_maps(model, images[:1], layer="2", max_maps=4)
    assert len(pooled.axes) == 4 and pooled.axes[0].images[0].get_array().shape == (13, 13)
    logits = _drawn(plot.feature_maps(model, images[0], layer=-1))
    assert len(logits.axes) == 1 and _images(logits) == 0 and len(logits.axes[0].patches) == 10
    assert model.training
    with pytest.raises(ShapeError, match="one image"):
        plot.feature_maps(model, images[:2], layer=1)
    with pytest.raises(ValueError, match="no layer named 'conv'"):
        plot.feature_maps(model, images[0], layer="conv")


def test_confusion_matrix():
    rng = np.random.default_rng(0)
    cm = minicnn.metrics.confusion_matrix(rng.integers(0, 4, 50), rng.integers(0, 4, 50))
    fig = _drawn(plot.confusion_matrix(cm, class_names=["a", "b", "c", "d"]))
    assert len(fig.axes) == 1 and _images(fig) == 1 and len(fig.axes[0].texts) == 16
    assert fig.axes[0].texts[0].get_text() == str(cm[0, 0])
    normalized = plot.confusion_matrix(cm, normalize=True)
    assert normalized.axes[0].texts[0].get_text() == f"{cm[0, 0] / cm[0].sum():.2f}"
    with pytest.raises(ValueError, match="expected 4 class names, got 3"):
        plot.confusion_matrix(cm, class_names="abc")
    with pytest.raises(ShapeError, match="square"):
        plot.confusion_matrix(np.ones((2, 3)))


def test_worst_examples(model, data):
    images, labels = data
    pred = minicnn.predict(model, images)
    wrong = np.flatnonzero(pred.classes != labels)
    assert wrong.size >= 5                                  # an untrained net is mostly wrong
    fig = _drawn(plot.worst_examples(model, images, labels, k=5))
    assert len(fig.axes) == 5 and _images(fig) == 5
    # most confident first: the probabilities in the titles never increase
    shown = [float(ax.get_title().rsplit("(", 1)[1].rstrip(")")) for ax in fig.axes]
    assert shown == sorted(shown, reverse=True)
    assert shown[0] == round(float(pred.probabilities[wrong, pred.classes[wrong]].max()), 2)
    again = plot.worst_examples(pred, images, labels, k=5)
    assert [ax.get_title() for ax in again.axes] == [ax.get_title() for ax in fig.axes]
    none_wrong = _drawn(plot.worst_examples(pred, images, pred.classes))
    assert len(none_wrong.axes) == 1 and _images(none_wrong) == 0
    with pytest.raises(ShapeError, match="as many"):
        plot.worst_examples(pred, images, labels[:10])
    with pytest.raises(ValueError, match="positive int"):
        plot.worst_examples(pred, images, labels, k=0)


def test_grad_cam(model, data):
    images, _ = data
    fig = _drawn(plot.grad_cam(model, images[:3]))
    assert len(fig.axes) == 6 and _images(fig) == 9       # 3 images, 3 images under heat maps
    heat = fig.axes[3].images[1].get_array()
    assert heat.shape == (28, 28) and heat.min() >= 0
    one = _drawn(plot.grad_cam(model, images[0], target_class=7, class_names=list("ABCDEFGHIJ")))
    assert len(one.axes) == 2 and one.axes[0].get_title().startswith("H (")


def test_without_matplotlib_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)     # import fails
    with pytest.raises(ImportError, match=r'pip install "minicnn\[plot\]"'):
        plot.confusion_matrix(np.eye(2, dtype=np.int64))
