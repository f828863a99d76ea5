"""``fuse(model)``: a model with fused modules in place of the runs of plain layers they replace,
as a separate pass the user calls and can print (PyTorch's ``fuse_modules``, TensorRT's layer
fusion)."""
import copy

from ..layers import AvgPool2d, Conv2d, Linear, MaxPool2d, ReLU
from ..module import Module, Sequential
from .modules import FusedConv2d, FusedLinear, FusedMaxPool2d, tiles


def fuse(model):
    """A new model computing what ``model`` computes, with fused modules
    (``minicnn.fused.modules``) in place of the layers they replace; ``model`` is not changed.

    In every Sequential, nested ones included (inside a VGG, a ResNet, a BasicBlock ...), each
    run of layers of these exact types becomes one module::

        Conv2d [ReLU] [MaxPool2d | AvgPool2d]   -> FusedConv2d(conv, relu, pool)
        Conv2d MaxPool2d ReLU                   -> FusedConv2d(conv, relu=True, pool)
        Linear ReLU                             -> FusedLinear(linear, relu=True)
        [ReLU] MaxPool2d [ReLU]                 -> FusedMaxPool2d(pool, relu)

    (a ReLU commutes with a max pool, so one on either side is folded into it). A max pool whose
    windows do not tile the convolution's output (overlapping or padded) becomes the
    FusedConv2d's pool as a FusedMaxPool2d, with the ReLU. Any other Conv2d or MaxPool2d, in a
    Sequential or an attribute of another module, becomes FusedConv2d(conv) or
    FusedMaxPool2d(pool).

    The fused module takes the name of the first layer of its run, so names and ``state_dict``
    keys do not change ("0.weight", "7.bias", ...). Fused modules hold the same Parameter
    objects; the modules fuse does not know (BatchNorm2d, Flatten, ReLU on its own, subclasses
    of the layers ...) are the same objects in both models; containers are new. So the two
    models share parameters, buffers and those layers: an optimizer made before fusing trains
    the fused model, and a checkpoint of either loads into the other.
    """
    if not isinstance(model, Module):
        raise TypeError(f"fuse: expected a minicnn Module, got {type(model).__name__}")
    return _fused(model)


def _fused(module):
    """``module`` fused: a fused module for a lone layer, a new container with its children
    fused, or the module itself (a fused module among them: fusing twice changes nothing)."""
    if isinstance(module, (FusedConv2d, FusedLinear, FusedMaxPool2d)):
        return module
    if type(module) is Conv2d:
        return FusedConv2d(module)
    if type(module) is MaxPool2d:
        return FusedMaxPool2d(module)
    children = list(module.named_children())
    if not children:
        return module
    if isinstance(module, Sequential):
        children = _fused_runs(children)
    else:
        children = [(name, _fused(child)) for name, child in children]
    return _with_children(module, dict(children))


def _fused_runs(children):
    """[(name, layer)] of a Sequential -> the same, each run ``fuse`` knows one fused module
    under the name of the run's first layer."""
    kinds = [type(layer) for _, layer in children] + [None]
    out, i = [], 0
    while i < len(children):
        name, layer = children[i]
        j = i + 1                                   # the first layer after the run
        if kinds[i] is Conv2d:
            relu = kinds[j] is ReLU
            j += relu
            pool = children[j][1] if kinds[j] in (MaxPool2d, AvgPool2d) else None
            j += pool is not None
            if kinds[j] is ReLU and not relu and type(pool) is MaxPool2d:
                relu, j = True, j + 1               # relu(max) = max(relu)
            if type(pool) is MaxPool2d and not tiles(pool):
                pool, relu = FusedMaxPool2d(pool, relu), False
            fused = FusedConv2d(layer, relu, pool)
        elif kinds[i] is Linear and kinds[j] is ReLU:
            fused, j = FusedLinear(layer, relu=True), j + 1
        elif kinds[i] is ReLU and kinds[j] is MaxPool2d:
            fused, j = FusedMaxPool2d(children[j][1], relu=True), j + 1
        elif kinds[i] is MaxPool2d:
            relu = kinds[j] is ReLU
            fused, j = FusedMaxPool2d(layer, relu), j + relu
        else:
            fused = _fused(layer)
        out.append((name, fused))
        i = j
    return out


def _with_children(module, children):
    """A shallow copy of ``module`` whose children are ``children`` (name -> module; a child
    missing there is left out), its other attributes as they are and in their order, and no
    forward's cache."""
    new = copy.copy(module)
    state = vars(new)
    state.clear()
    for key, value in vars(module).items():
        if isinstance(value, Module):
            if key in children:
                state[key] = children[key]
        elif key != "_cache":
            state[key] = value
    return new
