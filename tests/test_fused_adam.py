"""FusedAdam and FusedAdamW (minicnn/fused/adam.py) against the reference, optim.Adam and AdamW.

1. The reference against textbook Adam written out in float64 (``conftest.adam_step_float64``):
   within 1e-12 relative, as the textbook form rounds differently (it divides m and v by their
   bias corrections before combining them).
2. The fused kernel (``adam_multi_tensor`` of kernels/fused.cu) run by the emulator in both
   thread orders, through FusedAdam/FusedAdamW, against Adam/AdamW: 20 steps of 6 tensors (one
   empty), float32 and float64, weight decay 0 and 0.05, OneCycleLR changing lr and beta1 before
   every step: bit for bit, so the float32 tolerance is 0 too. Bit-identical, not merely close:
   the kernel does the reference's operations in the reference's order, on the same constants
   (each computed in double and rounded once to the dtype), and rounds every product on its own
   (no fma), so every rounding is the same.
3. What makes the fused update capturable: it reads the constants that ``prepare_step`` wrote,
   in place, into one device array, not the attributes; one launch per step for every tensor.
4. A state (and a checkpoint) moves between the plain and the fused optimizer; GradScaler steps
   and skips both alike; on the CPU the fused classes run the reference, on CuPy's stand-in and
   on a GPU (``-m gpu``) the kernel equals CuPy's elementwise arithmetic bit for bit; the table
   of addresses, validation, grid-stride loops, the hyper array's layout against the kernel's
   source.
"""
import math
import re

import numpy as np
import pytest

import minicnn
from minicnn import fused, to_device, to_numpy
from minicnn.backend import cuda_unavailable_reason
from minicnn.fused import AdamConstants, FusedAdam, FusedAdamW, TensorTable, adam_hyper
from minicnn.fused import adam_multi_tensor
from minicnn.lr_scheduler import OneCycleLR
from minicnn.module import Parameter, ShapeError
from minicnn.optim import SGD, Adam, AdamW
from minicnn.testing import emulator
from minicnn.testing.capture import fake_cupy

from conftest import adam_step_float64

SHAPES = [(1,), (7,), (3, 5), (0,), (2, 3, 4, 5), (33,)]                # 176 elements in all
CASES = [(Adam, FusedAdam, 0.0), (Adam, FusedAdam, 0.05), (AdamW, FusedAdamW, 0.05),
         (AdamW, FusedAdamW, 0.0)]
CASE_IDS = ["Adam", "Adam-wd", "AdamW", "AdamW-wd0"]
DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
STEPS = 20
LAUNCHES = pytest.mark.parametrize("launch", [emulator.launch, emulator.launch_reversed],
                                   ids=["in order", "reversed"])


def emulated(test):
    """Marks a test that runs the kernel on the emulator (skipped without a C++ compiler)."""
    reason = f"CUDA emulator unavailable: {emulator.unavailable_reason()}"
    return pytest.mark.emulated(pytest.mark.skipif(not emulator.available(), reason=reason)(test))


def make_params(dtype=np.float64, shapes=SHAPES, seed=5):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]


def gradients(dtype=np.float64, steps=STEPS, shapes=SHAPES, seed=6):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad[...] = g


def assert_bits(got, want, what):
    """The same dtype, shape and bits (the sign of zero included)."""
    assert (got.dtype, got.shape) == (want.dtype, want.shape), what
    bits = np.dtype(f"u{got.dtype.itemsize}")
    np.testing.assert_array_equal(got.view(bits), want.view(bits), err_msg=what)


def assert_same_state(fast, plain, what):
    """Parameters and Adam buffers of two optimizers bit for bit, and the same step count."""
    assert fast.step_count == plain.step_count, what
    for j, (p, q) in enumerate(zip(fast.params, plain.params)):
        assert_bits(to_numpy(p.data), to_numpy(q.data), f"{what}: parameter {j}")
        for name in ("exp_avg", "exp_avg_sq"):
            assert_bits(to_numpy(fast.state[j][name]), to_numpy(plain.state[j][name]),
                        f"{what}: {name} {j}")


class _KernelNumpy:
    """NumPy under another name: FusedAdam takes its kernel path, with NumPy arrays."""

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.fixture
def kernels(launch, monkeypatch):
    """FusedAdam on its kernel path, run by the emulator with ``launch``: the list of launches."""
    launched, kernel_numpy = [], _KernelNumpy()
    monkeypatch.setattr(fused.adam, "get_array_module", lambda a: kernel_numpy)
    monkeypatch.setattr(minicnn.cuda, "launch", lambda file, name, *args: launched.append(name)
                        or launch(file, name, *args))
    return launched


# --- 1. the reference against the textbook -----------------------------------------------------

@pytest.mark.parametrize("plain, wd", [(plain, wd) for plain, _, wd in CASES], ids=CASE_IDS)
def test_reference_is_textbook_adam(plain, wd):
    params, lrs = make_params(), [1e-2, 3e-3, 2e-2, 5e-3]
    opt = plain(params, lr=lrs[0], weight_decay=wd)
    p = [q.data.copy() for q in params]
    m, v = [np.zeros_like(a) for a in p], [np.zeros_like(a) for a in p]
    for t, (lr, grads) in enumerate(zip(lrs, gradients(steps=len(lrs))), start=1):
        set_grads(params, grads)
        opt.lr = lr
        opt.step()
        for j, g in enumerate(grads):
            p[j], m[j], v[j] = adam_step_float64(p[j], g, m[j], v[j], lr, 0.9, 0.999, 1e-8, wd, t,
                                                 plain is AdamW)
            for got, want in ((params[j].data, p[j]), (opt.state[j]["exp_avg"], m[j]),
                              (opt.state[j]["exp_avg_sq"], v[j])):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


# --- 2. the kernel against the reference -------------------------------------------------------

@LAUNCHES
@emulated
@DTYPES
@pytest.mark.parametrize("plain, fast, wd", CASES, ids=CASE_IDS)
def test_kernel_is_the_reference_bit_for_bit(plain, fast, wd, dtype, kernels):
    ref, opt = (cls(make_params(dtype), lr=1e-2, weight_decay=wd) for cls in (plain, fast))
    schedulers = [OneCycleLR(o, max_lr=3e-2, total_steps=STEPS) for o in (ref, opt)]
    for t, grads in enumerate(gradients(dtype), start=1):
        for o, sched in zip((ref, opt), schedulers):
            set_grads(o.params, grads)
            o.step()
            sched.step()                          # a new lr and beta1 for the next step
        assert_same_state(opt, ref, f"{fast.__name__}(weight_decay={wd}) step {t}")
    assert kernels == ["adam_multi_tensor"] * STEPS      # one launch per step, all the tensors
    assert opt.betas != (0.9, 0.999) and opt.lr != 1e-2


# --- 3. capturable: the constants come from one device array -----------------------------------

@LAUNCHES
@emulated
def test_the_update_reads_the_constants_prepare_step_wrote(kernels):
    ref, opt = Adam(make_params(), lr=1e-2), FusedAdam(make_params(), lr=1e-2)
    grads = gradients(steps=2)
    set_grads(ref.params, grads[0])
    set_grads(opt.params, grads[0])
    opt.prepare_step()
    hyper, address = opt._hyper, opt._hyper.ctypes.data
    opt.lr, opt.betas = 5.0, (0.5, 0.5)       # after prepare_step: a recorded graph misses it
    opt.apply_step()
    ref.step()
    assert_same_state(opt, ref, "step 1 with the constants prepared before the change")
    opt.prepare_step()                        # step 2: the new values, written in place
    assert opt._hyper is hyper and hyper.ctypes.data == address
    assert AdamConstants(*hyper.tolist()) == AdamConstants.at_step(5.0, (0.5, 0.5), 1e-8, 0.0, 2,
                                                                   False)


def test_plain_optimizers_are_not_capturable_and_fused_ones_are():
    params = make_params()
    assert not any(cls(params).capturable for cls in (Adam, AdamW))
    assert not SGD(params, lr=0.1).capturable
    assert FusedAdam(params).capturable and FusedAdamW(params).capturable
    assert isinstance(FusedAdamW(params), AdamW) and FusedAdamW(params).weight_decay == 1e-2


# --- 4. state, checkpoints, GradScaler, the CPU ------------------------------------------------

@LAUNCHES
@emulated
@pytest.mark.parametrize("plain, fast", [(Adam, FusedAdam), (AdamW, FusedAdamW)],
                         ids=["Adam", "AdamW"])
def test_a_state_moves_between_plain_and_fused(plain, fast, kernels):
    grads = gradients(steps=6)
    straight = plain(make_params(), lr=1e-2, weight_decay=0.05)
    for gs in grads:
        set_grads(straight.params, gs)
        straight.step()
    for first, second in ((plain, fast), (fast, plain)):
        a = first(make_params(), lr=1e-2, weight_decay=0.05)
        for gs in grads[:3]:
            set_grads(a.params, gs)
            a.step()
        state = a.state_dict()
        assert state["type"] == plain.__name__ and state["step"] == 3
        b = second([Parameter(p.data.copy()) for p in a.params], lr=0.5)   # replaced by the state
        b.load_state_dict(state)
        for gs in grads[3:]:
            set_grads(b.params, gs)
            b.step()
        assert_same_state(b, straight, f"{first.__name__} for 3 steps, then {second.__name__}")
    other = AdamW if plain is Adam else Adam
    with pytest.raises(ValueError, match=f"state is from a {plain.__name__} optimizer, expected "
                                         f"{other.__name__}"):
        other(make_params()).load_state_dict(fast(make_params()).state_dict())


def test_a_checkpoint_of_the_fused_optimizer_loads_into_the_plain_one(tmp_path):
    model = minicnn.Sequential(minicnn.Linear(4, 3))
    opt = FusedAdam(model.parameters(), lr=1e-2)
    model.backward(model(np.ones((2, 4), np.float32)))
    opt.step()
    minicnn.save(model, tmp_path / "fused.npz", optimizer=opt)
    plain = Adam(model.parameters())
    minicnn.load(model, tmp_path / "fused.npz", optimizer=plain)
    assert plain.step_count == 1 and plain.lr == 1e-2
    for j in range(len(model.parameters())):
        np.testing.assert_array_equal(plain.state[j]["exp_avg"], opt.state[j]["exp_avg"])


@LAUNCHES
@emulated
def test_grad_scaler_steps_and_skips_both_alike(kernels):
    """Steps 1, 2 and 4 finite, step 3 with an inf: skipped by both, not counted."""
    ref, opt = Adam(make_params(), lr=1e-2), FusedAdam(make_params(), lr=1e-2)
    grads = gradients(steps=4)
    grads[2][1][3] = np.inf
    for o in (ref, opt):
        scaler = minicnn.GradScaler(init_scale=2.0 ** 10)
        for gs in grads:
            set_grads(o.params, [g * scaler.get_scale() for g in gs])   # exact: a power of two
            scaler.step(o)
            scaler.update()
        assert scaler.get_scale() == 2.0 ** 9
    assert ref.step_count == 3
    assert_same_state(opt, ref, "three good steps and a skipped one")


@pytest.mark.parametrize("plain, fast, wd", CASES, ids=CASE_IDS)
def test_on_the_cpu_the_fused_classes_run_the_reference(plain, fast, wd):
    ref, opt = (cls(make_params(np.float32), lr=1e-2, weight_decay=wd) for cls in (plain, fast))
    for gs in gradients(np.float32, steps=3):
        for o in (ref, opt):
            set_grads(o.params, gs)
            o.step()
    assert_same_state(opt, ref, "NumPy parameters")
    assert opt._hyper is None                       # nothing to write for a kernel


@emulated
@pytest.mark.parametrize("plain, fast", [(Adam, FusedAdam), (AdamW, FusedAdamW)],
                         ids=["Adam", "AdamW"])
def test_on_a_stand_in_gpu_the_fused_update_is_the_plain_one(plain, fast):
    """On CuPy's stand-in (minicnn.testing.capture) the plain update is device array arithmetic;
    the fused one is the kernel, reading constants copied to the device asynchronously."""
    with fake_cupy():
        ref, opt = (cls([Parameter(to_device(p.data, "cuda")) for p in make_params(np.float32)],
                        lr=1e-2, weight_decay=0.05) for cls in (plain, fast))
        for gs in gradients(np.float32, steps=3):
            for o in (ref, opt):
                set_grads(o.params, gs)
                o.step()
        assert type(opt._hyper).__module__ == "cupy"
        assert_same_state(opt, ref, "three steps on the stand-in GPU")


@pytest.mark.gpu
@pytest.mark.skipif(cuda_unavailable_reason() is not None,
                    reason=f"no usable GPU: {cuda_unavailable_reason()}")
@DTYPES
@pytest.mark.parametrize("plain, fast, wd", CASES, ids=CASE_IDS)
def test_on_a_gpu_the_fused_update_is_the_plain_one_bit_for_bit(plain, fast, wd, dtype):
    """CuPy's elementwise operations, one rounding each, against the kernel: 20 steps."""
    ref, opt = (cls([Parameter(to_device(p.data, "cuda")) for p in make_params(dtype)], lr=1e-2,
                    weight_decay=wd) for cls in (plain, fast))
    schedulers = [OneCycleLR(o, max_lr=3e-2, total_steps=STEPS) for o in (ref, opt)]
    for t, grads in enumerate(gradients(dtype), start=1):
        for o, sched in zip((ref, opt), schedulers):
            set_grads(o.params, [to_device(g, "cuda") for g in grads])
            o.step()
            sched.step()
    assert_same_state(opt, ref, f"{fast.__name__}(weight_decay={wd}) after {STEPS} steps")


# --- the pieces: constants, table, validation, grid-stride loops ------------------------------

def test_constants_are_in_the_order_the_kernel_reads_them():
    source = minicnn.cuda.read_source("fused.cu")
    body = source[source.index("void adam_multi_tensor("):]
    reads = dict((int(i), name) for name, i in re.findall(r"(\w+) = hyper\[(\d+)\]", body))
    assert [reads[i] for i in sorted(reads)] == list(AdamConstants._fields)


def test_constants_values_and_checks():
    c = AdamConstants.at_step(1e-2, (0.9, 0.99), 1e-8, 0.1, 2, True)
    assert c == (1 - 0.9, 0.99, 1 - 0.99, 1e-8, 0.0, 1e-2 / (1 - 0.9 ** 2),
                 math.sqrt(1 - 0.99 ** 2), 1 - 1e-2 * 0.1)
    l2 = AdamConstants.at_step(1e-2, (0.9, 0.99), 1e-8, 0.1, 2, False)
    assert (l2.weight_decay, l2.decay) == (0.1, 1.0)          # L2 decay, no decoupled decay
    h = adam_hyper(c, np, np.float32)
    assert h.dtype == np.float32 and h.tolist() == np.array(c, np.float32).tolist()
    with pytest.raises(ValueError, match="step must be an integer >= 1, got 0"):
        AdamConstants.at_step(1e-2, (0.9, 0.99), 1e-8, 0.1, 0, True)
    with pytest.raises(ValueError, match=r"out must be an array of shape \(8,\) and dtype float32"):
        adam_hyper(c, np, np.float32, out=np.zeros(8))


def _arrays(seed=7, shapes=((3,), (4, 2))):
    """params, grads, exp_avgs, exp_avg_sqs (>= 0), float64."""
    rng = np.random.default_rng(seed)
    lists = [[rng.standard_normal(s) for s in shapes] for _ in range(4)]
    lists[3] = [np.abs(a) for a in lists[3]]
    return lists


def _reference(lists, lr, weight_decay, step, decoupled):
    """Step ``step`` of optim.Adam/AdamW from copies of ``lists``: (params, exp_avgs,
    exp_avg_sqs)."""
    params = [Parameter(a.copy()) for a in lists[0]]
    opt = (AdamW if decoupled else Adam)(params, lr=lr, weight_decay=weight_decay)
    set_grads(params, lists[1])
    for j in range(len(params)):
        opt.state[j] = {"exp_avg": lists[2][j].copy(), "exp_avg_sq": lists[3][j].copy()}
    opt.step_count = step - 1
    opt.step()
    return [p.data for p in params], [s["exp_avg"] for s in opt.state], \
        [s["exp_avg_sq"] for s in opt.state]


@LAUNCHES
@pytest.mark.parametrize("blocks", [None, 2], ids=["grid", "2 blocks"])
@emulated
def test_kernel_with_a_reused_table_and_few_blocks(launch, blocks, monkeypatch):
    """With the grid capped at 2 blocks each thread runs several rounds of the grid-stride loop.
    A table made beforehand is used as given, and refuses arrays it was not made for."""
    shapes = ((3,), (4, 2)) if blocks is None else ((1,), (1500,), (0,), (7, 91))
    if blocks:
        monkeypatch.setattr(minicnn.cuda, "MAX_BLOCKS", blocks)
        assert sum(int(np.prod(s)) for s in shapes) > 4 * blocks * minicnn.cuda.THREADS_PER_BLOCK
    lists = _arrays(shapes=shapes)
    want = _reference(lists, 1e-3, 0.01, 3, True)
    table = TensorTable(*lists)
    assert table.pointers.dtype == np.uint64 and table.total == sum(a.size for a in lists[0])
    np.testing.assert_array_equal(table.offsets, np.cumsum([0] + [a.size for a in lists[0]]))
    hyper = adam_hyper(AdamConstants.at_step(1e-3, (0.9, 0.999), 1e-8, 0.01, 3, True), np,
                       np.float64)
    adam_multi_tensor(*lists, hyper, table=table, launch=launch)
    got = (lists[0], lists[2], lists[3])                   # the grads stay as given
    for name, got_list, want_list in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
        for j, (a, b) in enumerate(zip(got_list, want_list)):
            assert_bits(a, b, f"{name} {j}")
    lists[2][1] = lists[2][1].copy()                       # an exp_avg replaced: stale table
    with pytest.raises(ValueError, match="table was made for other arrays"):
        adam_multi_tensor(*lists, hyper, table=table, launch=launch)


def _lists(**change):
    lists = {k: [np.ones(3), np.ones((2, 2))] for k in ("params", "grads", "exp_avgs",
                                                         "exp_avg_sqs")}
    lists.update(change)
    return lists


HYPER = adam_hyper(AdamConstants.at_step(1e-3, (0.9, 0.999), 1e-8, 0.0, 1, False), np, np.float64)


def _no_launch(*args):
    pytest.fail("validation should have refused the arguments before launching")


@pytest.mark.parametrize("lists, hyper, error, message", [
    (_lists(grads=[np.ones(3)]), HYPER, ValueError, "four lists of one length"),
    (_lists(exp_avgs=[np.ones(3), np.ones(4)]), HYPER, ShapeError,
     r"exp_avgs\[1\] has shape \(4,\), expected that of params\[1\], \(2, 2\)"),
    (_lists(grads=[np.ones(3), np.ones((2, 2), np.float32)]), HYPER, TypeError,
     r"grads\[1\] has dtype float32, expected that of hyper, float64"),
    (_lists(params=[np.ones(3), np.ones((2, 2)).T]), HYPER, ValueError, "must be C-contiguous"),
    (_lists(exp_avg_sqs=[[1.0, 1.0, 1.0], np.ones((2, 2))]), HYPER, TypeError,
     "all must be arrays on one device"),
    (_lists(), HYPER[:7], ValueError, r"hyper, a floating-point array of shape \(8,\)"),
])
def test_adam_multi_tensor_validation(lists, hyper, error, message):
    with pytest.raises(error, match=message) as err:
        adam_multi_tensor(*lists.values(), hyper, launch=_no_launch)
    assert str(err.value).startswith("adam_multi_tensor: ")
