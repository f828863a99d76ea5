"""One process of a data-parallel run, for tests/test_distributed.py; started by mpiexec.

    mpiexec -n W python tests/distributed_worker.py OUT train --batch 8 --n 100 --epochs 4
        [--drop-last] [--checkpoint-dir DIR] [--stop-after K] [--resume]
    mpiexec -n 2 python tests/distributed_worker.py OUT fail --fail-rank 1 --fail-at 3
    mpiexec -n 2 python tests/distributed_worker.py OUT example [example flags ...]

train: the example network in float64, each rank seeded differently (rank 0's parameters are
broadcast), trained by ``fit`` on a ``DistributedSampler``'s shards with an evaluation sharded
without padding. Every rank writes OUT/rank<r>.npz (its final parameters) and OUT/rank<r>.json
(what the test checks: hashes before and after the broadcast, the history, evaluate's result,
which progress bars were shown, a check of the sample-weighted mean on batches of unequal
sizes). ``build`` is imported by the test for the one-process reference.
"""
import os

if __name__ == "__main__":          # before NumPy loads; imported by the test, it changes nothing
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")    # one BLAS thread per process: no oversubscription

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import minicnn  # noqa: E402
import minicnn.train  # noqa: E402
from minicnn.data import ArrayDataset, DataLoader, mnist_sample  # noqa: E402
from minicnn.models import mnist_cnn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED = 7            # the samplers' seed
N_TEST = 90         # evaluation images (not a multiple of 2 or 4: uneven shards)


def build(n, seed):
    """(model, optimizer, loss, training set, test set) of the equality test, float64."""
    minicnn.set_default_dtype(np.float64)
    minicnn.seed(seed)
    train, test = mnist_sample(train=True), mnist_sample(train=False)
    model = mnist_cnn()
    return (model, minicnn.Adam(model.parameters(), lr=2e-3), minicnn.CrossEntropyLoss(),
            ArrayDataset(train.images[:n], train.labels[:n]),
            ArrayDataset(test.images[:N_TEST], test.labels[:N_TEST]))


def digest(model):
    h = hashlib.sha256()
    for value in model.state_dict().values():
        h.update(value.tobytes())
    return h.hexdigest()


def record_bars():
    """Count the progress bars fit and evaluate show (not disabled) in this process."""
    shown = {"shown": 0, "hidden": 0}
    real = minicnn.train.tqdm

    def tqdm(*args, **kwargs):
        shown["hidden" if kwargs.get("disable") else "shown"] += 1
        return real(*args, **kwargs)
    tqdm.write = real.write
    minicnn.train.tqdm = tqdm
    return shown


def weighted_mean_check(ddp, loss_fn, data, group):
    """Batches of unequal sizes (rank r: 2r + 3 samples): the reduced gradient must be the mean
    gradient over their union, computed by rank 0 alone on a plain copy. -> max relative error
    (rank 0) or None."""
    sizes = [2 * r + 3 for r in range(group.size)]
    start = sum(sizes[:group.rank])
    mine = slice(start, start + sizes[group.rank])
    x, y = data.images[mine], data.labels[mine]
    ddp.zero_grad()
    loss_fn(ddp(x), y)
    ddp.backward(loss_fn.backward(), input_grad=False)
    reduced = [p.grad.copy() for p in ddp.parameters()]
    ddp.zero_grad()
    if group.rank != 0:
        return None
    plain = mnist_cnn()
    plain.load_state_dict(ddp.state_dict())
    x, y = data.images[:sum(sizes)], data.labels[:sum(sizes)]
    loss_fn(plain(x), y)
    plain.backward(loss_fn.backward(), input_grad=False)
    scale = max(float(np.abs(p.grad).max()) for p in plain.parameters())
    return max(float(np.abs(p.grad - g).max()) for p, g in zip(plain.parameters(), reduced)) / scale


class StopAfter:
    """The loss, ending every process cleanly (SystemExit) after ``k`` training steps (counted
    by backward calls: evaluation calls the loss too): a run cut short."""

    def __init__(self, loss_fn, k):
        self.loss_fn, self.k, self.steps = loss_fn, k, 0

    def __call__(self, logits, y):
        if self.steps == self.k:
            raise SystemExit(0)
        return self.loss_fn(logits, y)

    def backward(self):
        self.steps += 1
        return self.loss_fn.backward()


def train(args, out):
    from minicnn.distributed import DistributedDataParallel, DistributedSampler, init
    group = init("cpu")
    model, _, loss_fn, data, test = build(args.n, seed=100 + group.rank)   # different inits
    before = group.all_gather_object(digest(model))
    ddp = DistributedDataParallel(model)
    after = group.all_gather_object(digest(model))
    weighted = weighted_mean_check(ddp, loss_fn, data, group)
    optimizer = minicnn.Adam(ddp.parameters(), lr=2e-3)
    sampler = DistributedSampler(len(data), seed=SEED, drop_last=args.drop_last)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler)
    val = DataLoader(test, batch_size=16,
                     sampler=DistributedSampler(len(test), shuffle=False, even=False))
    bars = record_bars()
    if args.stop_after is not None:
        loss_fn = StopAfter(loss_fn, args.stop_after)
    checkpoints = ({} if args.checkpoint_dir is None else
                   {"checkpoint_dir": args.checkpoint_dir, "checkpoint_every": 4,
                    "resume": args.resume})
    history = minicnn.fit(ddp, loss_fn, optimizer, loader, epochs=args.epochs, val_loader=val,
                          progress=True, verbose=True, log_every=3, **checkpoints)
    ddp.assert_in_sync()
    result = minicnn.evaluate(ddp, val, loss_fn)
    np.savez(out / f"rank{group.rank}.npz", **model.state_dict())
    keep = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
    report = {"rank": group.rank, "size": group.size, "before": before, "after": after,
              "weighted_mean_error": weighted, "bars": bars, "steps": optimizer.step_count,
              "history": [{k: row[k] for k in keep} for row in history.epochs],
              "evaluate": result, "shard": len(sampler), "batches": len(loader)}
    (out / f"rank{group.rank}.json").write_text(json.dumps(report))


class FailAt:
    """The loss, raising on rank ``rank`` in its ``k``-th call (the others then wait for it)."""

    def __init__(self, loss_fn, rank, k):
        self.loss_fn, self.rank, self.k, self.calls = loss_fn, rank, k, 0

    def __call__(self, logits, y):
        self.calls += 1
        if self.rank is not None and self.calls == self.k:
            raise RuntimeError(f"injected failure in step {self.k}")
        return self.loss_fn(logits, y)

    def backward(self):
        return self.loss_fn.backward()


def fail(args, out):
    from minicnn.distributed import DistributedDataParallel, DistributedSampler, init
    group = init("cpu")
    model, optimizer, loss_fn, data, _ = build(64, seed=0)
    ddp = DistributedDataParallel(model)
    loss_fn = FailAt(loss_fn, group.rank if group.rank == args.fail_rank else None, args.fail_at)
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(len(data)))
    minicnn.fit(ddp, loss_fn, optimizer, loader, epochs=3, progress=False, verbose=False)


def example(argv, out):
    """examples/mnist.py as a user runs it, on the bundled sample (no data, no network)."""
    import importlib.util
    import runpy
    minicnn.MNIST.mirrors = ["http://127.0.0.1:9/"]        # the discard port: refused at once
    if importlib.util.find_spec("mpi4py") is None:          # one process, on a machine without
        from minicnn.distributed import init                # MPI (a GPU machine's NCCL check)
        init(argv[argv.index("--device") + 1] if "--device" in argv else "cpu", mpi=False)
    script = runpy.run_path(str(ROOT / "examples" / "mnist.py"))
    history = script["main"](argv)
    from minicnn.distributed import get_group
    rank = get_group().rank
    (out / f"rank{rank}.json").write_text(json.dumps({"history": history.epochs}))


def main():
    argv = sys.argv[1:]
    if argv[1:2] == ["example"]:        # the rest are the example's own flags
        Path(argv[0]).mkdir(parents=True, exist_ok=True)
        return example(argv[2:], Path(argv[0]))
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("mode", choices=["train", "fail"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--drop-last", action="store_true")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--fail-rank", type=int, default=1)
    ap.add_argument("--fail-at", type=int, default=3)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "train":
        train(args, args.out)
    else:
        fail(args, args.out)


if __name__ == "__main__":
    sys.exit(main())
