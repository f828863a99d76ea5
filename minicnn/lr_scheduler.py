"""Learning-rate schedules with PyTorch's formulas: StepLR, CosineAnnealingLR, OneCycleLR.

A scheduler writes its value into ``optimizer.lr`` (OneCycleLR also into the momentum, or Adam's
beta1). Constructing one applies step 0, as PyTorch does; call ``step()`` once per epoch
(StepLR, CosineAnnealingLR) or once per batch (OneCycleLR), after ``optimizer.step()``.
Values come from closed forms of the step index, so a resumed schedule is exactly the one
that was saved.
"""
import copy
import math
import numbers

from .optim import Optimizer, _check_real, _check_state_head


class LRScheduler:
    """Base class. Subclasses give ``lr_at(t)``, the learning rate at step ``t`` (0 at
    construction), and ``_checked(hyper)``, the validation of the hyper-parameters that define
    the schedule, shared by the constructor and ``load_state_dict``.
    """

    def __init__(self, optimizer, **hyper):
        _check_optimizer(type(self).__name__, optimizer)
        self.optimizer = optimizer
        self._hyper_names = tuple(hyper)
        self.__dict__.update(self._checked(hyper))
        self.last_epoch = -1
        self.step()

    def _checked(self, hyper):
        """``hyper`` validated and normalised to JSON-able values; raises ValueError."""
        raise NotImplementedError

    def lr_at(self, t):
        """The learning rate after ``t`` calls of ``step()``."""
        raise NotImplementedError

    def _optimizer_values(self, t):
        """Optimizer attribute -> value at step ``t``; raises before anything changes."""
        return {"lr": self.lr_at(t)}

    def _apply(self, t):
        values = self._optimizer_values(t)
        for name, value in values.items():
            setattr(self.optimizer, name, value)
        self.last_epoch = t
        self._last_lr = values["lr"]

    def step(self):
        """Advance one step and set the optimizer's learning rate for it."""
        self._apply(self.last_epoch + 1)

    def get_last_lr(self):
        """The learning rate set by the latest ``step()`` (a float: minicnn has one lr)."""
        return self._last_lr

    def state_dict(self):
        """``{"type": name, "last_epoch": int, "hyper": {...}}``, all JSON-able."""
        return {"type": type(self).__name__, "last_epoch": self.last_epoch,
                "hyper": {k: getattr(self, k) for k in self._hyper_names}}

    def check_state_dict(self, state):
        """Raise ValueError or TypeError, saying what was expected and what came, if ``state``
        cannot be loaded into this scheduler. Changes nothing."""
        self._parse_state(state)

    def load_state_dict(self, state):
        """Restore the schedule and its position, and set the optimizer's values for that step.
        Checked first: a failed load changes nothing."""
        hyper, t = self._parse_state(state)
        self.__dict__.update(hyper)
        self._apply(t)

    def _parse_state(self, state):
        _, hyper, t = _check_state_head(self, "scheduler", state, "last_epoch")
        hyper = self._checked(hyper)
        # computing step t's values on a copy proves they exist before anything is changed
        probe = copy.copy(self)
        probe.__dict__.update(hyper)
        probe._optimizer_values(t)
        return hyper, t

    def __repr__(self):
        hyper = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._hyper_names)
        return f"{type(self).__name__}({hyper}, last_epoch={self.last_epoch})"


class StepLR(LRScheduler):
    """``lr = base_lr * gamma ** (t // step_size)``: decay by ``gamma`` every ``step_size`` steps.

    ``base_lr`` is the optimizer's lr when the scheduler is made.
    """

    def __init__(self, optimizer, step_size, gamma=0.1):
        _check_optimizer("StepLR", optimizer)
        super().__init__(optimizer, base_lr=optimizer.lr, step_size=step_size, gamma=gamma)

    def _checked(self, hyper):
        return {"base_lr": _check_real("StepLR", "base_lr", hyper["base_lr"]),
                "step_size": _positive_int("StepLR", "step_size", hyper["step_size"]),
                "gamma": _check_real("StepLR", "gamma", hyper["gamma"])}

    def lr_at(self, t):
        return self.base_lr * self.gamma ** (t // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``.

    Falls from ``base_lr`` (the optimizer's lr when made) to ``eta_min`` over ``T_max`` steps;
    past ``T_max`` it rises again, as PyTorch's does.
    """

    def __init__(self, optimizer, T_max, eta_min=0.0):
        _check_optimizer("CosineAnnealingLR", optimizer)
        super().__init__(optimizer, base_lr=optimizer.lr, T_max=T_max, eta_min=eta_min)

    def _checked(self, hyper):
        return {"base_lr": _check_real("CosineAnnealingLR", "base_lr", hyper["base_lr"]),
                "T_max": _positive_int("CosineAnnealingLR", "T_max", hyper["T_max"]),
                "eta_min": _check_real("CosineAnnealingLR", "eta_min", hyper["eta_min"])}

    def lr_at(self, t):
        cosine = 1 + math.cos(t * math.pi / self.T_max)
        return self.eta_min + (self.base_lr - self.eta_min) * cosine / 2


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin), PyTorch's formulas; one ``step()`` per batch.

    The lr rises from ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of
    ``total_steps``, then anneals to ``max_lr / div_factor / final_div_factor`` (with
    ``three_phase``: back down to the initial lr symmetrically, then to the minimum). With
    ``cycle_momentum`` the momentum (SGD) or beta1 (Adam) moves inversely between
    ``max_momentum`` and ``base_momentum``. Stepping past ``total_steps`` raises ValueError.
    """

    def __init__(self, optimizer, max_lr, total_steps, pct_start=0.3, anneal_strategy="cos",
                 div_factor=25.0, final_div_factor=1e4, three_phase=False, cycle_momentum=True,
                 base_momentum=0.85, max_momentum=0.95):
        super().__init__(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start,
                         anneal_strategy=anneal_strategy, div_factor=div_factor,
                         final_div_factor=final_div_factor, three_phase=three_phase,
                         cycle_momentum=cycle_momentum, base_momentum=base_momentum,
                         max_momentum=max_momentum)

    def _checked(self, hyper):
        owner = "OneCycleLR"
        out = {"max_lr": _check_real(owner, "max_lr", hyper["max_lr"]),
               "total_steps": _positive_int(owner, "total_steps", hyper["total_steps"]),
               "pct_start": _check_real(owner, "pct_start", hyper["pct_start"], hi=1.0),
               "div_factor": _check_real(owner, "div_factor", hyper["div_factor"], positive=True),
               "final_div_factor": _check_real(owner, "final_div_factor",
                                               hyper["final_div_factor"], positive=True),
               "three_phase": bool(hyper["three_phase"]),
               "cycle_momentum": bool(hyper["cycle_momentum"])}
        if hyper["anneal_strategy"] not in ("cos", "linear"):
            raise ValueError(f"{owner}: anneal_strategy must be 'cos' or 'linear', "
                             f"got {hyper['anneal_strategy']!r}")
        out["anneal_strategy"] = hyper["anneal_strategy"]
        for k in ("base_momentum", "max_momentum"):
            # beta1 = 1 would make Adam's bias correction divide by zero
            out[k] = _check_real(owner, k, hyper[k], hi=1.0, hi_open=True)
        if out["cycle_momentum"] and not (hasattr(self.optimizer, "momentum")
                                          or hasattr(self.optimizer, "betas")):
            raise ValueError(f"{owner}: cycle_momentum=True needs an optimizer with momentum or "
                             f"betas, got {type(self.optimizer).__name__}")
        return out

    def _phases(self):
        """(end step, start lr, end lr, start momentum, end momentum) of each phase."""
        initial = self.max_lr / self.div_factor
        low = initial / self.final_div_factor
        top, bottom = self.max_momentum, self.base_momentum
        n, pct = self.total_steps, self.pct_start
        if self.three_phase:
            return [(float(pct * n) - 1, initial, self.max_lr, top, bottom),
                    (float(2 * pct * n) - 2, self.max_lr, initial, bottom, top),
                    (n - 1, initial, low, top, top)]
        return [(float(pct * n) - 1, initial, self.max_lr, top, bottom),
                (n - 1, self.max_lr, low, bottom, top)]

    def _values_at(self, t):
        """(lr, momentum) at step ``t``."""
        if t > self.total_steps:
            raise ValueError(f"OneCycleLR: step {t} is past total_steps={self.total_steps}; "
                             "make the scheduler with a larger total_steps")
        phases = self._phases()
        start = 0.0
        for k, (end, lr0, lr1, m0, m1) in enumerate(phases):
            if t <= end or k == len(phases) - 1:
                # a phase of zero length (PyTorch divides by zero there) is at its end value
                pct = (t - start) / (end - start) if end != start else 1.0
                return self._anneal(lr0, lr1, pct), self._anneal(m0, m1, pct)
            start = end

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def lr_at(self, t):
        return self._values_at(t)[0]

    def _optimizer_values(self, t):
        lr, momentum = self._values_at(t)
        if not self.cycle_momentum:
            return {"lr": lr}
        if hasattr(self.optimizer, "betas"):
            return {"lr": lr, "betas": (momentum, self.optimizer.betas[1])}
        return {"lr": lr, "momentum": momentum}


# --- helpers -------------------------------------------------------------------------------------

def _check_optimizer(owner, optimizer):
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{owner}: optimizer must be a minicnn Optimizer, "
                        f"got {type(optimizer).__name__}")


def _positive_int(owner, name, value):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)
