"""Grad-CAM (Selvaraju et al., 2017) with the hand-written backward passes, and the layer walk it
shares with ``minicnn.plot``.

Where in the image did a convolutional network look to give class c? Take the activations A
(B, C, h, w) of a convolutional layer, and the gradient of the class score (the logit y_c)
with respect to them, dA = d y_c / d A. Averaging dA over space gives one weight per channel,
how much that channel pushes the score up; the heat map is the ReLU of the channels summed
with those weights, stretched to the input's size:

    alpha[b, k] = mean over (i, j) of dA[b, k, i, j]
    cam[b]      = relu(sum over k of alpha[b, k] * A[b, k])          (h, w) -> (H, W)

minicnn has no autograd and no hooks, so the model runs in two parts: the layers up to and
including the chosen one (the *head*), whose output is A, and the rest (the *tail*). The head
runs in eval mode and keeps nothing; the tail runs forward keeping what its backward needs,
then its backward from dy = one-hot(c), the gradient of y_c with respect to the logits, and
what comes out at its input is dA. This works on a ``Sequential`` (nested Sequentials, such as
VGG's ``features``, are walked into): the layers are run one by one, in order.
"""
from collections import namedtuple

import numpy as np

from .backend import device_of, get_array_module
from .errors import ShapeError
from .layers import Conv2d, Dropout, ReLU
from .module import Module, Sequential, restore_modes, training_modes
from .normalization import _BatchNorm

Capture = namedtuple("Capture", ["activations", "gradients", "logits", "classes"])
Capture.__doc__ = """What ``capture`` returns, on the input's device: ``activations`` A
(B, C, h, w), the chosen layer's output; ``gradients`` dA, the same shape,
d(sum over b of logits[b, classes[b]]) / dA; ``logits`` (B, K); ``classes`` (B,) int64, the
class of each input whose score was taken."""


def named_layers(model):
    """[(name, layer)] of the layers ``model`` runs in order: the children of a ``Sequential``,
    the children of a nested Sequential in its place (named "features.3", as state_dict keys),
    or ``[("", model)]`` for a model that is not a Sequential."""
    if not _is_plain_sequence(model):
        return [("", model)]
    out = []
    for name, child in model.named_children():
        if _is_plain_sequence(child):
            out += [(f"{name}.{sub}", layer) for sub, layer in named_layers(child)]
        else:
            out.append((name, child))
    return out


def _is_plain_sequence(module):
    """A Sequential (or a subclass such as VGG) that runs its children in order and nothing else."""
    cls = type(module)
    return (isinstance(module, Sequential) and cls.forward is Sequential.forward
            and cls.backward is Sequential.backward)


def find_layer(model, layer):
    """Index into ``named_layers(model)`` of ``layer``: an int (negative counts from the end), a
    name ("3", "features.8"), or a layer object of the model. ValueError listing the names;
    TypeError for a model that is not a Sequential (its own forward cannot be cut at a layer)."""
    if not isinstance(model, Module):
        raise TypeError(f"expected a minicnn Module as model, got {type(model).__name__}")
    if not _is_plain_sequence(model):
        raise TypeError(f"expected a Sequential model (nested Sequentials are walked into), "
                        f"whose layers run one after another; {type(model).__name__} runs a "
                        f"forward of its own, which cannot be cut at a layer")
    layers = named_layers(model)
    names = [n for n, _ in layers]
    if isinstance(layer, Module):
        for i, (_, m) in enumerate(layers):
            if m is layer:
                return i
        raise ValueError(f"the layer {type(layer).__name__} is not one of the model's layers "
                         f"{names}")
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"layer index {layer} is out of range for a model of "
                             f"{len(layers)} layers {names}")
        return int(layer) % len(layers)
    if isinstance(layer, str):
        if layer in names:
            return names.index(layer)
        raise ValueError(f"the model has no layer named {layer!r}; its layers are {names}")
    raise TypeError(f"expected layer to be an int, a name or a layer of the model, got "
                    f"{type(layer).__name__}")


def _is_convolution(m):
    """A Conv2d, or a module with a 4-D weight (out, in, kh, kw), as the fast path's FusedConv2d
    (named by its weight, so the plain tier need not import the fast path)."""
    weight = getattr(m, "weight", None)
    return isinstance(m, Conv2d) or getattr(getattr(weight, "data", None), "ndim", 0) == 4


def default_layer(model):
    """Index of Grad-CAM's usual choice: the last convolution (Conv2d or FusedConv2d), or the
    ReLU right after it when there is one (the activation the next layers see)."""
    find_layer(model, 0)                        # the checks of model
    layers = named_layers(model)
    convs = [i for i, (_, m) in enumerate(layers) if _is_convolution(m)]
    if not convs:
        raise ValueError(f"the model has no convolution to take as Grad-CAM's layer; pass "
                         f"layer= one of {[n for n, _ in layers]}")
    i = convs[-1]
    if i + 1 < len(layers) and type(layers[i + 1][1]) is ReLU:
        i += 1
    return i


def forward_to(model, x, layer):
    """The output of ``layer`` (see ``find_layer``) for the batch ``x``, the layers up to it run
    in eval mode (nothing cached); every module's mode is put back afterwards."""
    layers = named_layers(model)
    stop = find_layer(model, layer)
    modes = training_modes(model)
    model.eval()
    try:
        for _, m in layers[:stop + 1]:
            x = m.forward(x)
    finally:
        restore_modes(modes)
    return x


def _check_batch(model, x, fn):
    if not isinstance(model, Module):
        raise TypeError(f"{fn}: expected a minicnn Module as model, got {type(model).__name__}")
    if not (hasattr(x, "ndim") and hasattr(x, "dtype")):
        raise TypeError(f"{fn}: expected an image array (C, H, W) or a batch (B, C, H, W), got "
                        f"{type(x).__name__}")
    if x.ndim not in (3, 4):
        raise ShapeError(f"{fn}: expected an image (C, H, W) or a batch (B, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise TypeError(f"{fn}: expected a floating-point image, got dtype {x.dtype}")
    params = model.parameters()
    if params and params[0].device != device_of(x):
        raise ValueError(f"{fn}: the image is on {device_of(x)} but the model is on "
                         f"{params[0].device}; move one of them (minicnn.to_device / model.to)")
    return x if x.ndim == 4 else x[None]


def _class_indices(classes, logits, fn):
    """(B,) int64 on the logits' device: the argmax with None, an int for every row, or B ints."""
    xp = get_array_module(logits)
    B, K = logits.shape
    if classes is None:
        return logits.argmax(axis=1).astype(np.int64)
    picked = np.asarray(classes.get() if hasattr(classes, "get") else classes)
    if picked.dtype.kind not in "iu" or picked.ndim > 1:
        raise TypeError(f"{fn}: expected target_class None, an int or {B} ints, got "
                        f"{classes!r}")
    picked = np.broadcast_to(picked.astype(np.int64), (B,)) if picked.ndim == 0 or \
        picked.shape == (1,) else picked.astype(np.int64)
    if picked.shape != (B,):
        raise ShapeError(f"{fn}: expected one target class per image ({B}), got "
                         f"{picked.shape[0]}")
    if picked.min() < 0 or picked.max() >= K:
        raise ValueError(f"{fn}: expected target classes in 0..{K - 1}, got {picked.tolist()}")
    return xp.asarray(picked)


def capture(model, x, layer=None, target_class=None):
    """Run ``model`` on the batch ``x`` (B, C, H, W) and return ``Capture(activations,
    gradients, logits, classes)``: the output A of ``layer`` (default: ``default_layer``) and
    the gradient of the score of ``target_class`` (None: each input's predicted class; an int;
    or B ints) with respect to A, through the hand-written backward of every later layer.

    Values are those of eval mode (Dropout off, BatchNorm on its running statistics). The model
    is left as it was: modes, parameter gradients (the backward adds into them; they are put
    back) and caches (none left).
    """
    fn = "capture"
    k = default_layer(model) if layer is None else find_layer(model, layer)
    x = _check_batch(model, x, fn)
    layers = named_layers(model)
    if k == len(layers) - 1:
        raise ValueError(f"{fn}: layer {layers[k][0]!r} is the model's last; choose one before "
                         f"the logits (the layers are {[n for n, _ in layers]})")
    head, tail = [m for _, m in layers[:k + 1]], [m for _, m in layers[k + 1:]]
    modes = training_modes(model)
    tail_modules = [m for top in tail for _, m in top.named_modules()]
    tail_params = [p for m in tail for p in m.parameters()]
    saved_grads = [p.grad.copy() for p in tail_params]
    # A BatchNorm with running statistics runs in eval mode, and then backpropagates only with
    # its parameters frozen (nothing was kept to form their gradients, and none is wanted):
    # freeze them for the backward, then restore. One without them normalises by the batch in
    # either mode, so it stays in training mode, which keeps what its backward needs.
    tracked = [m for m in tail_modules if isinstance(m, _BatchNorm) and m.running_mean is not None]
    norms = [m for m in tracked if m.affine]
    saved_flags = [(p, p.requires_grad) for m in norms for p in (m.weight, m.bias)]
    try:
        model.eval()
        a = x
        for m in head:                          # eval: nothing kept
            a = m.forward(a)
        # The tail keeps what its backward needs (training mode), except in the layers whose
        # values differ in training: Dropout and BatchNorm with running statistics stay in eval.
        for m in tail_modules:
            m.training = not (isinstance(m, Dropout) or m in tracked)
        for p, _ in saved_flags:
            p.requires_grad = False
        logits = a
        for m in tail:
            logits = m.forward(logits)
        if logits.ndim != 2:
            raise ShapeError(f"{fn}: expected the model to output logits (B, K), got shape "
                             f"{tuple(logits.shape)}")
        classes = _class_indices(target_class, logits, fn)
        xp = get_array_module(logits)
        dy = xp.zeros(logits.shape, dtype=logits.dtype)      # d(sum_b y[b, c_b]) / d logits
        dy[xp.arange(logits.shape[0]), classes] = 1
        grad = dy
        for m in reversed(tail):
            grad = m.backward(grad)
    finally:
        for m in tail_modules:                  # a failure half-way leaves no cache behind
            for name in ("_cache", "_relu_out"):                # _relu_out: FusedLinear's mask
                if vars(m).get(name) is not None:
                    setattr(m, name, None)
        for p, flag in saved_flags:
            p.requires_grad = flag
        for p, g in zip(tail_params, saved_grads):
            p.grad[...] = g
        restore_modes(modes)
    return Capture(a, grad, logits, classes)


def resize_matrix(n_in, n_out, xp=np, dtype=np.float64):
    """(n_out, n_in) bilinear interpolation weights along one axis, pixel centres aligned
    (align_corners=False, as PyTorch's and OpenCV's resize): output i samples the input at
    (i + 0.5) * n_in / n_out - 0.5, clamped to the edges. Weights are >= 0 and rows sum to 1."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return xp.asarray(m.astype(dtype))


def grad_cam(model, x, target_class=None, layer=None, normalize=True):
    """Grad-CAM heat maps of ``model`` for an image (C, H, W) -> (H, W), or a batch
    (B, C, H, W) -> (B, H, W), on the input's device, float32 (float64 for float64 inputs).

    ``target_class``: None for each image's predicted class, an int, or one int per image.
    ``layer``: a convolutional layer (index, name or the layer; default ``default_layer``, the
    last convolution's ReLU). Every value is >= 0; with ``normalize`` each map is divided by its
    maximum (a map of zeros stays zeros), so 1 marks where the class's evidence is strongest.
    The maps are the layer's (h, w) resized bilinearly to (H, W).
    """
    fn = "grad_cam"
    single = hasattr(x, "ndim") and x.ndim == 3
    x = _check_batch(model, x, fn)
    cap = capture(model, x, layer, target_class)
    a, da = cap.activations, cap.gradients
    if a.ndim != 4:
        name = named_layers(model)[default_layer(model) if layer is None
                                   else find_layer(model, layer)][0]
        raise ShapeError(f"{fn}: layer {name!r} outputs shape {tuple(a.shape)}; Grad-CAM needs "
                         "a layer with (B, C, h, w) outputs, a convolution or what follows it")
    xp = get_array_module(a)
    dtype = np.promote_types(x.dtype, np.float32)
    a, da = a.astype(dtype, copy=False), da.astype(dtype, copy=False)
    alpha = da.mean(axis=(2, 3))                                        # B, C
    cam = xp.maximum(xp.einsum("bc,bchw->bhw", alpha, a), 0)           # B, h, w
    H, W = x.shape[2:]
    rows = resize_matrix(cam.shape[1], H, xp, dtype)                    # H, h
    cols = resize_matrix(cam.shape[2], W, xp, dtype)                    # W, w
    cam = rows @ cam @ cols.T                                           # B, H, W
    if normalize:
        top = cam.reshape(cam.shape[0], -1).max(axis=1)
        cam /= xp.where(top > 0, top, 1)[:, None, None]
    return cam[0] if single else cam
