"""Optimizers against their update rules written out by hand in float64, state round trips, and
the learning-rate schedulers against hand-computed values and (when installed) PyTorch."""
import json
import math

import numpy as np
import pytest

from minicnn.lr_scheduler import CosineAnnealingLR, OneCycleLR, StepLR
from minicnn.module import Module, Parameter, new_param
from minicnn.optim import SGD, Adam, AdamW

from conftest import adam_step_float64

SHAPES = [(3, 4), (4,)]
STEPS = 4


def make_params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]


def grad_sequence(seed=1, steps=STEPS + 2):
    """steps lists of gradients, one per parameter of SHAPES, never zero."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in SHAPES] for _ in range(steps)]


def run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad[...] = g
        opt.step()


# --- hand-written references (float64, the textbook form of each rule) -----------------------

def sgd_reference(p, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    p, buf = p.copy(), None
    for g in grads:
        g = g + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p


def adam_reference(p, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    m = v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p, m, v = adam_step_float64(p, g, m, v, lr, *betas, eps, weight_decay, t, decoupled)
    return p


SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.8, dampening=0.3),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.1, weight_decay=0.05),
    dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
    dict(lr=0.05, momentum=0.7, dampening=0.5, weight_decay=0.1),
]
ADAM_CONFIGS = [
    dict(lr=0.01),
    dict(lr=0.05, betas=(0.8, 0.99), eps=1e-3),  # a large eps shows where eps is added
    dict(lr=0.02, weight_decay=0.1),
    dict(lr=0.02, betas=(0.0, 0.5), eps=1e-6, weight_decay=0.3),
]


@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=str)
def test_sgd_matches_rule(cfg):
    params, grads = make_params(), grad_sequence()[:STEPS]
    start = [p.data.copy() for p in params]
    run(SGD(params, **cfg), params, grads)
    for j, p in enumerate(params):
        ref = sgd_reference(start[j], [gs[j] for gs in grads], **cfg)
        np.testing.assert_allclose(p.data, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("cfg", ADAM_CONFIGS, ids=str)
def test_adam_matches_rule(cfg, decoupled):
    cls = AdamW if decoupled else Adam
    cfg = dict(cfg, weight_decay=cfg.get("weight_decay", 0.0))
    params, grads = make_params(), grad_sequence()[:STEPS]
    start = [p.data.copy() for p in params]
    run(cls(params, **cfg), params, grads)
    for j, p in enumerate(params):
        ref = adam_reference(start[j], [gs[j] for gs in grads], decoupled=decoupled, **cfg)
        np.testing.assert_allclose(p.data, ref, rtol=1e-12, atol=1e-14)


def test_sgd_by_hand_numbers():
    # one scalar, values worked out on paper: lr 0.1, momentum 0.9, dampening 0.5, grads 1, 2
    p = Parameter(np.array([1.0]))
    opt = SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    p.grad[...] = 1.0
    opt.step()  # buf = 1 (first step: no dampening); p = 1 - 0.1
    assert p.data[0] == pytest.approx(0.9, abs=1e-15)
    p.grad[...] = 2.0
    opt.step()  # buf = 0.9*1 + 0.5*2 = 1.9; p = 0.9 - 0.19
    assert p.data[0] == pytest.approx(0.71, abs=1e-15)
    assert opt.state[0]["momentum_buffer"][0] == pytest.approx(1.9, abs=1e-15)


def test_adam_first_step_by_hand():
    # at t=1 the bias corrections make m_hat = g and v_hat = g^2, so p -= lr * g / (|g| + eps)
    p = Parameter(np.array([2.0, -1.0]))
    opt = Adam([p], lr=0.1, eps=0.5)
    p.grad[...] = [0.5, -1.0]
    opt.step()
    np.testing.assert_allclose(p.data, [2.0 - 0.1 * 0.5 / 1.0, -1.0 + 0.1 * 1.0 / 1.5], rtol=1e-14)


def test_adam_and_adamw_differ_only_with_weight_decay():
    grads = grad_sequence()[:STEPS]
    results = {}
    for cls in (Adam, AdamW):
        for wd in (0.0, 0.1):
            params = make_params()
            run(cls(params, lr=0.01, weight_decay=wd), params, grads)
            results[cls.__name__, wd] = params[0].data
    np.testing.assert_array_equal(results["Adam", 0.0], results["AdamW", 0.0])
    assert np.abs(results["Adam", 0.1] - results["AdamW", 0.1]).max() > 1e-4


def test_adamw_default_weight_decay():
    assert AdamW(make_params()).weight_decay == 1e-2
    assert Adam(make_params()).weight_decay == 0.0


def test_float32_params_stay_float32_and_in_place():
    params = make_params(dtype=np.float32)
    arrays = [p.data for p in params]
    opt = Adam(params, lr=0.01, weight_decay=0.1)
    run(opt, params, grad_sequence()[:2])
    for p, a in zip(params, arrays):
        assert p.data is a and p.data.dtype == np.float32
        assert opt.state[0]["exp_avg"].dtype == np.float32


def test_step_leaves_gradients_alone():
    params = make_params()
    grads = grad_sequence()[:1]
    run(SGD(params, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1), params, grads)
    run(Adam(params, lr=0.1, weight_decay=0.1), params, grads)
    for p, g in zip(params, grads[0]):
        np.testing.assert_array_equal(p.grad, g)


def test_frozen_parameters_are_skipped():
    params = make_params()
    params[1].requires_grad = False
    frozen = params[1].data.copy()
    opt = Adam(params, lr=0.1)
    run(opt, params, grad_sequence()[:2])
    np.testing.assert_array_equal(params[1].data, frozen)
    assert opt.state[1] == {} and set(opt.state[0]) == {"exp_avg", "exp_avg_sq"}


def test_zero_grad():
    params = make_params()
    for p in params:
        p.grad[...] = 1.0
    SGD(params, lr=0.1).zero_grad()
    assert all(not p.grad.any() for p in params)


def test_works_on_module_parameters():
    class Tiny(Module):
        def __init__(self):
            self.weight = new_param(np.arange(6.0).reshape(2, 3) + 1)
            self.bias = new_param(np.ones(2))

    model = Tiny()
    before = model.weight.data.copy()
    opt = SGD(model.parameters(), lr=0.5)
    model.weight.grad[...] = 1.0
    opt.step()
    np.testing.assert_allclose(model.weight.data, before - 0.5)


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda ps: SGD(ps, lr=-0.1), "SGD: lr must be a number >= 0, got -0.1"),
    (lambda ps: SGD(ps, lr=float("nan")), "lr"),
    (lambda ps: SGD(ps, lr=0.1, momentum=-0.5), "momentum"),
    (lambda ps: SGD(ps, lr=0.1, weight_decay=-1), "weight_decay"),
    (lambda ps: SGD(ps, lr=0.1, dampening=1.5), "dampening"),
    (lambda ps: SGD(ps, lr=0.1, nesterov=True), "nesterov=True needs momentum > 0"),
    (lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening == 0"),
    (lambda ps: SGD(ps, lr="0.1"), "lr"),
    (lambda ps: Adam(ps, lr=-1e-3), "Adam: lr"),
    (lambda ps: Adam(ps, betas=(1.0, 0.999)), r"betas\[0\] must be a number >= 0 and < 1.0"),
    (lambda ps: Adam(ps, betas=(0.9, -0.1)), r"betas\[1\]"),
    (lambda ps: Adam(ps, betas=0.9), "betas must be a pair"),
    (lambda ps: Adam(ps, eps=-1e-8), "eps"),
    (lambda ps: AdamW(ps, weight_decay=-0.01), "AdamW: weight_decay"),
])
def test_hyper_parameter_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make(make_params())


def test_params_validation():
    params = make_params()
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[1\] must be a Parameter, got ndarray"):
        SGD([params[0], np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[2\] is the same Parameter as params\[0\]"):
        Adam([params[0], params[1], params[0]])
    with pytest.raises(TypeError, match=r"pass model.parameters\(\)"):
        SGD(Module(), lr=0.1)
    with pytest.raises(TypeError, match="got one Parameter"):
        SGD(params[0], lr=0.1)
    with pytest.raises(TypeError, match="got int"):
        SGD(3, lr=0.1)
    assert SGD(iter(params), lr=0.1).params == params  # generators are fine


# --- state_dict --------------------------------------------------------------------------------

ALL_CONFIGS = ([(SGD, c) for c in SGD_CONFIGS] + [(Adam, c) for c in ADAM_CONFIGS]
               + [(AdamW, dict(lr=0.01, weight_decay=0.2))])


@pytest.mark.parametrize("cls, cfg", ALL_CONFIGS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_state_dict_resumes_identically(cls, cfg):
    grads = grad_sequence(steps=5)
    straight = make_params()
    run(cls(straight, **cfg), straight, grads)

    first = make_params()
    opt = cls(first, **cfg)
    run(opt, first, grads[:3])
    state = opt.state_dict()
    json.dumps({k: v for k, v in state.items() if k != "buffers"})  # all but buffers is JSON
    assert state["type"] == cls.__name__ and state["step"] == 3
    assert all(type(b) is np.ndarray for b in state["buffers"].values())

    resumed = [Parameter(p.data.copy()) for p in first]
    other = dict(cfg, lr=123.0) if cls is not SGD else dict(lr=123.0)
    opt2 = cls(resumed, **other)  # the loaded state replaces these hyper-parameters
    opt2.load_state_dict(state)
    run(opt2, resumed, grads[3:])
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a.data, b.data)


def test_state_dict_is_a_copy():
    params = make_params()
    opt = Adam(params)
    run(opt, params, grad_sequence()[:1])
    state = opt.state_dict()
    saved = state["buffers"]["0.exp_avg"].copy()
    run(opt, params, grad_sequence(seed=5)[:1])
    np.testing.assert_array_equal(state["buffers"]["0.exp_avg"], saved)


def test_load_state_dict_casts_to_parameter_dtype():
    src = make_params()
    opt = Adam(src)
    run(opt, src, grad_sequence()[:1])
    dst = make_params(dtype=np.float32)
    opt32 = Adam(dst)
    opt32.load_state_dict(opt.state_dict())
    assert opt32.state[0]["exp_avg"].dtype == np.float32
    assert opt32.betas == (0.9, 0.999)


def _trained_state(cls=Adam, **cfg):
    params = make_params()
    opt = cls(params, **cfg)
    run(opt, params, grad_sequence()[:2])
    return opt.state_dict()


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s.update(type="SGD"), "state is from a SGD optimizer, expected Adam"),
    (lambda s: s.update(num_params=3), "state is for 3 parameters, this optimizer has 2"),
    (lambda s: s["buffers"].update({"0.exp_avg": np.zeros((4, 3))}),
     r"buffer '0.exp_avg' has shape \(4, 3\), parameter 0 has shape \(3, 4\)"),
    (lambda s: s["buffers"].update({"2.exp_avg": np.zeros(4)}), "unexpected buffer '2.exp_avg'"),
    (lambda s: s["buffers"].update({"0.velocity": np.zeros((3, 4))}), "unexpected buffer"),
    (lambda s: s["buffers"].pop("1.exp_avg_sq"), "parameter 1 has buffers"),
    (lambda s: s["hyper"].pop("eps"), "hyper must hold"),
    (lambda s: s["hyper"].update(lr=-1.0), "lr must be a number >= 0"),
    (lambda s: s.update(step=-2), "step must be an integer >= 0"),
    (lambda s: s.pop("step"), "missing the entries"),
])
def test_load_state_dict_rejects_mismatches_and_changes_nothing(mutate, match):
    state = _trained_state()
    mutate(state)
    params = make_params()
    opt = Adam(params, lr=0.5)
    run(opt, params, grad_sequence(seed=9)[:1])
    before = opt.state_dict()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert after["hyper"] == before["hyper"] and after["step"] == before["step"]
    for k, v in before["buffers"].items():
        np.testing.assert_array_equal(after["buffers"][k], v)


# --- schedulers: hand-written values -----------------------------------------------------------

def lrs(scheduler, n):
    """The lr at construction and after each of n - 1 steps, read from the optimizer."""
    out = [scheduler.optimizer.lr]
    for _ in range(n - 1):
        scheduler.step()
        assert scheduler.get_last_lr() == scheduler.optimizer.lr
        out.append(scheduler.optimizer.lr)
    return out


def test_steplr_by_hand():
    opt = SGD(make_params(), lr=1.0)
    assert lrs(StepLR(opt, step_size=2, gamma=0.5), 7) == pytest.approx(
        [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125], abs=1e-15)


def test_cosine_by_hand():
    opt = SGD(make_params(), lr=1.0)
    c = math.cos(math.pi / 4)
    expected = [1.0, 0.1 + 0.9 * (1 + c) / 2, 0.55, 0.1 + 0.9 * (1 - c) / 2, 0.1,
                0.1 + 0.9 * (1 - c) / 2]  # past T_max it rises again, as torch's does
    got = lrs(CosineAnnealingLR(opt, T_max=4, eta_min=0.1), 6)
    assert got == pytest.approx(expected, abs=1e-15)


def test_onecycle_by_hand():
    # max_lr 1, 10 steps, 30% warm-up: phase one ends at step 3 - 1 = 2, phase two at 9
    opt = SGD(make_params(), lr=0.123, momentum=0.9)
    sched = OneCycleLR(opt, max_lr=1.0, total_steps=10)
    assert opt.lr == pytest.approx(0.04) and opt.momentum == pytest.approx(0.95)
    got = lrs(sched, 11)
    low = 0.04 / 1e4
    pct = 3 / 7  # step 5: 3 of the 7 steps of phase two
    assert got[:3] == pytest.approx([0.04, 0.52, 1.0], abs=1e-15)
    assert got[5] == pytest.approx(low + (1 - low) / 2 * (1 + math.cos(math.pi * pct)), abs=1e-15)
    assert got[9] == pytest.approx(low, abs=1e-15)
    assert opt.momentum == pytest.approx(0.95 + (0.85 - 0.95) / 2 * (1 + math.cos(math.pi * 8 / 7)))
    with pytest.raises(ValueError, match="step 11 is past total_steps=10"):
        sched.step()
    assert sched.last_epoch == 10 and opt.lr == got[10]  # the failed step changed nothing


def test_onecycle_linear_three_phase_by_hand():
    # 10 steps, pct_start 0.25: phases end at 1.5, 3.0 and 9
    opt = Adam(make_params(), lr=0.5, betas=(0.9, 0.99))
    sched = OneCycleLR(opt, max_lr=2.0, total_steps=10, pct_start=0.25, anneal_strategy="linear",
                       div_factor=4.0, final_div_factor=10.0, three_phase=True)
    got = lrs(sched, 10)
    assert got[:4] == pytest.approx([0.5, 0.5 + 1.5 / 1.5, 2.0 - 1.5 * (0.5 / 1.5), 0.5])
    assert got[9] == pytest.approx(0.05)
    assert opt.betas == (pytest.approx(0.95), 0.99)


def test_onecycle_cycles_momentum_only_when_asked():
    opt = SGD(make_params(), lr=0.1, momentum=0.5)
    OneCycleLR(opt, max_lr=1.0, total_steps=5, cycle_momentum=False).step()
    assert opt.momentum == 0.5


@pytest.mark.parametrize("make, match", [
    (lambda o: StepLR(o, step_size=0), "step_size must be a positive integer"),
    (lambda o: StepLR(o, step_size=1.5), "step_size"),
    (lambda o: StepLR(o, step_size=2, gamma=-1), "gamma"),
    (lambda o: CosineAnnealingLR(o, T_max=0), "T_max"),
    (lambda o: CosineAnnealingLR(o, T_max=5, eta_min=-1), "eta_min"),
    (lambda o: OneCycleLR(o, max_lr=1.0, total_steps=0), "total_steps"),
    (lambda o: OneCycleLR(o, max_lr=-1.0, total_steps=10), "max_lr"),
    (lambda o: OneCycleLR(o, max_lr=1.0, total_steps=10, pct_start=1.5), "pct_start"),
    (lambda o: OneCycleLR(o, max_lr=1.0, total_steps=10, anneal_strategy="exp"), "anneal_strategy"),
    (lambda o: OneCycleLR(o, max_lr=1.0, total_steps=10, div_factor=0),
     "div_factor must be a number > 0"),
    (lambda o: OneCycleLR(o, max_lr=1.0, total_steps=10, max_momentum=1.0), "max_momentum"),
])
def test_scheduler_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make(SGD(make_params(), lr=0.1, momentum=0.9))


def test_scheduler_needs_an_optimizer():
    with pytest.raises(TypeError, match="StepLR: optimizer must be a minicnn Optimizer, got dict"):
        StepLR({"lr": 0.1}, step_size=2)


SCHEDULERS = [
    (StepLR, dict(step_size=3, gamma=0.5)),
    (CosineAnnealingLR, dict(T_max=7, eta_min=1e-3)),
    (OneCycleLR, dict(max_lr=0.5, total_steps=20)),
    (OneCycleLR, dict(max_lr=0.5, total_steps=20, pct_start=0.4, anneal_strategy="linear",
                      three_phase=True, div_factor=10.0, final_div_factor=100.0)),
]


@pytest.mark.parametrize("opt_cls", [SGD, Adam])
@pytest.mark.parametrize("cls, kw", SCHEDULERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_scheduler_state_dict_round_trip(cls, kw, opt_cls):
    opt_kw = dict(lr=0.1, momentum=0.9) if opt_cls is SGD else dict(lr=0.1)
    opt = opt_cls(make_params(), **opt_kw)
    sched = cls(opt, **kw)
    for _ in range(6):
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    saved_lr = opt.lr
    expected = lrs(sched, 8)

    opt2 = opt_cls(make_params(), **dict(opt_kw, lr=0.7))
    sched2 = cls(opt2, **kw)
    sched2.load_state_dict(state)
    assert opt2.lr == saved_lr  # loading puts the optimizer at the saved step
    assert lrs(sched2, 8) == expected
    assert (opt2.momentum if opt_cls is SGD else opt2.betas) == \
        (opt.momentum if opt_cls is SGD else opt.betas)


def test_scheduler_load_rejects_mismatches():
    opt = SGD(make_params(), lr=0.1, momentum=0.9)
    sched = OneCycleLR(opt, max_lr=1.0, total_steps=10)
    with pytest.raises(ValueError, match="state is from a StepLR scheduler, expected OneCycleLR"):
        sched.load_state_dict(StepLR(SGD(make_params(), lr=0.1), 2).state_dict())
    bad = sched.state_dict()
    bad["last_epoch"] = 11
    with pytest.raises(ValueError, match="past total_steps"):
        sched.load_state_dict(bad)
    assert sched.last_epoch == 0 and opt.lr == pytest.approx(0.04)


# --- schedulers: PyTorch as the reference -------------------------------------------------------

@pytest.mark.parametrize("opt_cls", [SGD, Adam])
@pytest.mark.parametrize("cls, kw", SCHEDULERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_schedulers_match_torch(cls, kw, opt_cls):
    torch = pytest.importorskip("torch", reason="PyTorch is the optional reference for schedulers")
    import warnings

    opt_kw = dict(lr=0.1, momentum=0.9) if opt_cls is SGD else dict(lr=0.1)
    opt = opt_cls(make_params(), **opt_kw)
    topt = getattr(torch.optim, opt_cls.__name__)([torch.zeros(2, requires_grad=True)], **opt_kw)
    sched = cls(opt, **kw)
    tsched = getattr(torch.optim.lr_scheduler, cls.__name__)(topt, **kw)
    group = topt.param_groups[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that its optimizer.step() was never called
        for _ in range(20):
            expected = tsched.get_last_lr()[0]
            assert sched.get_last_lr() == pytest.approx(expected, rel=1e-12, abs=1e-15)
            assert opt.lr == pytest.approx(group["lr"], rel=1e-12, abs=1e-15)
            if opt_cls is SGD:
                assert opt.momentum == pytest.approx(group["momentum"], rel=1e-12)
            else:
                assert opt.betas == pytest.approx(group["betas"], rel=1e-12)
            sched.step()
            tsched.step()


@pytest.mark.parametrize("cls, cfg", ALL_CONFIGS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_optimizers_match_torch(cls, cfg):
    torch = pytest.importorskip("torch", reason="PyTorch is an optional second reference")
    params, grads = make_params(), grad_sequence()[:STEPS]
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    topt = getattr(torch.optim, cls.__name__)(tparams, **cfg)
    run(cls(params, **cfg), params, grads)
    for gs in grads:
        for t, g in zip(tparams, gs):
            t.grad = torch.tensor(g)
        topt.step()
    for p, t in zip(params, tparams):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12, atol=1e-14)
