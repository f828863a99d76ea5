"""Check a layer's hand-written backward against central finite differences in float64."""
import copy

import numpy as np

from ..backend import rng, to_numpy
from ..errors import GradcheckError


def gradcheck(layer, x, eps=1e-6, atol=1e-5, rtol=1e-4, seed=0, raise_exception=True):
    """Compare ``layer.backward`` with central differences of L = sum(layer(x) * dy).

    Works on a float64 copy of ``layer`` and ``x`` (the layer given is not touched), in training
    mode, with the random generator rewound before every forward so dropout masks repeat. dy is
    random (fixed ``seed``), never ones, so a wrong index or transpose cannot cancel out.

    Checks the input gradient and every parameter gradient, element by element:
    |analytic - numeric| <= atol + rtol * |numeric|. Returns a dict name -> max relative error
    (``"input"`` and each parameter name); raises ``GradcheckError`` on a mismatch unless
    ``raise_exception=False``.
    """
    layer = copy.deepcopy(layer).to("cpu").train()
    for p in layer.parameters():
        p.data = p.data.astype(np.float64)
        p.grad = np.zeros_like(p.data)
    x = np.array(to_numpy(x), dtype=np.float64)
    state = rng().bit_generator.state

    def run(inp):
        rng().bit_generator.state = state
        return layer.forward(inp)

    y = run(x)
    dy = np.random.default_rng(seed).standard_normal(y.shape)
    dy_before = dy.copy()
    dx = np.asarray(layer.backward(dy))
    if not np.array_equal(dy, dy_before):
        raise GradcheckError(f"{type(layer).__name__}.backward modified dy in place")
    if dx.shape != x.shape:
        raise GradcheckError(f"{type(layer).__name__}.backward returned dx of shape {dx.shape}, "
                             f"expected the input's {x.shape}")

    def loss():
        out = run(x)
        layer._cache = None
        return float(np.sum(out * dy))

    checks = [("input", x, dx)] + [(n, p.data, p.grad) for n, p in layer.named_parameters()]
    report = {}
    for name, values, analytic in checks:
        numeric = np.zeros_like(values)
        for i in np.ndindex(values.shape):
            orig = values[i]
            values[i] = orig + eps
            up = loss()
            values[i] = orig - eps
            down = loss()
            values[i] = orig
            numeric[i] = (up - down) / (2 * eps)
        err = np.abs(analytic - numeric)
        report[name] = float(np.max(err / (np.abs(numeric) + atol))) if err.size else 0.0
        bad = err > atol + rtol * np.abs(numeric)
        if bad.any() and raise_exception:
            i = np.unravel_index(np.argmax(err - rtol * np.abs(numeric)), err.shape)
            raise GradcheckError(
                f"{type(layer).__name__}: gradient of {name} disagrees with finite differences at "
                f"{tuple(int(k) for k in i)}: analytic {analytic[i]:.8g}, numeric {numeric[i]:.8g} "
                f"({int(bad.sum())} of {bad.size} elements off; atol={atol}, rtol={rtol})")
    return report
