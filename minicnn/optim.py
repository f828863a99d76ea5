"""Optimizers with PyTorch's update rules: SGD (momentum, Nesterov, dampening, weight decay), Adam
and AdamW.

The reference: each ``apply_step`` loops over the parameters and writes its class docstring's
formula in array code, NumPy or CuPy alike, updating the parameter's own arrays in place and never
waiting on the device. Hyper-parameters are plain attributes (``opt.lr``, ``opt.momentum``,
``opt.betas``) that schedulers change between steps; per-parameter buffers live in
``opt.state[i]`` and are made on the first step, on the parameter's device, and follow the
parameters when the model moves. The fast path, every parameter in one kernel launch and a step
a CUDA graph can record, is ``minicnn.fused.FusedAdam``/``FusedAdamW``, tested equal to these.
"""
import math
import numbers

import numpy as np

from .backend import device_of, get_array_module, to_device, to_numpy
from .module import Module, Parameter


class Optimizer:
    """Base class: the parameter list, hyper-parameters as attributes, per-parameter state.

    ``__init__(params, **defaults)``: the keyword names are the optimizer's hyper-parameters.
    Subclasses define ``apply_step`` (the update), ``_buffer_names`` (what ``state[i]`` may
    hold) and ``_checked_hyper`` (validation shared by the constructor and ``load_state_dict``).
    """

    _buffer_names = ()

    def __init__(self, params, **defaults):
        self.params = _param_list(type(self).__name__, params)
        self._hyper_names = tuple(defaults)
        self.__dict__.update(self._checked_hyper(defaults))
        self.step_count = 0
        self.state = [{} for _ in self.params]

    def _checked_hyper(self, hyper):
        """``hyper`` validated and normalised to plain Python values; raises ValueError."""
        raise NotImplementedError

    # A step has a host half and a device half, so that a CUDA graph can record the device half
    # once and the host half can still run before every replay (minicnn/fused/graph.py).
    capturable = False     # whether apply_step reads everything that changes from device memory

    @property
    def state_type(self):
        """The ``type`` entry of ``state_dict()``: the class name (a fused optimizer gives the
        plain one's, so that a state moves between the two)."""
        return type(self).__name__

    def step(self):
        """Update every parameter with ``requires_grad`` from its ``.grad``."""
        self.prepare_step()
        self.apply_step()

    def prepare_step(self):
        """The host half of ``step``: count the step (a fused optimizer also writes what its
        kernel reads)."""
        self.step_count += 1

    def apply_step(self):
        """The device half of ``step``: the update of step ``step_count`` from the current
        hyper-parameters."""
        raise NotImplementedError

    def zero_grad(self):
        """Set every parameter's gradient to zero (in place; the buffers are reused)."""
        for p in self.params:
            p.zero_grad()

    # --- helpers for step ------------------------------------------------------------------------

    def _trainable(self):
        return ((i, p) for i, p in enumerate(self.params) if p.requires_grad)

    def _buffer(self, i, name):
        """State buffer ``name`` of parameter ``i`` or None, on the parameter's device: a model
        moved after the optimizer was made takes its optimizer state along."""
        buf = self.state[i].get(name)
        data = self.params[i].data
        if buf is not None and get_array_module(buf) is not get_array_module(data):
            buf = self.state[i][name] = to_device(buf, device_of(data))
        return buf

    def _zeros(self, i, name):
        """State buffer ``name`` of parameter ``i``, made as zeros on its device when first used."""
        buf = self._buffer(i, name)
        if buf is None:
            data = self.params[i].data
            buf = self.state[i][name] = get_array_module(data).zeros_like(data)
        return buf

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self):
        """Everything needed to resume, with no pickle needed to save it::

            {"type": "Adam", "hyper": {"lr": ..., ...}, "step": int, "num_params": int,
             "buffers": {"<i>.<name>": numpy array}}   # e.g. "0.exp_avg"

        ``hyper`` is JSON-able; buffers are NumPy copies (fetched from the GPU if needed).
        """
        return {
            "type": self.state_type,
            "hyper": {k: _jsonable(getattr(self, k)) for k in self._hyper_names},
            "step": self.step_count,
            "num_params": len(self.params),
            "buffers": {f"{i}.{name}": to_numpy(buf).copy()
                        for i, s in enumerate(self.state) for name, buf in s.items()},
        }

    def check_state_dict(self, state):
        """Raise ValueError or TypeError, saying what was expected and what came, if ``state``
        cannot be loaded into this optimizer. Changes nothing."""
        self._parse_state(state)

    def load_state_dict(self, state):
        """Restore hyper-parameters, step count and buffers from ``state_dict()`` output.

        Everything is checked first (type, parameter count, buffer names and shapes), so a
        failed load changes nothing. Buffers are copied onto each parameter's device and dtype.
        """
        hyper, step, buffers = self._parse_state(state)
        self.__dict__.update(hyper)
        self.step_count = step
        self.state = [{} for _ in self.params]
        for (i, name), value in buffers.items():
            data = self.params[i].data
            self.state[i][name] = get_array_module(data).array(value, dtype=data.dtype)

    def _parse_state(self, state):
        owner, hyper, step = _check_state_head(self, "optimizer", state, "step")
        missing = [k for k in ("num_params", "buffers") if k not in state]
        if missing:
            raise ValueError(f"{owner}: state is missing the entries {missing}")
        if state["num_params"] != len(self.params):
            raise ValueError(f"{owner}: state is for {state['num_params']} parameters, "
                             f"this optimizer has {len(self.params)}")
        hyper = self._checked_hyper(hyper)

        if not isinstance(state["buffers"], dict):
            raise TypeError(f"{owner}: buffers must be a dict, "
                            f"got {type(state['buffers']).__name__}")
        buffers, names_of = {}, {}
        for key, value in state["buffers"].items():
            index, _, name = str(key).partition(".")
            known = index.isdigit() and int(index) < len(self.params)
            if not known or name not in self._buffer_names:
                raise ValueError(f"{owner}: unexpected buffer {key!r}; expected '<i>.<name>' with "
                                 f"i < {len(self.params)} and name in {list(self._buffer_names)}")
            p = self.params[int(index)]
            shape = tuple(getattr(value, "shape", ()))
            if shape != tuple(p.shape):
                raise ValueError(f"{owner}: buffer {key!r} has shape {shape}, "
                                 f"parameter {index} has shape {tuple(p.shape)}")
            dtype = getattr(value, "dtype", None)
            if dtype is None or np.dtype(dtype).kind != "f":
                raise ValueError(f"{owner}: buffer {key!r} must be a floating-point array, "
                                 f"got {type(value).__name__} of dtype {dtype}")
            buffers[int(index), name] = value
            names_of.setdefault(int(index), set()).add(name)
        for i, names in names_of.items():
            if names != set(self._buffer_names):
                raise ValueError(f"{owner}: parameter {i} has buffers {sorted(names)}, "
                                 f"expected all of {list(self._buffer_names)}")
        return hyper, step, buffers

    def __repr__(self):
        hyper = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._hyper_names)
        return f"{type(self).__name__}({len(self.params)} parameters, {hyper})"


class SGD(Optimizer):
    """Stochastic gradient descent, PyTorch's rule. Per parameter, with g = grad + weight_decay*p::

        buf = g                                  (first step: no dampening)
        buf = momentum*buf + (1 - dampening)*g   (later steps)
        d   = g + momentum*buf if nesterov else buf     (d = g when momentum == 0)
        p  -= lr * d
    """

    _buffer_names = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False, dampening=0.0):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)

    def _checked_hyper(self, hyper):
        owner = type(self).__name__
        out = {k: _check_real(owner, k, hyper[k]) for k in ("lr", "momentum", "weight_decay")}
        out["dampening"] = _check_real(owner, "dampening", hyper["dampening"], hi=1.0)
        out["nesterov"] = bool(hyper["nesterov"])
        if out["nesterov"] and (out["momentum"] <= 0 or out["dampening"] != 0):
            raise ValueError(f"{owner}: nesterov=True needs momentum > 0 and dampening == 0, got "
                             f"momentum={out['momentum']!r}, dampening={out['dampening']!r}")
        return out

    def apply_step(self):
        """One SGD update of every parameter with ``requires_grad`` (see the class docstring)."""
        lr, mu, dampening, wd = self.lr, self.momentum, self.dampening, self.weight_decay
        for i, p in self._trainable():
            g = p.grad + wd * p.data if wd else p.grad
            if mu:
                buf = self._buffer(i, "momentum_buffer")
                if buf is None:
                    buf = self.state[i]["momentum_buffer"] = g.copy()
                else:
                    buf[...] = mu * buf + (1 - dampening) * g
                g = g + mu * buf if self.nesterov else buf
            p.data -= lr * g


class Adam(Optimizer):
    """Adam, PyTorch's rule. At step t (1 on the first), for each parameter p with gradient grad::

        p *= 1 - lr*weight_decay          (AdamW only: decoupled weight decay)
        g  = grad + weight_decay*p        (Adam only: L2 weight decay; AdamW has g = grad)
        m  = beta1*m + (1 - beta1)*g
        v  = beta2*v + (1 - beta2)*g*g
        p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    ``apply_step`` computes it in PyTorch's order: m as m + (1 - beta1)*(g - m) (its ``lerp``),
    the last line as step_size * (m / denominator), each constant in double precision first.
    The same update in one kernel launch for every parameter, capturable in a CUDA graph:
    ``minicnn.fused.FusedAdam``.
    """

    _buffer_names = ("exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _checked_hyper(self, hyper):
        owner = type(self).__name__
        out = {k: _check_real(owner, k, hyper[k]) for k in ("lr", "eps", "weight_decay")}
        betas = hyper["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
        out["betas"] = tuple(_check_real(owner, f"betas[{j}]", b, hi=1.0, hi_open=True)
                             for j, b in enumerate(betas))
        return out

    def apply_step(self):
        """One Adam (or AdamW) update of every parameter with ``requires_grad``, in place."""
        lr, (beta1, beta2), eps, wd = self.lr, self.betas, self.eps, self.weight_decay
        t = self.step_count
        for i, p in self._trainable():
            m, v = self._zeros(i, "exp_avg"), self._zeros(i, "exp_avg_sq")
            sqrt = get_array_module(v).sqrt
            if self._decoupled:
                p.data *= 1 - lr * wd
            g = p.grad + wd * p.data if wd and not self._decoupled else p.grad
            m += (1 - beta1) * (g - m)
            v[...] = beta2 * v + (1 - beta2) * (g * g)
            p.data -= lr / (1 - beta1**t) * (m / (sqrt(v) / math.sqrt(1 - beta2**t) + eps))


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): each step first does
    ``p *= 1 - lr*weight_decay``, and the gradient is left as it is. Default weight_decay 1e-2."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# --- helpers -------------------------------------------------------------------------------------

def _param_list(owner, params):
    """``params`` as a list of distinct Parameters; raises naming what came instead."""
    if isinstance(params, Module):
        raise TypeError(f"{owner}: params must be an iterable of Parameter, got the module "
                        f"{type(params).__name__} itself; pass model.parameters()")
    if isinstance(params, Parameter):
        raise TypeError(f"{owner}: params must be an iterable of Parameter, got one Parameter; "
                        "wrap it in a list")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"{owner}: params must be an iterable of Parameter, "
                        f"got {type(params).__name__}") from None
    if not params:
        raise ValueError(f"{owner}: got an empty parameter list")
    first_seen = {}
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise TypeError(f"{owner}: params[{i}] must be a Parameter, got {type(p).__name__}")
        if id(p) in first_seen:
            raise ValueError(f"{owner}: params[{i}] is the same Parameter as "
                             f"params[{first_seen[id(p)]}]; each parameter may appear only once")
        first_seen[id(p)] = i
    return params


def _check_state_head(obj, kind, state, counter):
    """Check what optimizer and scheduler states share: a dict from ``state_dict()`` of this
    type, whose ``hyper`` holds exactly ``obj._hyper_names`` and whose ``counter`` entry is an
    integer >= 0. Returns (owner for messages, hyper, counter)."""
    owner = f"{type(obj).__name__}.load_state_dict"
    if not isinstance(state, dict):
        raise TypeError(f"{owner}: expected a dict from state_dict(), got {type(state).__name__}")
    missing = [k for k in ("type", "hyper", counter) if k not in state]
    if missing:
        raise ValueError(f"{owner}: state is missing the entries {missing}")
    expected = obj.state_type if isinstance(obj, Optimizer) else type(obj).__name__
    if state["type"] != expected:
        raise ValueError(f"{owner}: state is from a {state['type']} {kind}, expected {expected}")
    n = state[counter]
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{owner}: {counter} must be an integer >= 0, got {n!r}")
    hyper = state["hyper"]
    if not isinstance(hyper, dict) or set(hyper) != set(obj._hyper_names):
        got = sorted(hyper) if isinstance(hyper, dict) else type(hyper).__name__
        raise ValueError(f"{owner}: hyper must hold {sorted(obj._hyper_names)}, got {got}")
    return owner, hyper, int(n)


def _check_real(owner, name, value, hi=None, hi_open=False, positive=False):
    """``value`` as a float, checked to be a real number >= 0 (> 0 if ``positive``) and <= hi
    (< hi if ``hi_open``); the ValueError names ``owner`` and ``name``. NaN never passes."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
        value > 0 if positive else value >= 0)
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        bound = f"{'>' if positive else '>='} 0" + (
            "" if hi is None else f" and {'<' if hi_open else '<='} {hi}")
        raise ValueError(f"{owner}: {name} must be a number {bound}, got {value!r}")
    return float(value)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value
