"""Pictures of a model and its training, drawn with matplotlib (the ``plot`` extra).

Each function returns a ``matplotlib.figure.Figure`` made without pyplot: nothing is shown,
nothing is kept open, any backend (Agg included) can draw it. ``fig.savefig("name.png")``
writes it; in a notebook, a figure at the end of a cell is shown (after ``%matplotlib inline``).
Arrays may be NumPy or CuPy: what is drawn is copied to the host.

matplotlib is imported inside the functions, so ``import minicnn.plot`` works without it; a
call without it raises ImportError saying ``pip install "minicnn[plot]"``.
"""
import math

import numpy as np

from .backend import get_array_module, to_numpy
from .errors import ShapeError
from . import gradcam as _gradcam
from .inference import Prediction, predict
from .module import Module


def _figure(**kwargs):
    """A new matplotlib Figure, not registered with pyplot."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('minicnn.plot needs matplotlib, which is not installed: '
                          'pip install "minicnn[plot]" (or pip install matplotlib)') from e
    return Figure(**kwargs)


def _grid(n, max_columns=8):
    columns = min(n, max_columns)
    return math.ceil(n / columns), columns


def _show(ax, image):
    """Draw one image (C, H, W) on ``ax``: gray for one channel, colour for three (each scaled
    to [0, 1] over its own range), else the first channel."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3 and image.shape[0] == 3:
        rgb = image.transpose(1, 2, 0)
        low, high = rgb.min(), rgb.max()
        ax.imshow((rgb - low) / (high - low) if high > low else np.zeros_like(rgb))
    else:
        ax.imshow(image[0] if image.ndim == 3 else image, cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def training_curves(history):
    """Loss and accuracy per epoch from ``fit``'s ``History``: two axes, training and (when
    ``fit`` had a ``val_loader``) test curves."""
    epochs = getattr(history, "epochs", None)
    if not isinstance(epochs, list):
        raise TypeError(f"training_curves: expected the History that minicnn.fit returns, got "
                        f"{type(history).__name__}")
    if not epochs:
        raise ValueError("training_curves: the history has no epochs yet")
    fig = _figure(figsize=(9, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    x = [row.get("epoch", i + 1) for i, row in enumerate(epochs)]
    for ax, metric, label in ((axes[0], "loss", "cross-entropy"),
                              (axes[1], "accuracy", "accuracy")):
        for split, name in (("train", "training"), ("val", "test")):
            key = f"{split}_{metric}"
            if all(key in row for row in epochs):
                ax.plot(x, [row[key] for row in epochs], "o-", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if len(x) <= 12:
            ax.set_xticks(x)
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_title("loss (mean over the epoch)")
    axes[1].set_title("accuracy")
    return fig


def _first_convolution(model):
    for _, m in model.named_modules():
        if _gradcam._is_convolution(m):
            return m
    raise ValueError(f"filters: {type(model).__name__} has no convolution")


def filters(layer, channel=0, max_filters=64):
    """The filters of a convolution, one small image each (the first ``max_filters``): a Conv2d
    (or FusedConv2d), or a model, whose first convolution is taken.

    Weights (O, C, kh, kw): with C = 3 each filter is drawn in colour, else input channel
    ``channel`` is drawn in gray. One colour scale for all, symmetric about 0 (mid-gray is 0).
    """
    if isinstance(layer, Module) and not _gradcam._is_convolution(layer):
        layer = _first_convolution(layer)
    if not isinstance(layer, Module):
        raise TypeError(f"filters: expected a Conv2d or a model, got {type(layer).__name__}")
    w = to_numpy(layer.weight.data).astype(np.float64)        # O, C, kh, kw
    if not 0 <= channel < w.shape[1]:
        raise ValueError(f"filters: channel must be in 0..{w.shape[1] - 1}, got {channel!r}")
    w = w[:max_filters]
    rows, columns = _grid(len(w))
    fig = _figure(figsize=(columns * 0.9 + 0.4, rows * 0.9 + 0.6), layout="constrained")
    limit = np.abs(w).max() or 1.0
    for k, f in enumerate(w):
        ax = fig.add_subplot(rows, columns, k + 1)
        if f.shape[0] == 3:
            ax.imshow((f.transpose(1, 2, 0) / limit + 1) / 2)
        else:
            ax.imshow(f[channel], cmap="gray", vmin=-limit, vmax=limit)
        ax.set_xticks([])
        ax.set_yticks([])
    kh, kw = w.shape[2:]
    which = "" if w.shape[1] in (1, 3) else f", input channel {channel}"
    fig.suptitle(f"{type(layer).__name__}: {len(w)} filters of {kh}x{kw}{which}", fontsize=10)
    return fig


def feature_maps(model, image, layer=0, max_maps=32):
    """What ``layer`` (an index, a name such as "3" or "features.8", or the layer) of a
    Sequential ``model`` outputs for one ``image`` (C, H, W) or (1, C, H, W), in eval mode.

    A (1, C, h, w) output gives one gray image per channel (the first ``max_maps``), each on its
    own scale; any other output, one bar per value.
    """
    if not hasattr(image, "ndim") or image.ndim not in (3, 4) or \
            (image.ndim == 4 and image.shape[0] != 1):
        raise ShapeError(f"feature_maps: expected one image (C, H, W) or (1, C, H, W), got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    x = image if image.ndim == 4 else image[None]
    k = _gradcam.find_layer(model, layer)
    name, module = _gradcam.named_layers(model)[k]
    out = to_numpy(_gradcam.forward_to(model, x, k))[0].astype(np.float64)
    title = f"layer {name} ({type(module).__name__}): output {tuple(out.shape)}"
    if out.ndim == 3:
        maps = out[:max_maps]
        rows, columns = _grid(len(maps))
        fig = _figure(figsize=(columns * 1.1 + 0.4, rows * 1.1 + 0.6), layout="constrained")
        for c, m in enumerate(maps):
            ax = fig.add_subplot(rows, columns, c + 1)
            ax.imshow(m, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(str(c), fontsize=7, pad=2)
    else:
        values = out.reshape(-1)
        fig = _figure(figsize=(7, 2.8), layout="constrained")
        ax = fig.add_subplot()
        ax.bar(np.arange(values.size), values, color="#287271")
        ax.set_xlabel("unit")
        ax.set_ylabel("value")
    fig.suptitle(title, fontsize=10)
    return fig


def confusion_matrix(cm, class_names=None, normalize=False):
    """The confusion matrix (K, K) as an image, rows true classes, columns predicted, each cell
    labelled with its count (or, with ``normalize``, the fraction of its row)."""
    if not hasattr(cm, "ndim") or cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ShapeError(f"confusion_matrix: expected a square matrix (K, K), got "
                         f"{getattr(cm, 'shape', type(cm).__name__)}")
    cm = to_numpy(cm)
    k = cm.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"confusion_matrix: expected {k} class names, got {len(names)}")
    values = cm.astype(np.float64)
    if normalize:
        totals = values.sum(axis=1, keepdims=True)
        values = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    size = max(4.0, 0.45 * k + 1.5)
    fig = _figure(figsize=(size, size), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(values, cmap="Blues")
    high = values.max() or 1.0
    for i in range(k):
        for j in range(k):
            text = f"{values[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if values[i, j] > high / 2 else "black")
    ax.set_xticks(range(k), names, rotation=45 if max(map(len, names)) > 2 else 0)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    correct = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"confusion matrix: {int(np.trace(cm))} of {int(cm.sum())} right "
                 f"({correct:.1%})", fontsize=10)
    return fig


def worst_examples(model, images, targets, k=8, class_names=None):
    """The ``k`` most confidently misclassified of ``images`` (N, C, H, W): the wrong answers
    with the highest probability for the wrong class, most confident first, each titled "true
    -> predicted (probability)".

    ``model``: a model (``minicnn.predict`` runs it over ``images``) or the ``Prediction`` it
    already returned for them. Fewer axes when fewer are wrong; none wrong gives one axes that
    says so.
    """
    if isinstance(model, Prediction):
        pred = model
    elif isinstance(model, Module):
        pred = predict(model, images, progress=False)
    else:
        raise TypeError(f"worst_examples: expected a model or the Prediction minicnn.predict "
                        f"returned, got {type(model).__name__}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"worst_examples: expected k a positive int, got {k!r}")
    classes, probs = to_numpy(pred.classes), to_numpy(pred.probabilities)
    targets = to_numpy(targets)
    if targets.shape != classes.shape or len(images) != len(classes):
        raise ShapeError(f"worst_examples: expected as many images, targets and predictions, "
                         f"got {len(images)}, {targets.shape[0] if targets.ndim else targets} "
                         f"and {len(classes)}")
    wrong = np.flatnonzero(classes != targets)
    confidence = probs[wrong, classes[wrong]]
    worst = wrong[np.argsort(-confidence, kind="stable")][:k]

    def name(c):
        return str(c) if class_names is None else str(class_names[c])

    if worst.size == 0:
        fig = _figure(figsize=(4, 1.5), layout="constrained")
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, f"none of the {len(classes)} images is misclassified", ha="center",
                va="center")
        ax.set_axis_off()
        return fig
    rows, columns = _grid(worst.size)
    fig = _figure(figsize=(columns * 1.5 + 0.4, rows * 1.7 + 0.5), layout="constrained")
    picked = to_numpy(images[get_array_module(images).asarray(worst)])
    for n, (i, image) in enumerate(zip(worst, picked)):
        ax = fig.add_subplot(rows, columns, n + 1)
        _show(ax, image)
        ax.set_title(f"{name(targets[i])} -> {name(classes[i])} ({probs[i, classes[i]]:.2f})",
                     fontsize=8)
    fig.suptitle(f"the {worst.size} most confident mistakes of {wrong.size} "
                 f"(true -> predicted, probability)", fontsize=10)
    return fig


def grad_cam(model, images, target_class=None, layer=None, class_names=None):
    """Grad-CAM (``minicnn.gradcam.grad_cam``) for an image (C, H, W) or a few (B, C, H, W): per
    image, the image above and its heat map over it below (2 x B axes), titled with the class
    whose evidence is shown (None: the predicted class) and its probability."""
    if not hasattr(images, "ndim") or images.ndim not in (3, 4):
        raise ShapeError(f"grad_cam: expected an image (C, H, W) or a batch (B, C, H, W), got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    x = images if images.ndim == 4 else images[None]
    k = _gradcam.default_layer(model) if layer is None else _gradcam.find_layer(model, layer)
    heat = to_numpy(_gradcam.grad_cam(model, x, target_class, k))
    pred = predict(model, x, progress=False)
    probs = to_numpy(pred.probabilities)
    pictures = to_numpy(x).astype(np.float64)
    B = len(pictures)
    classes = to_numpy(pred.classes if target_class is None else target_class)
    classes = np.broadcast_to(classes.reshape(-1) if classes.size == 1 else classes, (B,))
    fig = _figure(figsize=(B * 1.6 + 0.4, 3.6), layout="constrained")
    axes = fig.subplots(2, B, squeeze=False)
    for b in range(B):
        _show(axes[0, b], pictures[b])
        c = int(classes[b])
        label = str(c) if class_names is None else str(class_names[c])
        axes[0, b].set_title(f"{label} ({probs[b, c]:.2f})", fontsize=8)
        _show(axes[1, b], pictures[b])
        axes[1, b].imshow(heat[b], cmap="jet", alpha=0.5, vmin=0, vmax=1)
    name, module = _gradcam.named_layers(model)[k]
    fig.suptitle(f"Grad-CAM at layer {name} ({type(module).__name__}): where the class's "
                 "evidence is", fontsize=10)
    return fig
