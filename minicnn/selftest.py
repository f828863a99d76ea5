"""``python -m minicnn selftest [--out DIR] [--quick]``: the checks that earn minicnn trust here.

Runs a table of small checks and writes ``report.json`` and ``report.md`` into DIR (default
``./minicnn-selftest``), with the machine's facts, each check's result and a timing table.
Returns exit status 0 when no check failed (skipped ones included), 1 otherwise.

- Always: every kernel of ``kernels/*.cu`` run on the CPU by the emulator (when a C++ compiler
  is here) against its NumPy reference, and each layer's backward gradchecked in float64.
- With a usable GPU, also: every kernel on the GPU against its reference, every layer CPU
  against GPU, 20 training steps CPU against GPU, the CUDA-graph step against the eager step,
  two GPU runs bit-identical, and images/s at batch 128 beside PyTorch.

Errors are measured as max |got - want| / max |want|: relative to the largest magnitude of the
reference, so that values near zero do not dominate. ``--quick`` runs fewer shapes and steps;
``--only TEXT`` only the checks whose name contains TEXT.
"""
import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, backend, cuda, fused, ops
from .backend import get_default_dtype, rng, seed, set_default_dtype, to_numpy
from .io import write_atomic

DEFAULT_OUT = "minicnn-selftest"
DESCRIPTION = ("Check every kernel and layer of minicnn against its reference (on the CPU, and CPU "
               "against GPU where a GPU is usable), train a few steps, time the GPU step, and "
               "write report.json and report.md. Exit status 1 when a check fails.")
REPORT_VERSION = 1

# --- tolerances: max |got - want| / max |want| ------------------------------------------------
F64 = 1e-12                 # float64, any operation
F32_SAME = 1e-6             # float32, the same operations in the same order (pooling, ReLU, copies)
F32_SUMS = 5e-4             # float32 products and sums in another order (cuBLAS against OpenBLAS)
F32_EXP = 1e-5              # float32 exp and log: libm, NumPy and CUDA differ by an ulp or two
TRAIN_F64, TRAIN_F32 = 1e-9, 2e-3   # parameters after training steps: the differences compound
GRADCHECK = {"eps": 1e-6, "atol": 1e-5, "rtol": 1e-4}
TOLERANCES = {
    "float64": F64, "float32 same operations": F32_SAME, "float32 products and sums": F32_SUMS,
    "float32 exp/log (softmax cross-entropy)": F32_EXP, "training float64": TRAIN_F64,
    "training float32": TRAIN_F32, "integer outputs, determinism, graph vs eager": 0.0,
    "gradcheck (float64, central differences)": GRADCHECK,
}


# --- results -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a check measured: the worst error, its tolerance and what was off (empty: passed)."""
    max_error: float = None
    tolerance: float = None
    failures: list = field(default_factory=list)
    detail: str = ""


@dataclass
class Result:
    name: str
    group: str
    status: str                 # "pass", "fail" or "skip"
    seconds: float
    max_error: float = None
    tolerance: float = None
    detail: str = ""
    traceback: str = None


def relative_error(got, want):
    """max |got - want| / max |want| over the finite reference values (the plain max difference
    where they are all zero).

    NaN where the reference has NaN counts as equal; NaN anywhere else, an infinity the other
    side lacks, or integer outputs that differ count as inf. Shapes must agree.
    """
    got, want = np.asarray(to_numpy(got)), np.asarray(to_numpy(want))
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape}, expected {want.shape}")
    if want.dtype.kind in "biu" or got.dtype.kind in "biu":
        return 0.0 if np.array_equal(got, want) else math.inf
    g, w = got.astype(np.float64), want.astype(np.float64)
    nan = np.isnan(w)
    if not np.array_equal(np.isnan(g), nan):
        return math.inf
    differ = (g != w) & ~nan
    if not differ.any():
        return 0.0
    diff = float(np.max(np.abs(g[differ] - w[differ])))      # inf where one side is infinite
    finite = np.abs(w[np.isfinite(w)])
    scale = float(finite.max()) if finite.size else 0.0
    return diff / scale if scale > 0 else diff


class Compare:
    """Collects comparisons of one check; ``outcome()`` reports the worst against its tolerance."""

    def __init__(self):
        self.items = []                     # (what, error, tolerance)

    def __call__(self, what, got, want, tol):
        self.items.append((what, relative_error(got, want), tol))

    def outcome(self, detail=""):
        def ratio(item):
            _, err, tol = item
            return err / tol if tol > 0 else (math.inf if err > 0 else 0.0)
        if not self.items:
            return Outcome(detail=detail)
        worst = max(self.items, key=ratio)
        failures = [f"{what}: {err:.3g} > {tol:g}" for what, err, tol in self.items
                    if ratio((what, err, tol)) > 1]
        return Outcome(worst[1], worst[2], failures, detail)


# --- where kernels run -------------------------------------------------------------------------

@dataclass
class Where:
    """A place to run kernels: ``put`` copies a NumPy array there, ``launch`` is the launcher
    the ``*_kernel`` functions take (None: ``minicnn.cuda.launch``, the GPU's)."""
    put: object
    launch: object = None


def _emulated():
    from .testing import emulator
    return Where(lambda a: np.array(a, copy=True), emulator.launch)


def _on_gpu():
    import cupy
    return Where(cupy.asarray)


# --- inputs ------------------------------------------------------------------------------------

def distinct(rng, shape, dtype):
    """Values in [-0.5, 0.5) with no two alike and none zero: max pooling has no ties to break
    differently, and finite differences never straddle a kink."""
    n = int(np.prod(shape))
    ranks = rng.permutation(n).reshape(shape) + rng.uniform(0.2, 0.8, size=shape)
    return (ranks / n - 0.5).astype(dtype)


def normal(rng, shape, dtype, scale=1.0):
    """Standard normal values times ``scale``, none of them near zero."""
    x = rng.standard_normal(shape)
    x[np.abs(x) < 1e-3] = 0.5
    return (scale * x).astype(dtype)


@dataclass(frozen=True)
class Window:
    """A window geometry: input (B, C, H, W), kernel k, stride s, padding p (each (h, w))."""
    B: int
    C: int
    H: int
    W: int
    k: tuple
    s: tuple
    p: tuple

    @property
    def x_shape(self):
        return (self.B, self.C, self.H, self.W)

    @property
    def out(self):
        return tuple(ops.out_size(n, k, s, p) for n, k, s, p in
                     zip((self.H, self.W), self.k, self.s, self.p))

    @property
    def args(self):
        """(kh, kw, stride, pad): the geometry arguments of every window op."""
        return (*self.k, self.s, self.p)

    def __str__(self):
        return (f"{self.B}x{self.C}x{self.H}x{self.W} k{self.k[0]}x{self.k[1]} "
                f"s{self.s[0]}{self.s[1]} p{self.p[0]}{self.p[1]}")


def windows(seed, n, pool):
    """``n`` random geometries: kernels 1-5 each way, strides 1-3, padding 0-2 (pooling: at most
    half the kernel, so a window always holds a real pixel), sizes from one window up to ~16."""
    r = np.random.default_rng(seed)
    found = []
    for _ in range(n):
        k = tuple(int(v) for v in r.integers(1, 6, size=2))
        s = tuple(int(v) for v in r.integers(1, 4, size=2))
        p = tuple(int(r.integers(0, (kk // 2 if pool else 2) + 1)) for kk in k)
        # at least one window: H + 2p >= k
        H, W = (max(1, kk - 2 * pp) + int(r.integers(0, 12)) for kk, pp in zip(k, p))
        found.append(Window(int(r.integers(1, 5)), int(r.integers(1, 7)), H, W, k, s, p))
    return found


# --- kernels: each against its NumPy reference ---------------------------------------------------
# A case runs one kernel on one input through ``where`` and compares it with the reference op:
# case(where, r, dtype, i, cmp) with r a seeded generator and i the case's index.

def _same(dtype):
    return F64 if dtype == np.float64 else F32_SAME


def _kernel_im2col(where, r, dtype, i, cmp):
    g = windows(100 + i, 1, pool=False)[0]
    x = distinct(r, g.x_shape, dtype)
    cmp(f"{g}", ops.im2col_kernel(where.put(x), *g.args, launch=where.launch),
        ops.im2col(x, *g.args), _same(dtype))
    OH, OW = g.out
    blocks = (2 if OH % 2 == 0 else 1, 2 if OW % 2 == 0 else 1)   # rows in window order
    cmp(f"{g} blocks {blocks}",
        fused.windows.im2col_kernel(where.put(x), *g.args, blocks=blocks, launch=where.launch),
        fused.windows.im2col(x, *g.args, blocks=blocks), _same(dtype))


def _kernel_col2im(where, r, dtype, i, cmp):
    g = windows(200 + i, 1, pool=False)[0]
    OH, OW = g.out
    cols = normal(r, (g.B * OH * OW, g.k[0] * g.k[1] * g.C), dtype)
    cmp(f"{g}", ops.col2im_kernel(where.put(cols), g.x_shape, *g.args, launch=where.launch),
        ops.col2im(cols, g.x_shape, *g.args), _same(dtype))


def _channels_last(where, x):
    """x's values on ``where`` as an NCHW view of a channels-last buffer (a convolution's
    output), made there so that the layout survives the copy."""
    return where.put(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)


def _kernel_maxpool2d_forward(where, r, dtype, i, cmp):
    g = windows(300 + i, 1, pool=True)[0]
    x = distinct(r, g.x_shape, dtype)
    for relu, layout in ((False, "NCHW"), (True, "channels-last")):
        dev_x = where.put(x) if layout == "NCHW" else _channels_last(where, x)
        y, argmax = fused.windows.maxpool2d_kernel(dev_x, *g.args, relu, launch=where.launch)
        want_y, want_argmax = fused.windows.maxpool2d(x, *g.args, relu)
        cmp(f"{g} relu={relu} {layout} y", y, want_y, _same(dtype))
        cmp(f"{g} relu={relu} {layout} argmax", argmax, want_argmax.astype(np.int32), 0.0)


def _kernel_maxpool2d_backward(where, r, dtype, i, cmp):
    g = windows(400 + i, 1, pool=True)[0]
    _, argmax = fused.windows.maxpool2d(distinct(r, g.x_shape, dtype), *g.args, relu=bool(i % 2))
    dy = normal(r, argmax.shape, dtype)
    got = ops.maxpool2d_backward_kernel(where.put(dy), where.put(argmax.astype(np.int32)),
                                        g.x_shape, *g.args, launch=where.launch)
    cmp(f"{g}", got, ops.maxpool2d_backward(dy, argmax, g.x_shape, *g.args), _same(dtype))


def _kernel_avgpool2d_forward(where, r, dtype, i, cmp):
    g = windows(500 + i, 1, pool=True)[0]
    x = distinct(r, g.x_shape, dtype) + 1
    for layout in ("NCHW", "channels-last"):
        dev_x = where.put(x) if layout == "NCHW" else _channels_last(where, x)
        cmp(f"{g} {layout}", ops.avgpool2d_kernel(dev_x, *g.args, launch=where.launch),
            ops.avgpool2d(x, *g.args), _same(dtype))


def _kernel_avgpool2d_backward(where, r, dtype, i, cmp):
    g = windows(600 + i, 1, pool=True)[0]
    dy = normal(r, (g.B, g.C, *g.out), dtype)
    cmp(f"{g}", ops.avgpool2d_backward_kernel(where.put(dy), g.x_shape, *g.args,
                                              launch=where.launch),
        ops.avgpool2d_backward(dy, g.x_shape, *g.args), _same(dtype))


def _blocks_shape(r):
    """(K, M, C): K offsets of a pooling window, M windows, C channels."""
    return tuple(int(v) for v in (r.integers(1, 10), r.integers(1, 300), r.integers(1, 5)))


def _kernel_maxpool_blocks_forward(where, r, dtype, i, cmp):
    x = distinct(r, _blocks_shape(r), dtype)
    for relu in (False, True):
        y, argmax = fused.windows.maxpool_blocks_kernel(where.put(x), relu, launch=where.launch)
        want_y, want_argmax = fused.windows.maxpool_blocks(x, relu)
        cmp(f"{x.shape} relu={relu} y", y, want_y, _same(dtype))
        cmp(f"{x.shape} relu={relu} argmax", argmax, want_argmax.astype(np.int32), 0.0)


def _kernel_maxpool_blocks_backward(where, r, dtype, i, cmp):
    x = distinct(r, _blocks_shape(r), dtype)
    _, argmax = fused.windows.maxpool_blocks(x, relu=bool(i % 2))
    dy = normal(r, argmax.shape, dtype)
    got = fused.windows.maxpool_blocks_backward_kernel(where.put(dy),
                                                 where.put(argmax.astype(np.int32)), x.shape[0],
                                                 launch=where.launch)
    cmp(f"{x.shape}", got, fused.windows.maxpool_blocks_backward(dy, argmax, x.shape[0]),
        _same(dtype))


def _rows(r):
    return int(r.integers(1, 300)), int(r.integers(1, 40))


def _kernel_bias_relu_forward(where, r, dtype, i, cmp):
    y = normal(r, _rows(r), dtype)
    bias = normal(r, y.shape[1:], dtype)
    got = fused.bias_relu_kernel(where.put(y), where.put(bias), launch=where.launch)
    cmp(f"{y.shape}", got, fused.bias_relu(y.copy(), bias), _same(dtype))


def _kernel_relu_backward(where, r, dtype, i, cmp):
    y = np.maximum(normal(r, _rows(r), dtype), 0)            # a ReLU's output, zeros included
    dy = normal(r, y.shape, dtype)
    cmp(f"{y.shape}", fused.relu_backward_kernel(where.put(dy), where.put(y), launch=where.launch),
        fused.relu_backward(dy, y), _same(dtype))


def _kernel_softmax_cross_entropy(where, r, dtype, i, cmp):
    B, K = int(r.integers(1, 130)), int(r.integers(1, 20))
    logits, targets = normal(r, (B, K), dtype, scale=3.0), r.integers(0, K, B)
    if i % 2 and B > 2:
        targets[1] = K                                    # out of range: NaN row, flag set
    smoothing = 0.1 * (i % 3)
    got = fused.softmax_cross_entropy_kernel(where.put(logits), where.put(targets), smoothing,
                                             launch=where.launch)
    want = fused.softmax_cross_entropy(logits, targets, smoothing)
    tol = F64 if dtype == np.float64 else F32_EXP
    for name, a, b, t in zip(("loss", "grad", "correct", "invalid"), got, want, (tol, tol, 0, 0)):
        cmp(f"({B}, {K}) smoothing {smoothing:g} {name}", a, b, t)


def _kernel_adam_multi_tensor(where, r, dtype, i, cmp):
    from .module import Parameter
    from .optim import Adam, AdamW
    shapes = [tuple(int(v) for v in r.integers(0, 9, size=int(r.integers(1, 4))))
              for _ in range(int(r.integers(1, 6)))]
    host = [[normal(r, s, dtype) for s in shapes] for _ in range(4)]
    host[3] = [np.abs(v) for v in host[3]]                  # exp_avg_sq >= 0
    dev = [[where.put(a) for a in arrays] for arrays in host]
    decoupled, wd = bool(i % 2), 0.05 * (i % 3)
    params = [Parameter(a) for a in host[0]]                # the reference: optim.Adam, in place
    reference = (AdamW if decoupled else Adam)(params, weight_decay=wd)
    for j, p in enumerate(params):
        p.grad[...] = host[1][j]
        reference.state[j] = {"exp_avg": host[2][j], "exp_avg_sq": host[3][j]}
    for step, lr in enumerate((1e-2, 3e-3), start=1):      # a second step with a new lr
        reference.lr = lr
        reference.step()
        constants = fused.AdamConstants.at_step(lr, (0.9, 0.999), 1e-8, wd, step, decoupled)
        hyper = fused.adam_hyper(constants, np, dtype)
        fused.adam_multi_tensor(*dev, where.put(hyper), launch=where.launch)
    for k, name in ((0, "param"), (2, "exp_avg"), (3, "exp_avg_sq")):   # grads stay as given
        for j, (got, want) in enumerate(zip(dev[k], host[k])):
            cmp(f"{'AdamW' if decoupled else 'Adam'} wd={wd:g} {name}[{j}] {want.shape}", got,
                want, _same(dtype))


def _kernel_gemm(where, r, dtype, i, cmp):
    M, K, N = (int(v) for v in r.integers(1, 70, size=3))
    a, b = normal(r, (M, K), dtype), normal(r, (K, N), dtype)
    tol = F64 if dtype == np.float64 else F32_SUMS      # sums in another order than BLAS's
    want = ops.matmul(a, b)
    transposed = {"a": where.put(np.ascontiguousarray(a.T)).T,    # views read in place
                  "b": where.put(np.ascontiguousarray(b.T)).T}
    for label, da, db in ((f"({M}, {K}) @ ({K}, {N})", where.put(a), where.put(b)),
                          ("a transposed view", transposed["a"], where.put(b)),
                          ("b transposed view", where.put(a), transposed["b"])):
        cmp(label, ops.matmul_kernel(da, db, launch=where.launch), want, tol)
    x = normal(r, (2, int(r.integers(1, 4)), M, K), dtype)     # a batch against one matrix
    cmp(f"{x.shape} @ ({K}, {N})", ops.matmul_kernel(where.put(x), where.put(b),
                                                     launch=where.launch), ops.matmul(x, b), tol)
    cmp(f"({M}, {K}) @ {x.transpose(0, 1, 3, 2).shape}",
        ops.matmul_kernel(where.put(a), where.put(np.ascontiguousarray(x.transpose(0, 1, 3, 2))),
                          launch=where.launch),
        ops.matmul(a, x.transpose(0, 1, 3, 2)), tol)


def _kernel_gemm_tiled(where, r, dtype, i, cmp):
    """fused.gemm.matmul_tiled (kernels/gemm_tiled.cu) on shapes that K does not split: random
    sizes up to 150 (across several 64x64 tiles), transposed views, a batch."""
    from .fused.gemm import matmul_tiled
    M, K, N = (int(v) for v in r.integers(1, 150, size=3))
    a, b = normal(r, (M, K), dtype), normal(r, (K, N), dtype)
    tol = F64 if dtype == np.float64 else F32_SUMS
    want = ops.matmul(a, b)
    transposed = {"a": where.put(np.ascontiguousarray(a.T)).T,
                  "b": where.put(np.ascontiguousarray(b.T)).T}
    for label, da, db in ((f"({M}, {K}) @ ({K}, {N})", where.put(a), where.put(b)),
                          ("both transposed views", transposed["a"], transposed["b"])):
        cmp(label, matmul_tiled(da, db, launch=where.launch), want, tol)
    x = normal(r, (3, M, K), dtype)
    cmp(f"{x.shape} @ ({K}, {N})", matmul_tiled(where.put(x), where.put(b), launch=where.launch),
        ops.matmul(x, b), tol)


def _kernel_gemm_tiled_reduce(where, r, dtype, i, cmp):
    """matmul_tiled on products whose K is split (fused.gemm.TILING.split), as a convolution's
    weight gradient cols.T @ dy: the partial products, then gemm_tiled_reduce's sums."""
    from .fused.gemm import TILING, matmul_tiled
    M, N = int(r.integers(1, 70)), int(r.integers(1, 70))
    K = int(r.integers(2 * TILING.split_min_k, 5 * TILING.split_min_k))
    stored, b = normal(r, (K, M), dtype), normal(r, (K, N), dtype)
    tol = F64 if dtype == np.float64 else F32_SUMS
    splits = TILING.split(1, M, N, K)[0]
    got = matmul_tiled(where.put(stored).T, where.put(b), launch=where.launch)  # as cols.T
    cmp(f"({M}, {K}) @ ({K}, {N}), K in {splits} slices", got, ops.matmul(stored.T, b), tol)


KERNELS = {  # kernel name in kernels/*.cu -> its case
    "im2col": _kernel_im2col,
    "col2im": _kernel_col2im,
    "maxpool2d_forward": _kernel_maxpool2d_forward,
    "maxpool2d_backward": _kernel_maxpool2d_backward,
    "avgpool2d_forward": _kernel_avgpool2d_forward,
    "avgpool2d_backward": _kernel_avgpool2d_backward,
    "maxpool_blocks_forward": _kernel_maxpool_blocks_forward,
    "maxpool_blocks_backward": _kernel_maxpool_blocks_backward,
    "bias_relu_forward": _kernel_bias_relu_forward,
    "relu_backward": _kernel_relu_backward,
    "softmax_cross_entropy": _kernel_softmax_cross_entropy,
    "adam_multi_tensor": _kernel_adam_multi_tensor,
    "gemm": _kernel_gemm,
    "gemm_tiled": _kernel_gemm_tiled,
    "gemm_tiled_reduce": _kernel_gemm_tiled_reduce,
}


def kernel_check(name, dtype, where_factory):
    """The check of kernel ``name`` in ``dtype`` on the place ``where_factory()`` gives."""
    def run(env):
        where, cmp = where_factory(), Compare()
        cases = 2 if env.quick else 6
        for i in range(cases):
            KERNELS[name](where, np.random.default_rng([i, zlib.crc32(name.encode())]), dtype, i,
                          cmp)
        return cmp.outcome(f"{cases} random inputs")
    return run


def check_every_kernel_has_a_check(env):
    """Every ``extern "C" __global__`` kernel of kernels/*.cu has an entry in KERNELS."""
    found = {name: path.name for path in cuda.kernel_files() for name in cuda.signatures(path.name)}
    missing = sorted(f"{file}:{name}" for name, file in found.items() if name not in KERNELS)
    return Outcome(failures=[f"no check for kernel {m}" for m in missing],
                   detail=f"{len(found)} kernels in {len(cuda.kernel_files())} files")


# --- layers --------------------------------------------------------------------------------------

def _layers():
    """(label, factory, input shape, float32 tolerance of CPU against GPU) of every layer."""
    from . import layers, normalization
    from .module import Sequential

    def small_network():
        return Sequential(layers.Conv2d(1, 2, 3), layers.ReLU(), layers.MaxPool2d(2),
                          layers.Conv2d(2, 3, 3), layers.ReLU(), layers.MaxPool2d(2),
                          layers.Flatten(), layers.Linear(3, 4), layers.ReLU(),
                          layers.Linear(4, 3))

    def fused_conv(relu, pool):
        return lambda: fused.FusedConv2d(layers.Conv2d(3, 4, 3), relu, pool)
    return [
        ("Conv2d(3, 4, 3)", lambda: layers.Conv2d(3, 4, 3), (2, 3, 7, 6), F32_SUMS),
        ("Conv2d(2, 3, (2, 3), stride=2, padding=1)",
         lambda: layers.Conv2d(2, 3, (2, 3), stride=2, padding=1), (1, 2, 7, 8), F32_SUMS),
        ("Linear(12, 5)", lambda: layers.Linear(12, 5), (4, 12), F32_SUMS),
        ("MaxPool2d(2)", lambda: layers.MaxPool2d(2), (2, 3, 6, 5), F32_SAME),
        ("MaxPool2d(3, stride=2, padding=1)", lambda: layers.MaxPool2d(3, stride=2, padding=1),
         (2, 2, 7, 7), F32_SAME),
        ("AvgPool2d(3, stride=1, padding=1)", lambda: layers.AvgPool2d(3, stride=1, padding=1),
         (1, 3, 6, 5), F32_SAME),
        # its windows are averaged by matrix products: sums in another order on the GPU
        ("AdaptiveAvgPool2d(2)", lambda: layers.AdaptiveAvgPool2d(2), (2, 3, 5, 5), F32_SUMS),
        ("ReLU()", layers.ReLU, (2, 3, 4, 5), F32_SAME),
        ("Flatten()", layers.Flatten, (2, 3, 4, 5), F32_SAME),
        ("Dropout(0.4)", lambda: layers.Dropout(0.4), (4, 30), F32_SAME),
        ("BatchNorm2d(3)", lambda: normalization.BatchNorm2d(3), (4, 3, 4, 4), F32_SUMS),
        ("BatchNorm1d(6)", lambda: normalization.BatchNorm1d(6), (5, 6), F32_SUMS),
        ("conv-relu-pool x2, linear x2", small_network, (2, 1, 12, 12), F32_SUMS),
        # the fused modules, and the network above fused (minicnn.fuse): as in mnist_cnn, the
        # convolutions apply their ReLU and max pool
        ("FusedConv2d(Conv2d(3, 4, 3), relu=True, pool=MaxPool2d(2))",
         fused_conv(True, layers.MaxPool2d(2)), (2, 3, 9, 8), F32_SUMS),
        ("FusedConv2d(Conv2d(3, 4, 3), relu=True, pool=AvgPool2d(2))",
         fused_conv(True, layers.AvgPool2d(2)), (2, 3, 8, 9), F32_SUMS),
        ("FusedConv2d(Conv2d(3, 4, 3), pool=FusedMaxPool2d(MaxPool2d(3, 2, 1), relu=True))",
         fused_conv(False, fused.FusedMaxPool2d(layers.MaxPool2d(3, 2, 1), relu=True)),
         (1, 3, 9, 9), F32_SUMS),
        ("FusedLinear(Linear(12, 5), relu=True)",
         lambda: fused.FusedLinear(layers.Linear(12, 5), relu=True), (4, 12), F32_SUMS),
        ("FusedMaxPool2d(MaxPool2d(3, 2, 1), relu=True)",
         lambda: fused.FusedMaxPool2d(layers.MaxPool2d(3, 2, 1), relu=True), (2, 2, 7, 7),
         F32_SAME),
        ("fuse(conv-relu-pool x2, linear x2)", lambda: fused.fuse(small_network()),
         (2, 1, 12, 12), F32_SUMS),
    ]


@contextlib.contextmanager
def default_dtype(dtype):
    """minicnn's default dtype set to ``dtype`` inside, restored after."""
    before = get_default_dtype()
    set_default_dtype(dtype)
    try:
        yield
    finally:
        set_default_dtype(before)


def gradcheck_layer(make, shape):
    """The check: ``minicnn.gradcheck`` of the layer in float64 on distinct values."""
    def run(env):
        from .testing import GradcheckError, gradcheck
        with default_dtype(np.float64):
            layer, x = make(), distinct(np.random.default_rng(3), shape, np.float64)
            try:
                report = gradcheck(layer, x, **GRADCHECK)
            except GradcheckError as e:
                return Outcome(failures=[str(e)], detail="float64, central differences")
        return Outcome(max(report.values()), GRADCHECK["rtol"], [],
                       "max |analytic - numeric| / (|numeric| + atol) over " + ", ".join(report))
    return run


def layer_parity(make, shape, dtype, tol32):
    """The check: forward, input gradient and parameter gradients of a layer, CPU against GPU."""
    def run(env):
        import copy
        tol = F64 if dtype == np.float64 else tol32
        cmp = Compare()
        with default_dtype(dtype):
            cpu_layer = make()
            gpu_layer = copy.deepcopy(cpu_layer).to("cuda")
            r = np.random.default_rng(4)
            x = distinct(r, shape, dtype)
            dy = normal(r, cpu_layer.output_shape(shape), dtype)
            runs = []
            for layer, put in ((cpu_layer, np.asarray), (gpu_layer, _on_gpu().put)):
                seed(7)                             # dropout draws the same mask on both
                y = layer(put(x))
                dx = layer.backward(put(dy))
                runs.append([y, dx] + [p.grad for p in layer.parameters()])
        names = ["forward", "input gradient"] + [f"{n} gradient" for n, _ in
                                                 cpu_layer.named_parameters()]
        for name, got, want in zip(names, runs[1], runs[0]):
            cmp(name, got, want, tol)
        return cmp.outcome(f"input {shape}")
    return run


# --- training ------------------------------------------------------------------------------------

def train_steps(device, dtype, steps, fast=False):
    """Parameters (NumPy) of ``mnist_cnn`` after ``steps`` Adam steps on the bundled MNIST
    sample, batch 32, shuffled by seed 3: the same batches on every device. ``fast``: the fused
    network (``minicnn.fuse``), ``FusedAdam`` and the fused loss."""
    from . import Adam, CrossEntropyLoss, DataLoader, mnist_sample
    from .models import mnist_cnn
    with default_dtype(dtype):
        seed(3)
        model = (fused.fuse(mnist_cnn()) if fast else mnist_cnn()).to(device)
        opt = (fused.FusedAdam if fast else Adam)(model.parameters(), lr=1e-3)
        loss_fn = fused.CrossEntropyLoss() if fast else CrossEntropyLoss()
        loader = DataLoader(mnist_sample(train=True), batch_size=32, shuffle=True, device=device)
        for _, (x, y) in zip(range(steps), loader):
            loss_fn(model(x), y)
            opt.zero_grad()
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
        return [to_numpy(p.data) for p in model.parameters()]


def _steps(env):
    return 5 if env.quick else 20


def _network(fast):
    return "fused mnist_cnn, FusedAdam" if fast else "mnist_cnn, Adam"


def training_parity(dtype, fast):
    def run(env):
        tol = TRAIN_F64 if dtype == np.float64 else TRAIN_F32
        cmp = Compare()
        gpu = train_steps("cuda", dtype, _steps(env), fast)
        cpu = train_steps("cpu", dtype, _steps(env), fast)
        for j, (g, c) in enumerate(zip(gpu, cpu)):
            cmp(f"parameter {j} {c.shape}", g, c, tol)
        return cmp.outcome(f"{_steps(env)} steps of {_network(fast)}, batch 32")
    return run


def two_runs_identical(device):
    def run(env):
        cmp = Compare()
        first, second = (train_steps(device, np.float32, _steps(env), fast)
                         for fast in (True, True))
        for j, (a, b) in enumerate(zip(first, second)):
            cmp(f"parameter {j} {a.shape}", a, b, 0.0)
        return cmp.outcome(f"{_steps(env)} steps of {_network(True)}, float32, twice on the "
                           f"{device}")
    return run


def _products(kernel):
    """The ``ops.products_by_kernel`` block of ``kernel``: None (cuBLAS, no block), "reference"
    (kernels/gemm.cu) or "tiled" (kernels/gemm_tiled.cu)."""
    if kernel is None:
        return contextlib.nullcontext()
    from .fused.gemm import matmul_tiled
    return ops.products_by_kernel({"reference": ops.matmul_kernel, "tiled": matmul_tiled}[kernel])


def fit_on_gpu(env, cuda_graph, kernel_products):
    """(parameters, [(train_loss, train_accuracy) per epoch]) of ``fit`` on the GPU: 1,000 bundled
    images at batch 128 (7 full batches, then one of 104 that runs eagerly), a one-cycle learning
    rate changed every step; the fused network (``minicnn.fuse``) and loss; the products by
    ``kernel_products`` (``_products``); memoised per arguments."""
    key = ("fit", cuda_graph, kernel_products)
    if key not in env.memo:
        from . import DataLoader, OneCycleLR, fit, mnist_sample
        from .fused import CrossEntropyLoss, FusedAdam
        from .models import mnist_cnn
        epochs = 1 if env.quick else 2
        with default_dtype(np.float32):
            seed(5)
            model = fused.fuse(mnist_cnn()).to("cuda")
            opt = FusedAdam(model.parameters(), lr=1e-3)
            loader = DataLoader(mnist_sample(train=False), batch_size=128, shuffle=True,
                                device="cuda")
            sched = OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * len(loader))
            with _products(kernel_products):
                history = fit(model, CrossEntropyLoss(), opt, loader, epochs=epochs,
                              scheduler=sched, scheduler_interval="batch", progress=False,
                              verbose=False, cuda_graph=cuda_graph)
        env.memo[key] = ([to_numpy(p.data) for p in model.parameters()],
                         [(row["train_loss"], row["train_accuracy"]) for row in history.epochs])
    return env.memo[key]


def check_graph_against_eager(env):
    """fit(cuda_graph=True) against fit(), both with the tiled kernel's products: bit-identical."""
    # The recorded step computes its products with the tiled GEMM kernel (GraphStep's choice, here
    # that of the enclosing block too), so the eager run must too: cuBLAS sums in other orders.
    eager, eager_rows = fit_on_gpu(env, False, "tiled")
    try:
        graphed, graph_rows = fit_on_gpu(env, True, "tiled")
    except ValueError as e:           # fit refused: this step cannot be recorded here
        return Outcome(failures=[f"fit(cuda_graph=True) cannot record the step: {e}"])
    cmp = Compare()
    for j, (a, b) in enumerate(zip(graphed, eager)):
        cmp(f"parameter {j} {b.shape}", a, b, 0.0)
    cmp("epoch loss and accuracy", np.array(graph_rows), np.array(eager_rows), 0.0)
    return cmp.outcome(f"{len(eager_rows)} epoch(s) of 1,000 images, batch 128, OneCycleLR")


def check_kernel_products_against_cublas(env):
    """Eager fit with each of minicnn's GEMM kernels against eager fit with cuBLAS: float32
    rounding."""
    theirs, _ = fit_on_gpu(env, False, None)
    cmp = Compare()
    for kernel in ("reference", "tiled"):
        ours, _ = fit_on_gpu(env, False, kernel)
        for j, (a, b) in enumerate(zip(ours, theirs)):
            cmp(f"{kernel} kernel, parameter {j} {b.shape}", a, b, TRAIN_F32)
    return cmp.outcome("parameters after the same steps, reference and tiled kernel")


# --- timing ---------------------------------------------------------------------------------------

TIMING_BATCH = 128


def _minicnn_step(x, y, graph, fast=True, matmul=None):
    """One training step of mnist_cnn on the GPU batch (x, y); with ``graph``, recorded once as a
    CUDA graph and replayed (the step of ``fit(cuda_graph=True)``), its products by ``matmul``
    (None: GraphStep's choice, the tiled kernel). ``fast``: the fused network (``minicnn.fuse``),
    FusedAdam and the fused loss; else the plain ones."""
    from . import Adam, CrossEntropyLoss
    from .fused.graph import GraphStep
    from .models import mnist_cnn
    model = (fused.fuse(mnist_cnn()) if fast else mnist_cnn()).to("cuda")
    loss_fn = fused.CrossEntropyLoss() if fast else CrossEntropyLoss()
    opt = (fused.FusedAdam if fast else Adam)(model.parameters(), lr=1e-3)

    def body(xs, ys):
        loss_fn(model(xs), ys)
        opt.zero_grad()
        model.backward(loss_fn.backward(), input_grad=False)
        opt.apply_step()
    if graph:
        recorded = GraphStep(body, opt.prepare_step, matmul=matmul)
        return lambda: recorded(x, y)
    return lambda: (opt.prepare_step(), body(x, y))


def torch_unusable_reason():
    """None when PyTorch can train on a CUDA GPU in this process, else why not."""
    try:
        import torch
    except ImportError as e:
        return f"PyTorch is not installed ({e})"
    except Exception as e:
        return f"PyTorch failed to import: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} cannot use CUDA here (built for CUDA " \
               f"{torch.version.cuda})"
    return None


def _torch_step(x, y):
    """PyTorch's training step of the same network, loss and optimizer, fp32 (no TF32), cuDNN."""
    import torch
    from torch import nn
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()

    def step():
        opt.zero_grad()
        loss_fn(model(xt), yt).backward()
        opt.step()
    return step


@dataclass
class Contender:
    """A column of the timing table: ``make()`` builds its step function; ``context`` is entered
    around making and around every timed run (the reference kernel's products, for an eager
    minicnn step)."""
    name: str
    make: object
    context: object = contextlib.nullcontext


def timing(env):
    """images/s of training steps at batch 128: the plain minicnn network eager (cuBLAS
    products); the fused one (``minicnn.fuse``) eager, eager with the reference GEMM kernel's
    products, and as a CUDA graph with the reference kernel's and with the tiled kernel's
    products; PyTorch fp32. Each figure is the median
    over repeats of the rate of a run of steps; the contenders take turns in every repeat so that
    a slow spell of the machine hits them all. The device is synchronised before each clock read."""
    import cupy
    steps, repeats = (10, 3) if env.quick else (20, 5)
    r = np.random.default_rng(TIMING_BATCH)
    x = r.standard_normal((TIMING_BATCH, 1, 28, 28)).astype(np.float32)
    y = r.integers(0, 10, TIMING_BATCH)
    gx, gy = cupy.asarray(x), cupy.asarray(y)
    waits = [cupy.cuda.Device().synchronize]        # every stream of the device, not just one
    contenders = [
        Contender("minicnn plain eager, cuBLAS products",
                  lambda: _minicnn_step(gx, gy, False, fast=False)),
        Contender("minicnn fused eager, cuBLAS products", lambda: _minicnn_step(gx, gy, False)),
        Contender("minicnn fused eager, reference kernel products",
                  lambda: _minicnn_step(gx, gy, False), ops.products_by_kernel),
        Contender("minicnn fused CUDA graph, reference kernel products",
                  lambda: _minicnn_step(gx, gy, True, matmul=ops.matmul_kernel)),
        # GraphStep itself computes the products of the step it records with the tiled kernel
        Contender("minicnn fused CUDA graph, tiled kernel products",
                  lambda: _minicnn_step(gx, gy, True)),
    ]
    torch_reason = torch_unusable_reason()
    if torch_reason is None:
        import torch
        waits.append(torch.cuda.synchronize)
        contenders.append(Contender("PyTorch fp32 eager, cuDNN", lambda: _torch_step(x, y)))

    def seconds(contender, step, n):
        with contender.context():
            for wait in waits:
                wait()
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            for wait in waits:
                wait()
            return time.perf_counter() - t0

    step_of, errors = {}, {}
    for c in contenders:
        try:
            with default_dtype(np.float32), c.context():
                step = c.make()
            seconds(c, step, 5)        # warm-up: compilation, workspaces, the graph's recording
            step_of[c.name] = step
        except Exception as e:
            errors[c.name] = f"{type(e).__name__}: {e}"
    rates = {name: [] for name in step_of}
    for _ in range(repeats):
        for c in contenders:
            if c.name in step_of:
                rates[c.name].append(TIMING_BATCH * steps / seconds(c, step_of[c.name], steps))
    rows = [{"name": c.name, "images_per_s": statistics.median(rates[c.name])} if c.name in rates
            else {"name": c.name, "images_per_s": None, "error": errors[c.name]}
            for c in contenders]
    env.timing = {"status": "measured", "batch": TIMING_BATCH, "steps": steps, "repeats": repeats,
                  "rows": rows, "torch": torch_reason or _torch_version()}
    measured = "; ".join(f"{row['name']} {row['images_per_s']:,.0f} img/s" for row in rows
                         if row["images_per_s"])
    return Outcome(failures=[f"{name}: {error}" for name, error in errors.items()],
                   detail=measured + ("" if torch_reason is None else
                                      f"; no PyTorch column: {torch_reason}"))


def _torch_version():
    try:
        return f"PyTorch {importlib.metadata.version('torch')}"
    except importlib.metadata.PackageNotFoundError:
        return None


# --- the table of checks --------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    group: str
    run: object                 # run(env) -> Outcome; an exception is a failure
    needs: str = None           # None, "emulator" or "gpu"


def checks():
    """Every check, in the order they run: the CPU's first, then the GPU's."""
    table = [Check("every kernel has a check", "kernels", check_every_kernel_has_a_check)]
    dtypes = ((np.float32, "float32"), (np.float64, "float64"))
    for name in KERNELS:
        for dtype, label in dtypes:
            table.append(Check(f"emulated kernel {name} {label}", "kernels (emulator)",
                               kernel_check(name, dtype, _emulated), "emulator"))
    for label, make, shape, _ in _layers():
        table.append(Check(f"gradcheck {label}", "gradcheck", gradcheck_layer(make, shape)))
    table.append(Check("two CPU runs bit-identical", "training", two_runs_identical("cpu")))
    for name in KERNELS:
        for dtype, label in dtypes:
            table.append(Check(f"GPU kernel {name} {label}", "kernels (GPU)",
                               kernel_check(name, dtype, _on_gpu), "gpu"))
    for label, make, shape, tol32 in _layers():
        for dtype, dlabel in dtypes:
            table.append(Check(f"layer {label} CPU vs GPU {dlabel}", "layers CPU vs GPU",
                               layer_parity(make, shape, dtype, tol32), "gpu"))
    for fast in (False, True):
        for dtype, label in dtypes:
            table.append(Check(f"training steps CPU vs GPU {label}" + (", fused" if fast else ""),
                               "training", training_parity(dtype, fast), "gpu"))
    table += [
        Check("two GPU runs bit-identical", "training", two_runs_identical("cuda"), "gpu"),
        Check("CUDA graph step vs eager step", "CUDA graph", check_graph_against_eager, "gpu"),
        Check("eager: kernel products vs cuBLAS", "CUDA graph",
              check_kernel_products_against_cublas, "gpu"),
        Check(f"timing at batch {TIMING_BATCH}", "timing", timing, "gpu"),
    ]
    return table


# --- running and reporting ------------------------------------------------------------------------

@dataclass
class Env:
    quick: bool
    gpu_reason: str             # None: a usable GPU
    emulator_reason: str        # None: the emulator can build kernels
    memo: dict = field(default_factory=dict)
    timing: dict = None


def _format_error(value):
    if value is None:
        return ""
    return "identical" if value == 0 else f"{value:.3g}"


def run_check(check, env):
    """Run one check -> Result; an exception is a failure, with its traceback kept."""
    t0 = time.perf_counter()
    try:
        outcome = check.run(env)
    except Exception as e:
        return Result(check.name, check.group, "fail", time.perf_counter() - t0,
                      detail=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    status = "fail" if outcome.failures else "pass"
    detail = "; ".join(outcome.failures[:5]) + (f" (+{len(outcome.failures) - 5} more)"
                                                if len(outcome.failures) > 5 else "")
    return Result(check.name, check.group, status, time.perf_counter() - t0, outcome.max_error,
                  outcome.tolerance, detail or outcome.detail)


def _progress(result):
    err = ""
    if result.max_error is not None:
        err = f"max err {_format_error(result.max_error)}"
        if result.tolerance is not None:
            err += f" (tol {result.tolerance:g})"
    line = f"{result.status.upper():<4}  {result.name:<58} {err:<32} {result.seconds:6.2f} s"
    if result.status == "fail":
        line += f"\n      {result.detail}"
    print(line, flush=True)


def _skip_reason(check, env):
    if check.needs == "gpu" and env.gpu_reason is not None:
        return f"no usable GPU: {env.gpu_reason}"
    if check.needs == "emulator" and env.emulator_reason is not None:
        return f"no kernel emulator: {env.emulator_reason}"
    return None


def run_all(env, only=None):
    """Run the checks (with ``only``, a list of texts, those whose name holds one of them) -> list
    of Results, printing a progress line per check and one line per group of skipped ones."""
    results, skipped = [], {}
    for check in checks():
        if only and not any(text in check.name for text in only):
            continue
        reason = _skip_reason(check, env)
        if reason is not None:
            results.append(Result(check.name, check.group, "skip", 0.0, detail=reason))
            skipped.setdefault(reason, []).append(check.name)
            continue
        result = run_check(check, env)
        results.append(result)
        _progress(result)
    for reason, names in skipped.items():
        print(f"SKIP  {len(names)} checks ({names[0]}, ...): {reason}", flush=True)
    return results


def machine_facts(env):
    """Versions and hardware, as far as this machine tells; never raises."""
    facts = {"minicnn": __version__, "python": f"{platform.python_version()} "
             f"({platform.python_implementation()})", "numpy": np.__version__,
             "platform": platform.platform(), "cpus": os.cpu_count(),
             "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        import cupy
        facts["cupy"] = cupy.__version__
        rt = cupy.cuda.runtime
        for key, get in (("cuda_driver", rt.driverGetVersion),
                         ("cuda_runtime", rt.runtimeGetVersion)):
            v = get()
            facts[key] = f"{v // 1000}.{v % 1000 // 10}"
        facts["nvrtc"] = "%d.%d" % cupy.cuda.nvrtc.getVersion()
    except ImportError:
        facts["cupy"] = None
    except Exception as e:                    # CuPy without a driver: keep what was found
        facts.setdefault("cupy_error", f"{type(e).__name__}: {e}")
    if env.gpu_reason is None:
        try:
            import cupy
            dev = cupy.cuda.Device()
            props = cupy.cuda.runtime.getDeviceProperties(dev.id)
            name = props["name"]                       # bytes (a C char array) in CuPy 13 and 14
            facts["gpu"] = name.decode() if isinstance(name, bytes) else name
            facts["compute_capability"] = backend.format_compute_capability(dev.compute_capability)
            facts["gpu_memory_gib"] = round(props["totalGlobalMem"] / 2 ** 30, 1)
        except Exception as e:
            facts.setdefault("gpu", "usable, but its properties could not be read")
            facts["gpu_error"] = f"{type(e).__name__}: {e}"
    else:
        facts["gpu"] = None
        facts["gpu_unavailable"] = env.gpu_reason
    facts["torch"] = (_torch_version() or "not installed").removeprefix("PyTorch ")
    if env.emulator_reason is None:
        from .testing import emulator
        compiler = tuple(emulator._compiler())
        facts["cxx"] = (emulator._compiler_version(compiler).splitlines() or [compiler[0]])[0]
    else:
        facts["cxx"] = None
        facts["emulator_unavailable"] = env.emulator_reason
    return facts


def _jsonable(value):
    """inf as a string (JSON has no infinity), everything else as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def build_report(env, results, seconds, only=None):
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    timing_ = env.timing or {"status": "skipped", "reason": next(
        (r.detail for r in results if r.group == "timing" and r.status != "pass"),
        "not run (excluded by --only)")}
    return {
        "minicnn_selftest": REPORT_VERSION,
        "passed": counts["fail"] == 0,
        "counts": counts,
        "quick": env.quick,
        "only": only,
        "seconds": round(seconds, 2),
        "machine": machine_facts(env),
        "tolerances": TOLERANCES,
        "error_measure": "max |got - want| / max |want|, relative to the largest magnitude of the "
                         "reference; NaN only where the reference has NaN",
        "checks": [{"name": r.name, "group": r.group, "status": r.status,
                    "max_error": _jsonable(r.max_error), "tolerance": r.tolerance,
                    "seconds": round(r.seconds, 3), "detail": r.detail,
                    **({"traceback": r.traceback} if r.traceback else {})} for r in results],
        "timing": timing_,
    }


def report_markdown(report):
    """The report as a Markdown page."""
    c = report["counts"]
    lines = ["# minicnn selftest", "",
             f"**{'PASSED' if report['passed'] else 'FAILED'}**: {c['pass']} passed, "
             f"{c['fail']} failed, {c['skip']} skipped in {report['seconds']:.1f} s"
             + (" (--quick)" if report["quick"] else "")
             + (f", only the checks matching {report['only']}" if report.get("only") else "")
             + ".", "", "## Machine", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {'-' if v is None else v} |" for k, v in report["machine"].items()]
    lines += ["", "## Tolerances", "", f"Error: {report['error_measure']}.", "",
              "| comparison | tolerance |", "|---|---|"]
    for k, v in report["tolerances"].items():
        value = ", ".join(f"{a} {b:g}" for a, b in v.items()) if isinstance(v, dict) else v
        lines.append(f"| {k} | {value} |")
    lines += ["", "## Checks", "", "| check | result | max error | tolerance | seconds | detail |",
              "|---|---|---:|---:|---:|---|"]
    skipped = {}
    for ch in report["checks"]:
        if ch["status"] == "skip":          # listed below, once per reason
            skipped.setdefault(ch["detail"], []).append(ch["name"])
            continue
        err = ch["max_error"]
        err = _format_error(err) if isinstance(err, (int, float)) else (err or "")
        tol = "" if ch["tolerance"] is None else f"{ch['tolerance']:g}"
        detail = ch["detail"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {ch['name']} | {ch['status']} | {err} | {tol} | {ch['seconds']:.2f} | "
                     f"{detail} |")
    for reason, names in skipped.items():
        lines += ["", f"Skipped, {reason}: {', '.join(names)}."]
    lines += ["", "## Timing", ""] + timing_markdown(report["timing"]) + [""]
    return "\n".join(lines)


def timing_markdown(timing_):
    """The timing table as Markdown lines, or a line saying why there is none."""
    if timing_.get("status") != "measured":
        return [f"Not measured: {timing_.get('reason', 'no timing in this report')}."]
    lines = [f"Training steps of `mnist_cnn` (forward, loss, backward, Adam), fp32, batch "
             f"{timing_['batch']}: median of {timing_['repeats']} runs of {timing_['steps']} "
             "steps.",
             "", "| | images/s |", "|---|---:|"]
    for row in timing_["rows"]:
        value = f"{row['images_per_s']:,.0f}" if row.get("images_per_s") else \
            f"failed: {row.get('error', '')}"
        lines.append(f"| {row['name']} | {value} |")
    if not any(row["name"].startswith("PyTorch") for row in timing_["rows"]):
        lines += ["", f"No PyTorch column: {timing_.get('torch')}."]
    return lines


def add_arguments(parser):
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for report.json and report.md (default: ./{DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and training steps")
    parser.add_argument("--only", metavar="TEXT", action="append",
                        help="run only the checks whose name contains TEXT (repeatable: those "
                             "matching any)")


def run(args):
    """Run the selftest for parsed ``args`` (see ``add_arguments``) -> exit status."""
    from .testing import emulator
    env = Env(args.quick, backend.cuda_unavailable_reason(), emulator.unavailable_reason())
    names = [c.name for c in checks()]
    unmatched = [text for text in args.only or () if not any(text in name for name in names)]
    if unmatched:
        print(f"selftest: --only {unmatched[0]!r} matches no check; the names are: "
              + ", ".join(names), file=sys.stderr)
        return 2
    print(f"minicnn {__version__} selftest{' (quick)' if args.quick else ''}; GPU: "
          + ("usable" if env.gpu_reason is None else f"none ({env.gpu_reason})"), flush=True)
    state = rng().bit_generator.state         # leave the caller's generator as it was
    t0 = time.perf_counter()
    try:
        results = run_all(env, args.only)
    finally:
        rng().bit_generator.state = state
    report = build_report(env, results, time.perf_counter() - t0, args.only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "report.md", report_markdown(report))
    failed = [ch["name"] for ch in report["checks"] if ch["status"] == "fail"]
    c = report["counts"]
    print(f"{c['pass']} passed, {c['fail']} failed, {c['skip']} skipped in "
          f"{report['seconds']:.1f} s; reports in {out / 'report.md'} and report.json")
    if failed:
        print("FAILED: " + ", ".join(failed))
    return 1 if failed else 0


def main(argv=()):
    """The selftest with the options ``argv`` (["--quick", "--out", "DIR"], say) -> exit status."""
    parser = argparse.ArgumentParser(prog="python -m minicnn selftest", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))
