"""One process checks the distributed path: the same training steps with and without
``DistributedDataParallel``, which at world size 1 must give the same parameters, and what the
all-reduce costs.

    PYTHONPATH=. python -m minicnn.distributed selfcheck --device cuda   # NCCL on one GPU
    python -m minicnn.distributed selfcheck --device cpu                 # MPI

Needs no ``mpiexec``: MPI starts as a singleton, and without mpi4py a group of one process
stands in for it (said in the output). On a GPU the gradients go through NCCL's allReduce.
"""
import argparse
import importlib.util
import sys
import time

import numpy as np

from .. import backend
from ..backend import get_default_dtype, set_default_dtype, to_numpy
from ..data import mnist_sample
from ..losses import CrossEntropyLoss
from ..models import mnist_cnn
from ..optim import Adam
from .comm import init
from .ddp import DistributedDataParallel


def _synchronizer(dev):
    if dev != "cuda":
        return lambda: None
    import cupy
    return cupy.cuda.Device().synchronize


def _trainer(dev, wrap, group):
    """A step function training a fresh example network (seed 0) with Adam, and the model."""
    backend.seed(0)
    model = mnist_cnn().to(dev)
    if wrap:
        model = DistributedDataParallel(model, group)
    loss_fn, opt = CrossEntropyLoss(), Adam(model.parameters(), lr=1e-3)

    def step(x, y):
        loss_fn(model(x), y)
        opt.zero_grad()
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    return step, model


def _timed(fn, sync, repeats):
    """Median seconds of ``fn()`` over ``repeats`` runs, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _check_size(batch, steps):
    """The bundled training sample, or ValueError when ``steps`` batches of ``batch`` do not fit
    in it (later batches would be empty: a NaN loss and a FAILED comparison)."""
    sample = mnist_sample(train=True)
    if batch * steps > len(sample.images):
        raise ValueError(f"selfcheck: {steps} steps at batch {batch} need {batch * steps:,} "
                         f"images; the bundled sample has {len(sample.images):,}. Lower --steps "
                         f"or --batch-size")
    return sample


def run(device="auto", dtype="float32", steps=10, batch=64, repeats=10, out=print):
    """Train ``steps`` steps at ``batch`` with and without the wrapper; print the comparison and
    timings through ``out``; return a dict of the figures, "ok" true when the parameters agree
    (bit for bit expected; at most 1e-6 (float32) or 1e-12 (float64) relative to the largest).
    ValueError up front when ``batch * steps`` exceeds the bundled sample's 5,000 images."""
    sample = _check_size(batch, steps)
    has_mpi = importlib.util.find_spec("mpi4py") is not None
    if not has_mpi:
        out("mpi4py is not installed: a group of one process without MPI stands in "
            "(world size 1 needs no MPI; a run of many needs pip install \"minicnn[mpi]\")")
    group = init(device, mpi=has_mpi, abort_on_error=False)
    if group.size != 1:
        raise SystemExit("selfcheck compares against one process: run it without mpiexec "
                         f"(this run has {group.size} processes)")
    dev, sync = group.device, _synchronizer(group.device)
    saved_dtype = get_default_dtype()
    set_default_dtype(dtype)
    try:
        xp = dev.xp
        # the collectives themselves: at world size 1 the sum and the broadcast change nothing
        probe = xp.asarray(np.arange(1, 1001, dtype=dtype))
        group.all_reduce_(probe)
        group.broadcast_(probe)
        collectives_ok = bool(np.array_equal(to_numpy(probe), np.arange(1, 1001, dtype=dtype)))

        x_all = xp.asarray(sample.images[:batch * steps].astype(dtype))
        y_all = xp.asarray(sample.labels[:batch * steps])
        batches = [(x_all[i * batch:(i + 1) * batch], y_all[i * batch:(i + 1) * batch])
                   for i in range(steps)]
        plain_step, plain = _trainer(dev, False, group)
        ddp_step, ddp = _trainer(dev, True, group)
        for x, y in batches:
            plain_step(x, y)
            ddp_step(x, y)
        a, b = plain.state_dict(), ddp.state_dict()
        identical = all(np.array_equal(a[k], b[k]) for k in a)
        scale = max(float(np.abs(v).max()) for v in a.values())
        rel = max(float(np.abs(a[k] - b[k]).max()) for k in a) / scale
        tol = 1e-6 if np.dtype(dtype) == np.float32 else 1e-12

        x, y = batches[0]
        plain_s = _timed(lambda: plain_step(x, y), sync, repeats)
        ddp_s = _timed(lambda: ddp_step(x, y), sync, repeats)
        reduce_s = _timed(ddp.reduce_gradients, sync, repeats)
    finally:
        set_default_dtype(saved_dtype)
    ok = collectives_ok and rel <= tol
    carrier = "NCCL allReduce" if dev == "cuda" else ("MPI Allreduce" if has_mpi else "none")
    out(f"minicnn.distributed selfcheck: {dev}, {dtype}, world size 1, gradients through "
        f"{carrier}")
    out(f"  collectives at world size 1 leave the data unchanged: {collectives_ok}")
    out(f"  parameters after {steps} Adam steps at batch {batch}, wrapped vs plain: "
        + ("bit-identical" if identical else f"max difference {rel:.3g} of the largest")
        + f" (tolerance {tol:g})")
    out(f"  step time (median of {repeats}): plain {plain_s * 1e3:.2f} ms, "
        f"DistributedDataParallel {ddp_s * 1e3:.2f} ms, of which the gradient all-reduce "
        f"{reduce_s * 1e3:.3f} ms ({ddp.num_parameters():,} parameters)")
    out("  OK" if ok else "  FAILED")
    return {"ok": ok, "device": str(dev), "dtype": str(np.dtype(dtype)), "identical": identical,
            "max_rel_diff": rel, "collectives_ok": collectives_ok, "plain_step_s": plain_s,
            "ddp_step_s": ddp_s, "all_reduce_s": reduce_s, "carrier": carrier}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minicnn.distributed selfcheck",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    try:
        _check_size(args.batch_size, args.steps)
    except ValueError as e:
        ap.error(str(e))            # the message and exit status 2, no traceback
    result = run(args.device, args.dtype, args.steps, args.batch_size)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
