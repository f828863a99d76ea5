"""Data-parallel training speed of the example MNIST network: 1 process against 2 under mpiexec,
at a fixed per-process batch, and the all-reduce's share of a step.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/distributed.py
    python benchmarks/distributed.py --batch-sizes 64 128 --steps 30 --repeats 5
    PYTHONPATH=. python benchmarks/distributed.py --device cuda   # one GPU: the NCCL path

Each row is a separate ``mpiexec -n W`` run of this script (``--worker``): the fused network,
fused loss and FusedAdam as in examples/mnist.py, float32, a random MNIST-shaped batch per
process (the work does not depend on the values). Rows: one process with one thread, one process
with a thread per core, and W processes with one thread each (wrapped in
``DistributedDataParallel``, gradients summed by ``MPI.Allreduce``); "threads" are BLAS's and
those of the fused CPU path's own pool (``minicnn.fused.windows``, one per core unless set here).
images/s counts the images of all processes over the slowest one's time, the median of
``--repeats`` timings of ``--steps`` steps after 3 warm-up steps. The rows take turns for
``--rounds`` rounds, so that a slow spell of the machine hits all of them, and each row shows its
median round. "all-reduce" is the time inside ``reduce_gradients`` per step, which includes
waiting for the slower process; "bare" is an all-reduce of the same buffer right after a barrier
(the communication alone). The OpenBLAS kernel each run used is read with threadpoolctl.

``--device cuda`` runs ``python -m minicnn.distributed selfcheck --device cuda`` instead: on one
GPU the NCCL path against the plain step (same parameters?) and its step time.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def blas_kernel():
    """'OpenBLAS <version> <kernel>, <n> threads' (threadpoolctl), or why it cannot be said."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl is not installed)"
    found = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}, "
             f"{i.get('num_threads')} threads" for i in threadpool_info()
             if i.get("user_api") == "blas"]
    return "; ".join(found) or "no BLAS found"


def worker(args):
    """One process of a row: time training steps; rank 0 writes the figures to ``--json``."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    import numpy as np

    import minicnn
    import minicnn.distributed as dist
    from minicnn.fused import CrossEntropyLoss, FusedAdam
    from minicnn.models import mnist_cnn
    import minicnn.fused.windows
    minicnn.tune_process()
    # the fused CPU path's own thread pool (one thread per core by default) gets as many threads
    # as BLAS, so that a row of W processes x 1 thread runs W threads, not W x cores
    minicnn.fused.windows._THREADS = int(os.environ["OPENBLAS_NUM_THREADS"])
    group = dist.init("cpu")
    w = group.size
    model = minicnn.fuse(mnist_cnn())
    if w > 1:
        model = dist.DistributedDataParallel(model)
    optimizer, loss_fn = FusedAdam(model.parameters(), lr=1e-3), CrossEntropyLoss()
    rng = np.random.default_rng(group.rank)
    B = args.batch_size
    x = rng.standard_normal((B, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, B)
    reduce_seconds = [0.0]
    if w > 1:
        reduce = model.reduce_gradients

        def timed_reduce(*a, **k):
            t0 = time.perf_counter()
            reduce(*a, **k)
            reduce_seconds[0] += time.perf_counter() - t0
        model.reduce_gradients = timed_reduce

    def step():
        loss_fn(model(x), y)
        optimizer.zero_grad()
        model.backward(loss_fn.backward(), input_grad=False)
        optimizer.step()

    for _ in range(3):
        step()
    rates, step_ms, reduce_ms = [], [], []
    for _ in range(args.repeats):
        group.barrier()
        reduce_seconds[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        elapsed = max(group.all_gather_object(time.perf_counter() - t0))   # the slowest
        rates.append(w * B * args.steps / elapsed)
        step_ms.append(1e3 * elapsed / args.steps)
        reduce_ms.append(1e3 * max(group.all_gather_object(reduce_seconds[0])) / args.steps)
    bare = []
    if w > 1:
        flat = model._buffers_flat[0]
        for _ in range(50):
            group.barrier()
            t0 = time.perf_counter()
            group.all_reduce_(flat)
            bare.append(time.perf_counter() - t0)
    kernels = group.all_gather_object(blas_kernel())
    if group.rank == 0:
        row = {"processes": w, "threads": int(os.environ.get("OPENBLAS_NUM_THREADS", "0")),
               "batch": B, "images_per_s": statistics.median(rates),
               "step_ms": statistics.median(step_ms),
               "reduce_ms": statistics.median(reduce_ms) if w > 1 else None,
               "bare_ms": 1e3 * statistics.median(bare) if bare else None,
               "buffer": int(model._buffers_flat[0].size) if w > 1 else None,
               "blas": sorted(set(kernels))}
        with open(args.json, "w") as f:
            json.dump(row, f)


def mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def run_row(processes, threads, batch, args, folder):
    out = os.path.join(folder, f"row-{processes}-{threads}-{batch}.json")
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.path.abspath(ROOT))
    cmd = [mpiexec(), "-n", str(processes), sys.executable, os.path.abspath(__file__), "--worker",
           "--batch-size", str(batch), "--steps", str(args.steps), "--repeats",
           str(args.repeats), "--json", out]
    subprocess.run(cmd, env=env, check=True)
    with open(out) as f:
        return json.load(f)


def table(rows):
    lines = ["| processes | threads each | batch per process | global batch | images/s | "
             "step (ms) | all-reduce incl. wait (ms) | its share of the step | bare all-reduce "
             "(ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reduce = "-" if r["reduce_ms"] is None else f"{r['reduce_ms']:.2f}"
        share = "-" if r["reduce_ms"] is None else f"{r['reduce_ms'] / r['step_ms']:.1%}"
        bare = "-" if r["bare_ms"] is None else f"{r['bare_ms']:.2f}"
        lines.append(f"| {r['processes']} | {r['threads']} | {r['batch']} | "
                     f"{r['processes'] * r['batch']} | {r['images_per_s']:,.0f} | "
                     f"{r['step_ms']:.1f} | {reduce} | {share} | {bare} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128],
                    help="per-process batch sizes")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: check the NCCL path on one GPU instead (python -m "
                         "minicnn.distributed selfcheck --device cuda)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.device == "cuda":
        from minicnn.distributed.selfcheck import main as selfcheck
        return selfcheck(["--device", args.device])
    if mpiexec() is None:
        raise SystemExit('mpiexec not found: pip install "minicnn[mpi]"')
    cores = os.cpu_count()
    print(f"{cores} cores; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}", flush=True)
    configs = [(p, t, b) for b in args.batch_sizes for p, t in ((1, 1), (1, cores),
                                                                 (args.processes, 1))]
    runs = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for processes, threads, batch in configs:
                row = run_row(processes, threads, batch, args, folder)
                print(f"  round {round_ + 1}: {processes} process(es) x {threads} "
                      f"thread(s), batch {batch}: {row['images_per_s']:,.0f} images/s "
                      f"({'; '.join(row['blas'])})", flush=True)
                runs[processes, threads, batch].append(row)
    rows = [sorted(r, key=lambda row: row["images_per_s"])[len(r) // 2] for r in runs.values()]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
