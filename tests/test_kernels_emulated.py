"""The CUDA kernels run on the CPU by the emulator, element for element against the NumPy ops.

Each kernel of kernels/im2col.cu and kernels/pool.cu is launched through
``minicnn.testing.emulator.launch`` (the same ``Launcher`` the GPU uses: argument casting,
contiguity checks, grid size) and compared with its reference in ``minicnn/ops.py``, or, for the
arguments only the fast path passes (rows in blocks, a ReLU folded into the max pool), in
``minicnn/fused/windows.py``:

- 8 kernels: im2col (9 shapes, rows in the plain order and in blocks), col2im (9 shapes),
  maxpool2d_forward, maxpool2d_backward, avgpool2d_forward, avgpool2d_backward (8 shapes each),
  and maxpool_blocks_forward, maxpool_blocks_backward (4 block layouts), in float32 and float64.
  Shapes mix batch 1, odd and non-square sizes and kernels, strides 1-3 (also larger than the
  kernel, leaving pixels in no window), padding 0-2 (pooling: at most kernel/2; im2col also
  windows wholly in the padding), element counts that are not multiples of 256 and up to ~65
  blocks of 256 threads; one im2col input is a non-contiguous view (the launcher copies it).
- Bit-identical to NumPy (up to the sign of zero) in both dtypes for everything but avgpool2d_forward, whose NumPy mean
  sums in its own order: there within 1e-12 (float64) / 1e-6 (float32) of |y|.
- The grid-stride loops: every kernel with the grid capped at 2 blocks (MAX_BLOCKS = 2).
- Order independence: every kernel with its threads run last to first gives the same bits.
- The emulator itself: out-of-bounds writes are caught, compile errors name the file and carry
  the compiler's output (tests/test_gemm_emulated.py has the cooperative blocks).

Inputs are random with fixed seeds and never zero; pooling inputs have unique values of both
signs, so windows touching the padding have all-negative cases. Outputs are filled with NaN (and
argmax with -1) before each launch, and every element is checked to have been written.
"""
import numpy as np
import pytest

import minicnn.cuda
from minicnn import ops
from minicnn.fused import windows
from minicnn.testing import emulator

pytestmark = [pytest.mark.emulated,
              pytest.mark.skipif(not emulator.available(), reason="CUDA emulator unavailable: "
                                 f"{emulator.unavailable_reason()}")]

DTYPES = [np.float32, np.float64]

# (B, C, H, W, kh, kw, sh, sw, ph, pw)
CONV_SHAPES = [
    (1, 1, 5, 5, 3, 3, 1, 1, 0, 0),        # batch 1, one channel
    (2, 3, 7, 6, 3, 2, 2, 1, 1, 0),        # non-square kernel and stride
    (3, 2, 9, 11, 5, 3, 3, 2, 2, 1),       # stride 3, odd sizes
    (1, 4, 8, 8, 1, 1, 1, 1, 0, 0),        # 1x1 kernel
    (2, 5, 13, 10, 4, 4, 2, 3, 2, 2),      # even kernel, padding 2
    (4, 8, 12, 12, 3, 3, 1, 1, 1, 1),      # 41472 cols elements: 162 blocks
    (1, 2, 3, 3, 3, 3, 3, 3, 0, 0),        # a single window
    (2, 3, 10, 10, 2, 2, 3, 3, 0, 0),      # stride > kernel: some pixels in no window
    (1, 2, 4, 5, 1, 2, 1, 2, 2, 1),        # windows lying wholly in the padding
]
POOL_SHAPES = [
    (1, 1, 4, 4, 2, 2, 2, 2, 0, 0),        # batch 1, the usual 2x2/2
    (2, 3, 7, 9, 3, 3, 2, 2, 1, 1),        # overlapping windows with padding
    (3, 2, 11, 8, 3, 2, 1, 2, 1, 1),       # non-square kernel, stride 1 along H
    (2, 4, 9, 10, 5, 4, 3, 3, 2, 2),       # padding 2, stride 3
    (1, 3, 5, 7, 1, 1, 1, 1, 0, 0),        # 1x1 kernel
    (4, 6, 14, 14, 2, 2, 2, 2, 0, 0),      # 4704 input elements: 19 blocks
    (2, 3, 8, 8, 2, 2, 3, 3, 1, 1),        # stride > kernel: some pixels in no window
    (8, 8, 16, 16, 3, 3, 2, 2, 1, 1),      # 16384 input elements: 64 blocks
]


def random_shapes(seed, n, pool):
    """n random geometries: batch 1-4, channels 1-6, kernel 1-5 each way, stride 1-3, padding
    0-2 (pooling: at most kernel/2), sizes 1-17 (at least one window)."""
    rng = np.random.default_rng(seed)
    shapes = []
    while len(shapes) < n:
        B, C = rng.integers(1, 5), rng.integers(1, 7)
        kh, kw = rng.integers(1, 6, size=2)
        sh, sw = rng.integers(1, 4, size=2)
        ph, pw = (rng.integers(0, min(2, k // 2) + 1) if pool else rng.integers(0, 3)
                  for k in (kh, kw))
        H, W = rng.integers(1, 18, size=2)
        if H + 2 * ph >= kh and W + 2 * pw >= kw:
            shapes.append(tuple(int(v) for v in (B, C, H, W, kh, kw, sh, sw, ph, pw)))
    return shapes


CONV_SHAPES += random_shapes(10, 12, pool=False)
POOL_SHAPES += random_shapes(11, 12, pool=True)


def _ids(shapes):
    return ["B{}C{}_{}x{}_k{}x{}_s{}{}_p{}{}".format(*s) for s in shapes]


def geometry(shape):
    """The int arguments of every window kernel: B, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW."""
    B, C, H, W, kh, kw, sh, sw, ph, pw = shape
    return (B, C, H, W, kh, kw, sh, sw, ph, pw,
            ops.out_size(H, kh, sh, ph), ops.out_size(W, kw, sw, pw))


def nonzero_normal(rng, shape, dtype):
    x = rng.standard_normal(shape)
    x[np.abs(x) < 1e-3] = 0.5                       # never zero
    return x.astype(dtype)


def unique_signed(rng, shape, dtype):
    """Distinct values of both signs, none zero (pooling: no ties)."""
    n = int(np.prod(shape))
    x = (rng.permutation(n) - n // 2 + rng.uniform(0.1, 0.4, size=n)) / n
    return x.reshape(shape).astype(dtype)


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)


def assert_written(out, what):
    missing = np.isnan(out)
    assert not missing.any(), (f"{what}: {missing.sum()} of {out.size} elements never written, "
                               f"first at {np.argwhere(missing)[0].tolist()}")


def assert_same_bits(got, want, what):
    """got == want bit for bit, with the first difference named. Zeros count as equal whatever
    their sign: where windows do not overlap, NumPy's backward writes dy * 0 (which is -0.0 for a
    negative dy) while a gather kernel adds nothing onto +0.0."""
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    bits = np.dtype(f"u{got.dtype.itemsize}")
    unsigned_zero = (lambda a: a + 0) if got.dtype.kind == "f" else (lambda a: a)   # -0.0 + 0 = +0.0
    g, w = (np.ascontiguousarray(unsigned_zero(a)) for a in (got, want))
    differ = g.view(bits) != w.view(bits)
    if differ.any():
        at = tuple(np.argwhere(differ)[0])
        raise AssertionError(f"{what}: {differ.sum()} of {got.size} elements differ; first at "
                             f"{list(at)}: got {g[at]!r}, expected {w[at]!r}")


def assert_close(got, want, rtol, what):
    """|got - want| <= rtol * |want| elementwise (llm.c style: tolerance relative to the value)."""
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = rtol * np.abs(want.astype(np.float64)) + np.finfo(want.dtype).tiny
    bad = err > bound
    if bad.any():
        at = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {bad.sum()} of {got.size} elements off by more than "
                             f"rtol={rtol}; first at {list(at)}: got {got[at]!r}, "
                             f"expected {want[at]!r}")


# --- runs of each kernel: (emulated result(s), NumPy result(s)) -----------------------------------

def run_im2col(shape, dtype, launch=emulator.launch, seed=0, noncontiguous=False, blocks=(1, 1)):
    B, C, H, W, kh, kw, sh, sw, ph, pw = shape
    rng = np.random.default_rng(seed)
    if noncontiguous:           # NCHW view of an NHWC buffer, as the NumPy ops make them
        x = nonzero_normal(rng, (B, H, W, C), dtype).transpose(0, 3, 1, 2)
    else:
        x = nonzero_normal(rng, (B, C, H, W), dtype)
    g = geometry(shape)
    cols = poisoned((B * g[10] * g[11], kh * kw * C), dtype)
    launch("im2col.cu", "im2col", cols.size, x, cols, *g, *blocks)
    if blocks == (1, 1):
        return cols, ops.im2col(x, kh, kw, (sh, sw), (ph, pw))
    return cols, windows.im2col(x, kh, kw, (sh, sw), (ph, pw), blocks=blocks)


def divisor_blocks(shape):
    """(th, tw) for im2col's block order: the smallest factor > 1 of (OH, OW), else 1."""
    g = geometry(shape)
    return tuple(next((d for d in range(2, n + 1) if n % d == 0), 1) for n in g[10:12])


# (K, M): K offsets of M windows; M = 1, odd, and past 256 threads
BLOCK_SHAPES = [(1, 5), (4, 1), (4, 77), (9, 300)]


def run_maxpool_blocks_forward(shape, dtype, launch=emulator.launch, seed=10, relu=False):
    x = unique_signed(np.random.default_rng(seed), shape, dtype)
    y, argmax = poisoned(shape[1:], dtype), np.full(shape[1:], -7, np.int32)
    launch("pool.cu", "maxpool_blocks_forward", y.size, x, y, argmax, y.size, shape[0], int(relu))
    return (y, argmax), windows.maxpool_blocks(x, relu)


def run_maxpool_blocks_backward(shape, dtype, launch=emulator.launch, seed=11, relu=False):
    rng = np.random.default_rng(seed)
    _, argmax = windows.maxpool_blocks(unique_signed(rng, shape, dtype), relu)
    dy = nonzero_normal(rng, shape[1:], dtype)
    dx = poisoned(shape, dtype)
    launch("pool.cu", "maxpool_blocks_backward", dx.size, dy, argmax.astype(np.int32), dx,
           dy.size, shape[0])
    return dx, windows.maxpool_blocks_backward(dy, argmax, shape[0])


def run_col2im(shape, dtype, launch=emulator.launch, seed=1):
    B, C, H, W, kh, kw, sh, sw, ph, pw = shape
    g = geometry(shape)
    cols = nonzero_normal(np.random.default_rng(seed), (B * g[10] * g[11], kh * kw * C), dtype)
    x = poisoned((B, C, H, W), dtype)
    launch("im2col.cu", "col2im", x.size, cols, x, *g)
    return x, ops.col2im(cols, (B, C, H, W), kh, kw, (sh, sw), (ph, pw))


def in_layout(x, channels_last):
    """(the array handed to a forward pooling kernel, x's element strides (b, c, h, w)): x, or
    x's values laid out channels-last, as a convolution's output is."""
    if not channels_last:
        return x, tuple(s // x.itemsize for s in x.strides)
    B, C, H, W = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), (H * W * C, 1, W * C, C)


def run_maxpool_forward(shape, dtype, launch=emulator.launch, seed=2, relu=False,
                        channels_last=False):
    B, C, H, W, kh, kw, sh, sw, ph, pw = shape
    x = unique_signed(np.random.default_rng(seed), (B, C, H, W), dtype)
    g = geometry(shape)
    y, argmax = poisoned((B, C, g[10], g[11]), dtype), np.full((B, C, g[10], g[11]), -7, np.int32)
    memory, strides = in_layout(x, channels_last)
    launch("pool.cu", "maxpool2d_forward", y.size, memory, y, argmax, *g, int(relu), *strides)
    if relu:
        return (y, argmax), windows.maxpool2d(x, kh, kw, (sh, sw), (ph, pw), relu)
    return (y, argmax), ops.maxpool2d(x, kh, kw, (sh, sw), (ph, pw))


def run_maxpool_backward(shape, dtype, launch=emulator.launch, seed=3, relu=False):
    B, C, H, W, kh, kw, sh, sw, ph, pw = shape
    rng = np.random.default_rng(seed)
    x = unique_signed(rng, (B, C, H, W), dtype)
    _, argmax = windows.maxpool2d(x, kh, kw, (sh, sw), (ph, pw), relu)
    dy = nonzero_normal(rng, argmax.shape, dtype)
    dx = poisoned(x.shape, dtype)
    launch("pool.cu", "maxpool2d_backward", dx.size, dy, argmax.astype(np.int32), dx,
           *geometry(shape))
    return dx, ops.maxpool2d_backward(dy, argmax, x.shape, kh, kw, (sh, sw), (ph, pw))


def run_avgpool_forward(shape, dtype, launch=emulator.launch, seed=4, channels_last=False):
    B, C, H, W, kh, kw, sh, sw, ph, pw = shape
    x = unique_signed(np.random.default_rng(seed), (B, C, H, W), dtype) + 2   # all positive
    g = geometry(shape)
    y = poisoned((B, C, g[10], g[11]), dtype)
    memory, strides = in_layout(x, channels_last)
    launch("pool.cu", "avgpool2d_forward", y.size, memory, y, *g, *strides)
    return y, ops.avgpool2d(x, kh, kw, (sh, sw), (ph, pw))


def run_avgpool_backward(shape, dtype, launch=emulator.launch, seed=5):
    B, C, H, W, kh, kw, sh, sw, ph, pw = shape
    g = geometry(shape)
    dy = nonzero_normal(np.random.default_rng(seed), (B, C, g[10], g[11]), dtype)
    dx = poisoned((B, C, H, W), dtype)
    launch("pool.cu", "avgpool2d_backward", dx.size, dy, dx, *g)
    return dx, ops.avgpool2d_backward(dy, (B, C, H, W), kh, kw, (sh, sw), (ph, pw))


# --- each kernel against NumPy --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=_ids(CONV_SHAPES))
def test_im2col(shape, dtype):
    got, want = run_im2col(shape, dtype)
    assert_written(got, "im2col")
    assert_same_bits(got, want, "im2col")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=_ids(CONV_SHAPES))
def test_im2col_rows_in_blocks(shape, dtype):
    """Rows ordered window by window for a pool that tiles the output (th, tw > 1 where the
    output size allows; 1 where it is prime)."""
    blocks = divisor_blocks(shape)
    got, want = run_im2col(shape, dtype, blocks=blocks)
    assert_written(got, f"im2col in blocks {blocks}")
    assert_same_bits(got, want, f"im2col in blocks {blocks}")


def test_some_im2col_cases_are_in_blocks():
    assert sum(divisor_blocks(s) != (1, 1) for s in CONV_SHAPES) >= 5


@pytest.mark.parametrize("relu", [False, True], ids=["", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=[f"K{k}M{m}" for k, m in BLOCK_SHAPES])
def test_maxpool_blocks(shape, dtype, relu):
    (y, argmax), (want_y, want_argmax) = run_maxpool_blocks_forward(shape, dtype, relu=relu)
    assert_written(y, "maxpool_blocks_forward y")
    assert argmax.min() >= (-1 if relu else 0) and argmax.max() < shape[0]
    assert_same_bits(y, want_y, "maxpool_blocks_forward y")
    assert_same_bits(argmax, want_argmax.astype(np.int32), "maxpool_blocks_forward argmax")
    got, want = run_maxpool_blocks_backward(shape, dtype, relu=relu)
    assert_written(got, "maxpool_blocks_backward")
    assert_same_bits(got, want, "maxpool_blocks_backward")


def test_maxpool_blocks_ties_nan_and_relu():
    """The first maximum wins a tie, a NaN becomes the max without moving argmax, and with the
    ReLU a window with no positive value gives 0 and argmax -1 -- as in the NumPy op."""
    x = np.array([[1.0, 2.0, -1.0, -3.0], [3.0, 2.0, np.nan, -2.0], [3.0, 1.0, 0.5, -1.0]])
    for relu in (False, True):
        y, argmax = np.empty(4), np.empty(4, np.int32)
        emulator.launch("pool.cu", "maxpool_blocks_forward", 4, x, y, argmax, 4, 3, int(relu))
        want_y, want_argmax = windows.maxpool_blocks(x, relu)
        assert_same_bits(y, want_y, "y")
        assert_same_bits(argmax, want_argmax.astype(np.int32), "argmax")
    assert argmax.tolist() == [1, 0, -1, -1] and np.isnan(y[2]) and y[3] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_im2col_noncontiguous_input(dtype):
    got, want = run_im2col(CONV_SHAPES[1], dtype, noncontiguous=True)
    assert_same_bits(got, want, "im2col of a channels-last view")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=_ids(CONV_SHAPES))
def test_col2im(shape, dtype):
    got, want = run_col2im(shape, dtype)
    assert_written(got, "col2im")
    assert_same_bits(got, want, "col2im")


@pytest.mark.parametrize("channels_last", [False, True], ids=["", "nhwc"])
@pytest.mark.parametrize("relu", [False, True], ids=["", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=_ids(POOL_SHAPES))
def test_maxpool2d_forward(shape, dtype, relu, channels_last):
    """relu: the ReLU folded into the pool; argmax -1 where no value beats 0. channels_last: the
    input read in place through its strides."""
    (y, argmax), (want_y, want_argmax) = run_maxpool_forward(shape, dtype, relu=relu,
                                                             channels_last=channels_last)
    assert_written(y, "maxpool2d_forward y")
    lowest = -1 if relu else 0
    assert argmax.min() >= lowest and argmax.max() < shape[4] * shape[5], "argmax not an offset"
    assert_same_bits(y, want_y, "maxpool2d_forward y")
    assert_same_bits(argmax, want_argmax.astype(np.int32), "maxpool2d_forward argmax")


@pytest.mark.parametrize("relu", [False, True], ids=["", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=_ids(POOL_SHAPES))
def test_maxpool2d_backward(shape, dtype, relu):
    got, want = run_maxpool_backward(shape, dtype, relu=relu)
    assert_written(got, "maxpool2d_backward")
    assert_same_bits(got, want, "maxpool2d_backward")


@pytest.mark.parametrize("channels_last", [False, True], ids=["", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=_ids(POOL_SHAPES))
def test_avgpool2d_forward(shape, dtype, channels_last):
    got, want = run_avgpool_forward(shape, dtype, channels_last=channels_last)
    assert_written(got, "avgpool2d_forward")
    # NumPy's mean adds the window in an order of its own: not bit-identical.
    assert_close(got, want, 1e-12 if dtype == np.float64 else 1e-6, "avgpool2d_forward")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=_ids(POOL_SHAPES))
def test_avgpool2d_backward(shape, dtype):
    got, want = run_avgpool_backward(shape, dtype)
    assert_written(got, "avgpool2d_backward")
    assert_same_bits(got, want, "avgpool2d_backward")


def test_maxpool_nan_propagates_without_moving_argmax():
    """A NaN in a window becomes the max, as np.maximum makes it; argmax stays where it was."""
    shape = (1, 1, 4, 4, 2, 2, 2, 2, 0, 0)
    x = unique_signed(np.random.default_rng(7), (1, 1, 4, 4), np.float64)
    x[0, 0, 0, 1] = np.nan                          # second offset of window (0, 0)
    y, argmax = np.empty((1, 1, 2, 2)), np.empty((1, 1, 2, 2), np.int32)
    emulator.launch("pool.cu", "maxpool2d_forward", y.size, x, y, argmax, *geometry(shape), 0,
                    *in_layout(x, False)[1])
    want_y, want_argmax = ops.maxpool2d(x, 2, 2, (2, 2), (0, 0))
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(want_y[0, 0, 0, 0])
    assert_same_bits(y, want_y, "y")
    assert_same_bits(argmax, want_argmax.astype(np.int32), "argmax")


def test_maxpool_with_relu_of_negative_windows_sends_nothing_back():
    """Windows with no positive value: y = 0 (relu of their max), argmax -1, and backward
    writes zeros there, as a ReLU's backward would; the NumPy op agrees bit for bit."""
    shape = (1, 2, 5, 4, 2, 2, 2, 2, 1, 0)
    x = unique_signed(np.random.default_rng(8), (1, 2, 5, 4), np.float64)
    x[0, 0] = -np.abs(x[0, 0]) - 0.1                # channel 0: all negative
    g = geometry(shape)
    y, argmax = np.full((1, 2, g[10], g[11]), 9.0), np.full((1, 2, g[10], g[11]), -7, np.int32)
    emulator.launch("pool.cu", "maxpool2d_forward", y.size, x, y, argmax, *g, 1,
                    *in_layout(x, False)[1])
    want_y, want_argmax = windows.maxpool2d(x, 2, 2, (2, 2), (1, 0), relu=True)
    assert (y[0, 0] == 0).all() and (argmax[0, 0] == -1).all() and (argmax[0, 1] >= 0).any()
    assert_same_bits(y, want_y, "y")
    assert_same_bits(argmax, want_argmax.astype(np.int32), "argmax")
    dy = nonzero_normal(np.random.default_rng(9), y.shape, np.float64)
    dx = poisoned(x.shape, np.float64)
    emulator.launch("pool.cu", "maxpool2d_backward", dx.size, dy, argmax, dx, *g)
    assert (dx[0, 0] == 0).all()
    assert_same_bits(dx, ops.maxpool2d_backward(dy, want_argmax, x.shape, 2, 2, (2, 2), (1, 0)),
                     "dx")


# --- launches that differ from the plain one ------------------------------------------------------

RUNS = {"im2col": (run_im2col, CONV_SHAPES[5]), "col2im": (run_col2im, CONV_SHAPES[5]),
        "maxpool_blocks_forward": (run_maxpool_blocks_forward, (4, 3000)),
        "maxpool_blocks_backward": (run_maxpool_blocks_backward, (4, 3000)),
        "maxpool2d_forward": (run_maxpool_forward, POOL_SHAPES[7]),
        "maxpool2d_backward": (run_maxpool_backward, POOL_SHAPES[7]),
        "avgpool2d_forward": (run_avgpool_forward, POOL_SHAPES[7]),
        "avgpool2d_backward": (run_avgpool_backward, POOL_SHAPES[7])}


def _flat(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("kernel", sorted(RUNS))
def test_grid_stride_loop_covers_every_element(kernel, monkeypatch):
    """With the grid capped at 2 blocks (512 threads), each thread loops over many elements."""
    run, shape = RUNS[kernel]
    full, _ = run(shape, np.float64)
    monkeypatch.setattr(minicnn.cuda, "MAX_BLOCKS", 2)
    assert minicnn.cuda.grid_for(10**6) == 2
    capped, _ = run(shape, np.float64)
    assert _flat(capped)[0].size > 4 * 2 * minicnn.cuda.THREADS_PER_BLOCK
    for got, want in zip(_flat(capped), _flat(full)):
        assert_same_bits(got, want, f"{kernel} on 2 blocks")


@pytest.mark.parametrize("kernel", sorted(RUNS))
def test_results_do_not_depend_on_thread_order(kernel):
    run, shape = RUNS[kernel]
    forward, _ = run(shape, np.float32)
    backward, _ = run(shape, np.float32, launch=emulator.launch_reversed)
    for got, want in zip(_flat(backward), _flat(forward)):
        assert_same_bits(got, want, f"{kernel}, threads run last to first")


# --- the emulator itself --------------------------------------------------------------------------

BUGGY = r"""
extern "C" __global__ void copy_one_too_far(const scalar_t* __restrict__ x,
                                            scalar_t* __restrict__ y, long long n) {
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx <= n;
         idx += (long long)blockDim.x * gridDim.x) {
        y[idx] = idx < n ? x[idx] : (scalar_t)0;     // idx == n: one past the end
    }
}
"""


def test_out_of_bounds_write_is_caught(tmp_path):
    path = tmp_path / "buggy.cu"
    path.write_text(BUGGY)
    x, y = np.ones(300), np.empty(300)
    with pytest.raises(emulator.EmulatorError, match=r"argument y: .*out of bounds.*\[300\]"):
        emulator.launch(str(path), "copy_one_too_far", x.size, x, y, x.size)


@pytest.mark.parametrize("body, message", [
    ("y[0] = x[0] +;", "error"),
    ("__shared__ scalar_t tile[32]; y[0] = tile[0] +;", "error"),     # the cooperative build
], ids=["syntax", "cooperative"])
def test_compile_errors_name_file_options_and_output(tmp_path, body, message):
    path = tmp_path / "broken.cu"
    path.write_text('extern "C" __global__ void broken(const scalar_t* __restrict__ x, '
                    "scalar_t* __restrict__ y) {\n    " + body + "\n}\n")
    with pytest.raises(minicnn.cuda.KernelCompileError) as err:
        emulator.launch(str(path), "broken", 1, np.ones(1, np.float32), np.empty(1, np.float32))
    text = str(err.value)
    assert str(path) in text and "-Dscalar_t=float" in text and message in text


def test_launcher_checks_reach_the_emulator():
    """The GPU's Launcher refuses outputs that are not C-contiguous and wrongly typed arrays."""
    g = (1, 1, 2, 3, 1, 1, 1, 1, 0, 0, 2, 3)
    cols = np.ones((6, 1))
    x = np.empty((1, 1, 3, 2)).transpose(0, 1, 3, 2)       # (1,1,2,3), not C-contiguous
    with pytest.raises(ValueError, match="argument x: the kernel writes this array"):
        emulator.launch("im2col.cu", "col2im", 6, cols, x, *g)
    dy = np.ones((1, 1, 2, 3))
    with pytest.raises(TypeError, match="argument argmax"):
        emulator.launch("pool.cu", "maxpool2d_backward", 6, dy, np.zeros(dy.shape, np.int64),
                        np.empty(dy.shape), *g)
