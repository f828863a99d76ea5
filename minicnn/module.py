"""Parameter, Module and Sequential: the manual-backward contract every layer follows.

Contract (no autograd anywhere):
- ``forward(x)`` computes the output and, in training mode only, caches what backward needs;
- ``backward(dy, input_grad=True) -> dx`` returns the gradient w.r.t. the input, *adds* each
  parameter gradient into ``Parameter.grad`` and never mutates ``dy``. ``input_grad=False`` says
  the caller has no use for dx (the input is data, as when PyTorch's input does not require a
  gradient): a layer with parameters then skips that work and returns None;
- ``output_shape(in_shape)`` is the shape check: it names the layer, what it expected and what
  came, and is what ``summary`` prints.
"""
from collections import OrderedDict

import numpy as np

from .backend import device, device_of, get_array_module, get_default_dtype, to_device, to_numpy
from .errors import ShapeError


class Parameter:
    """A trainable array and its gradient, both arrays of the model's backend.

    ``grad`` always exists (zeros after ``zero_grad``), so backward passes add into it in place
    and the same buffers serve every step.
    """

    __slots__ = ("data", "grad", "requires_grad")

    def __init__(self, data, requires_grad=True):
        xp = get_array_module(data)
        self.data = data
        self.grad = xp.zeros_like(data)
        self.requires_grad = requires_grad

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def device(self):
        return device_of(self.data)

    @property
    def size(self):
        return self.data.size

    def zero_grad(self):
        self.grad.fill(0)

    def __repr__(self):
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class Module:
    """Base class of every layer and model.

    Parameters and sub-modules are found by walking the instance attributes in the order they
    were assigned, so ``parameters()`` follows definition order (weight before bias) and
    ``state_dict()`` keys read like PyTorch's (``"0.weight"``, ``"fc.bias"``). Buffers are
    arrays of state that is not trained (BatchNorm's running statistics): ``register_buffer``
    names them, and they are saved, loaded and moved with the parameters.
    """

    training = True
    _cache = None     # what the last training-mode forward kept for backward

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def backward(self, dy, input_grad=True):
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    def _pop_cache(self):
        """Hand backward what forward kept, and drop it so its memory is freed after the step."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without a training-mode "
                               "forward before it (eval mode caches nothing)")
        cache, self._cache = self._cache, None
        return cache

    def output_shape(self, in_shape):
        """Shape of ``forward``'s output for an input of ``in_shape``; raises ``ShapeError``."""
        return tuple(in_shape)

    # --- walking the tree --------------------------------------------------------------------

    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self):
        return [m for _, m in self.named_children()]

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix=""):
        for name, value in vars(self).items():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(value, Parameter):
                yield full, value
            elif isinstance(value, Module):
                yield from value.named_parameters(full)

    def parameters(self):
        """All parameters, in definition order (weight before bias)."""
        return [p for _, p in self.named_parameters()]

    def register_buffer(self, name, value):
        """Make attribute ``name`` a buffer: state that is saved, loaded and moved with the
        parameters but never trained (an array; None for "none", left out of ``state_dict``).

        Assigning the attribute later (``self.running_mean = ...``) keeps it a buffer.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{type(self).__name__}.register_buffer: name must be an identifier, "
                             f"got {name!r}")
        if value is not None and not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(f"{type(self).__name__}.register_buffer: '{name}' must be an array or "
                            f"None, got {type(value).__name__}")
        if isinstance(vars(self).get(name), (Parameter, Module)):
            raise ValueError(f"{type(self).__name__}.register_buffer: '{name}' is already a "
                             "parameter or sub-module")
        names = vars(self).setdefault("_buffer_names", [])
        if name not in names:
            names.append(name)
        setattr(self, name, value)

    def _own_buffers(self):
        """(name, array) of this module's own buffers, in registration order; None ones skipped."""
        for name in vars(self).get("_buffer_names", ()):
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def named_buffers(self, prefix=""):
        """(name, array) of every buffer: this module's own, then each child's, as PyTorch."""
        for name, value in self._own_buffers():
            yield (f"{prefix}.{name}" if prefix else name), value
        for name, child in self.named_children():
            yield from child.named_buffers(f"{prefix}.{name}" if prefix else name)

    def buffers(self):
        """All buffers (arrays), in ``named_buffers`` order."""
        return [b for _, b in self.named_buffers()]

    def _named_state(self, prefix=""):
        """(name, Parameter or buffer array) in PyTorch's state_dict order: each module's own
        parameters, then its own buffers, then its children."""
        children = []
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield (f"{prefix}.{name}" if prefix else name), value
            elif isinstance(value, Module):
                children.append((name, value))
        for name, value in self._own_buffers():
            yield (f"{prefix}.{name}" if prefix else name), value
        for name, child in children:
            yield from child._named_state(f"{prefix}.{name}" if prefix else name)

    def num_parameters(self):
        return sum(int(p.size) for p in self.parameters())

    # --- modes, devices, gradients -----------------------------------------------------------

    def train(self, mode=True):
        for _, m in self.named_modules():
            m.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def freeze(self):
        """Set ``requires_grad = False`` on every parameter: optimizers leave them as they are.
        Backward still runs through the module (layers before it may be training); returns self."""
        for p in self.parameters():
            p.requires_grad = False
        return self

    def unfreeze(self):
        """Set ``requires_grad = True`` on every parameter again; returns self."""
        for p in self.parameters():
            p.requires_grad = True
        return self

    def to(self, dev):
        """Move every parameter (values and gradients) and buffer to ``dev``; returns self."""
        dev = device(dev)
        for p in self.parameters():
            p.data = to_device(p.data, dev)
            p.grad = to_device(p.grad, dev)
        for _, m in self.named_modules():
            for name, value in list(m._own_buffers()):
                setattr(m, name, to_device(value, dev))
        return self

    @property
    def device(self):
        params = self.parameters()
        return params[0].device if params else device("cpu")

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self):
        """An ordered dict of name -> NumPy copy of each parameter's and buffer's values, in
        PyTorch's order (a module's own parameters, its own buffers, then its children)."""
        return OrderedDict((name, to_numpy(v.data if isinstance(v, Parameter) else v).copy())
                           for name, v in self._named_state())

    def load_state_dict(self, state, strict=True):
        """Copy values from ``state`` (name -> array) into the parameters and buffers, in place.

        Names and shapes must match; with ``strict=False`` missing and unexpected names are
        allowed (shapes still must match). Everything is checked before anything is written.
        Values keep each parameter's (buffer's) device and dtype.
        """
        own = OrderedDict(self._named_state())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"{type(self).__name__}.load_state_dict: state does not match the model; "
                           f"missing keys {missing}, unexpected keys {unexpected}")
        for name, target in own.items():
            if name in state and tuple(state[name].shape) != tuple(target.shape):
                raise ShapeError(f"{type(self).__name__}.load_state_dict: '{name}' expected shape "
                                 f"{tuple(target.shape)}, got {tuple(state[name].shape)}")
        for name, target in own.items():
            if name not in state:
                continue
            data = target.data if isinstance(target, Parameter) else target
            xp = get_array_module(data)
            data[...] = xp.asarray(state[name]).astype(data.dtype, copy=False)

    # --- printing ------------------------------------------------------------------------------

    def summary(self, input_shape):
        """A table of each layer's output shape and parameter count for an input of ``input_shape``.

        ``input_shape`` includes the batch dimension, e.g. ``(1, 1, 28, 28)``.
        """
        rows = []
        shape = tuple(input_shape)
        layers = list(self.named_children()) if isinstance(self, Sequential) else [("", self)]
        for name, layer in layers:
            shape = layer.output_shape(shape)
            rows.append((f"{name} {type(layer).__name__}".strip(), str(shape), layer.num_parameters()))
        width = max(len(r[0]) for r in rows + [("layer", "", 0)])
        swidth = max(len(r[1]) for r in rows + [("", "output shape", 0)])
        lines = [f"{'layer':<{width}}  {'output shape':<{swidth}}  {'params':>10}"]
        lines.append("-" * len(lines[0]))
        lines += [f"{n:<{width}}  {s:<{swidth}}  {c:>10,}" for n, s, c in rows]
        lines.append("-" * len(lines[0]))
        lines.append(f"total parameters: {self.num_parameters():,}")
        return "\n".join(lines)

    def extra_repr(self):
        return ""

    def __repr__(self):
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        body = "\n".join(f"  ({n}): " + repr(m).replace("\n", "\n  ") for n, m in children)
        return f"{type(self).__name__}(\n{body}\n)"


class Sequential(Module):
    """Layers applied in order, each running its own forward; ``backward`` runs their backwards
    in reverse. Indexable like a list.

    ``Sequential(layer0, layer1, ...)`` names the layers "0", "1", ...;
    ``Sequential(OrderedDict([("conv", layer), ...]))`` gives them names of your choice (which
    ``state_dict`` keys start with), as PyTorch. ``model[i]`` is the i-th layer in order whatever
    the names, and ``model[i:j]`` a Sequential of those layers under their names.
    """

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], OrderedDict):
            named = list(layers[0].items())
        else:
            named = [(str(i), layer) for i, layer in enumerate(layers)]
        for name, layer in named:
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: layer {name!r} must be a Module, got "
                                f"{type(layer).__name__}")
            if not isinstance(name, str) or not name or "." in name or hasattr(self, name):
                raise ValueError(f"Sequential: layer names must be distinct non-empty strings "
                                 f"without a dot that are not attributes of Sequential, got "
                                 f"{name!r}")
            setattr(self, name, layer)

    def _layers(self):
        return [m for _, m in self.named_children()]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequential(OrderedDict(list(self.named_children())[i]))
        return self._layers()[i]

    def __len__(self):
        return len(self._layers())

    def __iter__(self):
        return iter(self._layers())

    def forward(self, x):
        for layer in self._layers():
            x = layer.forward(x)
        return x

    def backward(self, dy, input_grad=True):
        layers = self._layers()
        first = 0
        if not input_grad:
            # Without dx wanted, the layers before the first one with parameters need no backward.
            first = next((i for i, m in enumerate(layers) if m.parameters()), len(layers))
            for layer in layers[:first]:
                layer._cache = None
        for i in range(len(layers) - 1, first - 1, -1):
            dy = layers[i].backward(dy, input_grad=input_grad or i > first)
        return dy

    def output_shape(self, in_shape):
        for layer in self._layers():
            in_shape = layer.output_shape(in_shape)
        return in_shape


def new_param(values):
    """A ``Parameter`` made from host values in the default dtype (on the CPU; ``Module.to`` moves)."""
    return Parameter(np.ascontiguousarray(values, dtype=get_default_dtype()))


def training_modes(model):
    """(module, training) of every module of ``model``: ``restore_modes`` puts them back as they
    were, a frozen BatchNorm left in eval mode inside a training model included."""
    return [(m, m.training) for _, m in model.named_modules()]


def restore_modes(modes):
    for m, training in modes:
        m.training = training
