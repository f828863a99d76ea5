"""The fused ops of minicnn/fused.py and their kernels (kernels/fused.cu), run by the emulator.

1. Each NumPy path (the reference) against a float64 ground truth written as plain loops:
   bias_relu and relu_backward bit for bit (relu_backward's split over threads too);
   softmax_cross_entropy within 32 eps (see ``tolerance``).
2. Each kernel through ``emulator.launch`` and ``emulator.launch_reversed``, float32 and
   float64, against the NumPy path: bit for bit for bias_relu and relu_backward (a channels-last
   view included); softmax_cross_entropy
   within ``tolerance`` (exp and log differ by an ulp between libm and NumPy), its int outputs
   exactly. Shapes include rows = 1, channels = 1, K = 1, odd sizes; label smoothing 0 and 0.1;
   targets -1 and K setting the invalid flag; NaN through bias_relu and softmax; ties in argmax.
3. Every kernel with the grid capped at 2 blocks (grid-stride loops run several rounds).
4. The launcher's new argument types (scalar_t values, unsigned long long pointers) and the
   emulator's guard zone for uint64 arrays; input validation; dispatch to the kernel path.
Inputs are random with fixed seeds and never zero (a ReLU output's zeros aside). Adam's kernel,
``adam_multi_tensor``, is tested against ``optim.Adam`` in tests/test_fused_adam.py.
"""
import math
import re

import numpy as np
import pytest

import minicnn.cuda
from minicnn import fused
from minicnn.module import ShapeError
from minicnn.testing import emulator

DTYPES = [np.float32, np.float64]
LAUNCHES = {"in order": emulator.launch, "reversed": emulator.launch_reversed}
needs_emulator = [pytest.mark.emulated,
                  pytest.mark.skipif(not emulator.available(),
                                     reason=f"CUDA emulator unavailable: "
                                            f"{emulator.unavailable_reason()}")]


def emulated(test):
    """Marks a test that runs kernels on the emulator, once per thread order (``launch``)."""
    test = pytest.mark.parametrize("launch", list(LAUNCHES.values()), ids=list(LAUNCHES))(test)
    for mark in needs_emulator:
        test = mark(test)
    return test


def nonzero_normal(rng, shape, dtype=np.float64, scale=1.0):
    x = rng.standard_normal(shape)
    x[np.abs(x) < 1e-3] = 0.5                       # never zero
    return (scale * x).astype(dtype)


def assert_identical(got, want, what):
    """Same shape, dtype, NaN positions and bits elsewhere (the sign of zero included)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: {got.shape} {got.dtype}, expected {want.shape} {want.dtype}")
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN at other places"
    bits = np.dtype(f"u{got.dtype.itemsize}")
    g, w = (np.ascontiguousarray(a)[~nan].view(bits) for a in (got, want))
    differ = np.flatnonzero(g != w)
    assert differ.size == 0, (f"{what}: {differ.size} of {got.size} elements differ; first "
                              f"got {g[differ[0]].view(got.dtype)!r}, expected "
                              f"{w[differ[0]].view(got.dtype)!r}")


def assert_close(got, want, rtol, atol, what):
    """|got - want| <= atol + rtol*|want| elementwise, NaN where want is NaN."""
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN at other places"
    err = np.abs(got[~nan].astype(np.float64) - want[~nan])
    bad = np.flatnonzero(err > atol + rtol * np.abs(want[~nan]))
    assert bad.size == 0, (f"{what}: {bad.size} elements off by more than rtol={rtol}, "
                           f"atol={atol}; worst {err.max()!r}")


# --- float64 ground truths, the obvious way ----------------------------------------------------

def truth_bias_relu(y, bias):
    out = np.empty_like(y, dtype=np.float64)
    for i in range(y.shape[0]):
        for c in range(y.shape[1]):
            v = float(y[i, c]) + float(bias[c])
            out[i, c] = v if (v > 0 or math.isnan(v)) else 0.0
    return out


def truth_relu_backward(dy, y):
    return np.array([d if v > 0 else 0.0 for d, v in zip(dy.ravel(), y.ravel())]).reshape(y.shape)


def truth_softmax_cross_entropy(logits, targets, e, scale):
    B, K = logits.shape
    loss, grad = np.empty(B), np.empty((B, K))
    correct, invalid = np.zeros(B, np.int32), 0
    for b in range(B):
        z, t = [float(v) for v in logits[b]], int(targets[b])
        if not 0 <= t < K:
            loss[b], grad[b], invalid = np.nan, np.nan, 1
            continue
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        logp = [v - lse for v in z]
        q = [(1 - e) * (k == t) + e / K for k in range(K)]
        loss[b] = -sum(qk * lk for qk, lk in zip(q, logp))
        grad[b] = [(math.exp(lk) - qk) * scale for qk, lk in zip(q, logp)]
        correct[b] = z.index(m) == t                    # the first maximum
    return loss, grad, correct, np.array([invalid], np.int32)


# --- bias_relu ----------------------------------------------------------------------------------

BIAS_SHAPES = [(1, 1), (1, 7), (5, 1), (3, 10), (17, 33), (128, 120)]     # 128*120: 60 blocks


def bias_relu_inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return nonzero_normal(rng, shape, dtype), nonzero_normal(rng, shape[1:], dtype)


@pytest.mark.parametrize("shape", BIAS_SHAPES)
def test_bias_relu_reference_is_the_truth(shape):
    y, bias = bias_relu_inputs(shape, np.float64)
    want = truth_bias_relu(y, bias)
    assert fused.bias_relu(y, bias) is y
    assert_identical(y, want, "bias_relu")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", BIAS_SHAPES)
@emulated
def test_bias_relu_kernel(shape, dtype, launch):
    y, bias = bias_relu_inputs(shape, dtype)
    want = fused.bias_relu(y.copy(), bias)
    assert fused.bias_relu_kernel(y, bias, launch=launch) is y
    assert_identical(y, want, "bias_relu_forward")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@emulated
def test_bias_relu_propagates_nan(dtype, launch):
    y, bias = bias_relu_inputs((6, 5), dtype, seed=1)
    y[0, 0] = y[3, 4] = np.nan
    y[2, 1] = -abs(y[2, 1]) - 9                      # a NaN among negatives is not clipped to 0
    bias[1] = np.nan                                 # a whole column of NaN
    truth = truth_bias_relu(y, bias)
    want = fused.bias_relu(y.copy(), bias)
    fused.bias_relu_kernel(y, bias, launch=launch)
    assert np.isnan(want[[0, 3], [0, 4]]).all() and np.isnan(want[:, 1]).all()
    assert_identical(y, want, "bias_relu_forward with NaN")
    if dtype == np.float64:
        assert_identical(y, truth, "bias_relu_forward with NaN vs truth")


# --- relu_backward ------------------------------------------------------------------------------

RELU_SHAPES = [(1,), (7,), (3, 5), (2, 3, 5, 7), (4, 8, 9, 13)]          # 3744: 15 blocks


def relu_inputs(shape, dtype, seed=2, channels_last=False):
    """dy and y = relu(x), x never zero; channels_last: NCHW views of NHWC buffers."""
    rng = np.random.default_rng(seed)
    full = (shape[0], *shape[2:], shape[1]) if channels_last else shape
    dy, x = nonzero_normal(rng, full, dtype), nonzero_normal(rng, full, dtype)
    if channels_last:
        dy, x = dy.transpose(0, 3, 1, 2), x.transpose(0, 3, 1, 2)
    return dy, np.maximum(x, 0)


@pytest.mark.parametrize("shape", RELU_SHAPES)
def test_relu_backward_reference_is_the_truth(shape):
    dy, y = relu_inputs(shape, np.float64)
    # dy * 0 is -0.0 where dy < 0: compare values, the sign of zero aside
    np.testing.assert_array_equal(fused.relu_backward(dy, y), truth_relu_backward(dy, y))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_relu_backward_reference_split_over_threads(channels_last):
    """576,000 elements: the batch is split between threads (windows.over_batch); same bits as
    one np.multiply(dy, y > 0) over the whole."""
    dy, y = relu_inputs((9, 64, 40, 25), np.float32, channels_last=channels_last)
    dx = fused.relu_backward(dy, y)
    assert dx.strides == y.strides
    assert_identical(dx, np.multiply(dy, y > 0), "relu_backward over threads")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", RELU_SHAPES)
@emulated
def test_relu_backward_kernel(shape, dtype, launch):
    dy, y = relu_inputs(shape, dtype)
    assert_identical(fused.relu_backward_kernel(dy, y, launch=launch), fused.relu_backward(dy, y),
                     "relu_backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@emulated
def test_relu_backward_kernel_channels_last(dtype, launch):
    """NCHW views of channels-last buffers go in without a copy and dx keeps their layout."""
    dy, y = relu_inputs((3, 5, 4, 6), dtype, channels_last=True)
    dx = fused.relu_backward_kernel(dy, y, launch=launch)
    assert dx.strides == y.strides
    assert_identical(dx, fused.relu_backward(dy, y), "relu_backward, channels-last")


def test_relu_backward_kernel_refuses_different_layouts():
    dy, y = relu_inputs((2, 3, 4, 5), np.float32, channels_last=True)
    with pytest.raises(ValueError, match="relu_backward: dy and y must share a memory layout"):
        fused.relu_backward_kernel(np.ascontiguousarray(dy), y, launch=_no_launch)


# --- softmax_cross_entropy ----------------------------------------------------------------------

SOFTMAX_SHAPES = [(1, 1), (5, 1), (1, 10), (7, 3), (33, 17), (128, 10), (6, 1000)]


def tolerance(dtype, scale):
    """(rtol, atol) for the loss and for the grad: 32 eps of the dtype, relative to 1 + |loss|
    and to grad_scale + |grad| (softmax - q is at most 1 in size: its rounding errors are eps-sized
    even where it cancels to near 0). Measured worst cases on these inputs (logits up to 12, up
    to 1000 classes): 14 eps for the loss, 4 eps for the grad."""
    eps = np.finfo(dtype).eps
    return (32 * eps, 32 * eps), (32 * eps, 32 * eps * scale)


def softmax_inputs(shape, dtype, seed=3):
    rng = np.random.default_rng(seed)
    return nonzero_normal(rng, shape, dtype, scale=3.0), rng.integers(0, shape[1], shape[0])


def check_softmax(got, want, dtype, scale, what):
    (lr, la), (gr, ga) = tolerance(dtype, scale)
    assert_close(got[0], want[0], lr, la, f"{what} loss")
    assert_close(got[1], want[1], gr, ga, f"{what} grad")
    for k, name in [(2, "correct"), (3, "invalid")]:
        assert got[k].dtype == np.int32 and np.array_equal(got[k], want[k]), (
            f"{what} {name}: {got[k]}, expected {want[k]}")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
def test_softmax_cross_entropy_reference_is_the_truth(shape, smoothing):
    logits, targets = softmax_inputs(shape, np.float64)
    if shape[0] > 2:
        targets[0], targets[-1] = shape[1], -1             # two invalid targets among valid ones
    got = fused.softmax_cross_entropy(logits, targets, smoothing)
    check_softmax(got, truth_softmax_cross_entropy(logits, targets, smoothing, 1 / shape[0]),
                  np.float64, 1 / shape[0], "softmax_cross_entropy")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
@emulated
def test_softmax_cross_entropy_kernel(shape, smoothing, dtype, launch):
    logits, targets = softmax_inputs(shape, dtype)
    got = fused.softmax_cross_entropy_kernel(logits, targets, smoothing, launch=launch)
    assert got[3][0] == 0
    check_softmax(got, fused.softmax_cross_entropy(logits, targets, smoothing), dtype,
                  1 / shape[0], "softmax_cross_entropy")
    # and both against the float64 truth, float32 within its own tolerance
    truth = truth_softmax_cross_entropy(logits, targets, smoothing, 1 / shape[0])
    check_softmax(got, truth, dtype, 1 / shape[0], "softmax_cross_entropy vs truth")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bad", [-1, 10, -(2 ** 40), 2 ** 40])
@emulated
def test_softmax_cross_entropy_invalid_target(bad, dtype, launch):
    """The row of a target outside [0, K) is NaN and uncounted, the flag is set, the rest intact."""
    logits, targets = softmax_inputs((9, 10), dtype, seed=4)
    targets[[2, 7]] = bad
    got = fused.softmax_cross_entropy_kernel(logits, targets, 0.1, grad_scale=0.5, launch=launch)
    want = fused.softmax_cross_entropy(logits, targets, 0.1, grad_scale=0.5)
    assert got[3][0] == 1 and want[3][0] == 1
    assert np.isnan(got[0][[2, 7]]).all() and np.isnan(got[1][[2, 7]]).all()
    assert not got[2][[2, 7]].any()
    check_softmax(got, want, dtype, 0.5, "softmax_cross_entropy, invalid targets")


@emulated
def test_softmax_cross_entropy_ties_nan_and_int32_targets(launch):
    """The first maximum counts (np.argmax), a NaN logit wins and makes its row NaN; targets of
    another integer type are taken as int64."""
    logits = np.array([[1.0, 3.0, 3.0], [1.0, 3.0, 3.0], [0.5, np.nan, 2.0], [np.nan, 1.0, 2.0]])
    targets = np.array([1, 2, 1, 2], dtype=np.int32)
    got = fused.softmax_cross_entropy_kernel(logits, targets, launch=launch)
    want = fused.softmax_cross_entropy(logits, targets)
    np.testing.assert_array_equal(got[2], [1, 0, 1, 0])
    assert np.isnan(got[0][2:]).all() and np.isnan(got[1][2:]).all() and got[3][0] == 0
    check_softmax(got, want, np.float64, 1 / 4, "softmax_cross_entropy, ties and NaN")


# --- grid-stride loops: a grid of 2 blocks ------------------------------------------------------

def _capped_runs(launch):
    """kernel name -> (run giving outputs, its NumPy reference, threads' work items: elements,
    or rows for softmax_cross_entropy), each more than 4x the 512 threads of the grid."""
    y, bias = bias_relu_inputs((101, 37), np.float64)
    dy, yr = relu_inputs((5, 7, 9, 11), np.float64)
    logits, targets = softmax_inputs((2600, 3), np.float64)
    return {
        "bias_relu_forward": (lambda: [fused.bias_relu_kernel(y.copy(), bias, launch=launch)],
                              lambda: [fused.bias_relu(y.copy(), bias)], y.size),
        "relu_backward": (lambda: [fused.relu_backward_kernel(dy, yr, launch=launch)],
                          lambda: [fused.relu_backward(dy, yr)], yr.size),
        "softmax_cross_entropy": (
            lambda: fused.softmax_cross_entropy_kernel(logits, targets, 0.1, launch=launch),
            lambda: fused.softmax_cross_entropy(logits, targets, 0.1), logits.shape[0]),
    }


@pytest.mark.parametrize("kernel", ["bias_relu_forward", "relu_backward", "softmax_cross_entropy"])
@emulated
def test_grid_stride_loops_cover_everything(kernel, launch, monkeypatch):
    monkeypatch.setattr(minicnn.cuda, "MAX_BLOCKS", 2)
    assert minicnn.cuda.grid_for(10 ** 6) == 2
    run, reference, items = _capped_runs(launch)[kernel]
    assert items > 4 * 2 * minicnn.cuda.THREADS_PER_BLOCK
    got, want = run(), reference()
    for a, b in zip(got, want):
        if kernel == "softmax_cross_entropy" and a.dtype.kind == "f":
            assert_close(a, b, 1e-13, 1e-13, kernel)
        else:
            assert_identical(a, b, f"{kernel} on 2 blocks")


# --- launcher and emulator: the new argument types ----------------------------------------------

def test_fused_signatures_parse():
    sig = minicnn.cuda.signatures("fused.cu")
    assert sig["adam_multi_tensor"][0] == ("in", "unsigned long long", "pointers")
    assert sig["softmax_cross_entropy"][-2:] == [("value", "scalar_t", "smoothing"),
                                                 ("value", "scalar_t", "grad_scale")]
    assert sig["bias_relu_forward"][0] == ("out", "scalar_t", "y")


BUGGY_U64 = r"""
extern "C" __global__ void scaled_index(unsigned long long* __restrict__ out,
                                        const scalar_t* __restrict__ x, scalar_t scale,
                                        long long n) {
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx <= n;
         idx += (long long)blockDim.x * gridDim.x) {
        out[idx] = (unsigned long long)(x[idx < n ? idx : 0] * scale);   // idx == n: too far
    }
}
"""


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.emulated
@needs_emulator[1]
def test_emulator_passes_scalar_t_values_and_guards_uint64_arrays(dtype, tmp_path):
    path = tmp_path / "buggy_u64.cu"
    path.write_text(BUGGY_U64)
    x, out = np.arange(1, 301, dtype=dtype), np.zeros(300, np.uint64)
    with pytest.raises(emulator.EmulatorError, match=r"argument out: .*out of bounds.*\[300\]"):
        emulator.launch(str(path), "scaled_index", x.size, out, x, 2.5, x.size)
    fixed = tmp_path / "fixed_u64.cu"             # a new name: launchers cache modules by file
    fixed.write_text(BUGGY_U64.replace("idx <= n", "idx < n"))
    emulator.launch(str(fixed), "scaled_index", x.size, out, x, 2.5, x.size)
    np.testing.assert_array_equal(out, (np.arange(1, 301) * 2.5).astype(np.uint64))


# --- dispatch and validation --------------------------------------------------------------------

class _KernelNumpy:
    """NumPy under another name: the ops take their kernel paths, and allocate with NumPy."""

    def __getattr__(self, name):
        return getattr(np, name)


@emulated
def test_ops_dispatch_to_the_kernels(launch, monkeypatch):
    monkeypatch.setattr(fused.ops, "get_array_module", lambda a: _KernelNumpy())
    calls = []
    monkeypatch.setattr(minicnn.cuda, "launch",
                        lambda file, name, *args: calls.append(name) or launch(file, name, *args))
    y, bias = bias_relu_inputs((3, 4), np.float64)
    fused.bias_relu(y, bias)
    fused.relu_backward(y, y)
    fused.softmax_cross_entropy(y, np.array([0, 1, 3]))
    assert calls == ["bias_relu_forward", "relu_backward", "softmax_cross_entropy"]


def _no_launch(*args):
    pytest.fail("validation should have refused the arguments before launching")


def _call_both(op, *args, **kwargs):
    """The NumPy op and its kernel path must refuse the same arguments the same way."""
    errors = []
    for f in (getattr(fused, op), getattr(fused, op + "_kernel")):
        with pytest.raises((ValueError, TypeError)) as err:
            f(*args, **kwargs) if f.__name__ == op else f(*args, **kwargs, launch=_no_launch)
        errors.append((type(err.value), str(err.value)))
    assert errors[0] == errors[1]
    return errors[0]


@pytest.mark.parametrize("y, bias, error, message", [
    (np.ones(3), np.ones(3), ShapeError, r"bias_relu: expected y of shape \(N, C\), got \(3,\)"),
    (np.ones((2, 3)), np.ones(2), ShapeError, r"expected bias of shape \(3,\)"),
    (np.ones((2, 3)), np.ones(3, np.float32), TypeError, "of one dtype, got float64 and float32"),
    (np.ones((3, 2)).T, np.ones(3), ValueError, "must be C-contiguous"),
])
def test_bias_relu_validation(y, bias, error, message):
    kind, text = _call_both("bias_relu", y, bias)
    assert kind is error and re.search(message, text), text


def test_relu_backward_validation():
    kind, text = _call_both("relu_backward", np.ones((2, 3)), np.ones((3, 2)))
    assert kind is ShapeError and "dy and y must have one shape" in text
    kind, text = _call_both("relu_backward", np.ones(3, np.float32), np.ones(3))
    assert kind is TypeError and "float32 and float64" in text


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(logits=np.ones(3), targets=np.zeros(3, int)), ShapeError, "expected logits of shape"),
    (dict(logits=np.ones((2, 0)), targets=np.zeros(2, int)), ShapeError, "B, K >= 1"),
    (dict(logits=np.ones((2, 3), int), targets=np.zeros(2, int)), TypeError, "floating-point"),
    (dict(logits=np.ones((2, 3)), targets=np.zeros(3, int)), ShapeError,
     r"targets of shape \(2,\)"),
    (dict(logits=np.ones((2, 3)), targets=np.zeros(2)), TypeError, "integer class indices"),
    (dict(logits=np.ones((2, 3)), targets=np.zeros(2, int), smoothing=1.5), ValueError,
     r"smoothing must be a number in \[0, 1\], got 1.5"),
    (dict(logits=np.ones((2, 3)), targets=np.zeros(2, int), grad_scale=np.inf), ValueError,
     "grad_scale must be a finite number"),
])
def test_softmax_cross_entropy_validation(kwargs, error, message):
    kind, text = _call_both("softmax_cross_entropy", **kwargs)
    assert kind is error and text.startswith("softmax_cross_entropy: "), text
    assert re.search(message, text), text
