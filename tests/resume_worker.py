"""Trains a small network with checkpoints, for tests/test_resume.py; run as a subprocess.

    python tests/resume_worker.py OUT.npz --checkpoint-dir DIR [--resume] [--dropout]
        [--precision fp16] [--device cuda] [--epochs 2] [--every 5]

Writes the final parameters to OUT.npz. MINICNN_TEST_KILL="<when>:<k>" makes the process
SIGKILL itself: "between:k" after step k and before step k+1, "inside:k" in step k's backward
pass (before the update), "write:k" halfway through writing the k-th checkpoint's file.
"""
import argparse
import io
import os
import signal
import sys

import numpy as np

import minicnn
from minicnn.data import ArrayDataset, DataLoader, mnist_sample


def kill_now():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillingLoader(DataLoader):
    """Kills the process when batch k+1 (counted over the whole run) is asked for."""
    kill_after = None
    served = 0

    def _batches(self, order, start=0):
        for batch in super()._batches(order, start):
            if KillingLoader.kill_after is not None and KillingLoader.served == KillingLoader.kill_after:
                kill_now()
            KillingLoader.served += 1
            yield batch


class KillingLoss:
    """The loss, killing the process inside the backward pass of its k-th call."""

    def __init__(self, loss_fn, kill_at):
        self.loss_fn, self.kill_at, self.calls = loss_fn, kill_at, 0

    def __call__(self, logits, y):
        self.calls += 1
        return self.loss_fn(logits, y)

    def backward(self):
        grad = self.loss_fn.backward()
        if self.calls == self.kill_at:
            kill_now()
        return grad


def kill_in_write(k):
    """np.savez writes half of the k-th file, flushes it to disk, then the process dies."""
    real, calls = np.savez, [0]

    def savez(file, *args, **kwargs):
        calls[0] += 1
        if calls[0] != k or not hasattr(file, "write"):
            return real(file, *args, **kwargs)
        buf = io.BytesIO()
        real(buf, *args, **kwargs)
        data = buf.getvalue()
        file.write(data[:len(data) // 2])
        file.flush()
        os.fsync(file.fileno())
        kill_now()

    np.savez = savez


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--checkpoint-dir", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--dropout", action="store_true")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--every", type=int, default=5)
    args = ap.parse_args(argv)

    when, _, k = os.environ.get("MINICNN_TEST_KILL", "").partition(":")
    loss_fn = minicnn.CrossEntropyLoss()
    if when == "between":
        KillingLoader.kill_after = int(k)
    elif when == "inside":
        loss_fn = KillingLoss(loss_fn, int(k))
    elif when == "write":
        kill_in_write(int(k))

    minicnn.seed(0)
    dev = minicnn.device(args.device)
    sample = mnist_sample(train=True)
    data = ArrayDataset(sample.images[:192], sample.labels[:192])
    train = KillingLoader(data, batch_size=16, shuffle=True, device=dev)
    layers = [minicnn.Conv2d(1, 4, 3), minicnn.ReLU(), minicnn.MaxPool2d(2), minicnn.Flatten()]
    if args.dropout:
        layers.append(minicnn.Dropout(0.3))
    model = minicnn.Sequential(*layers, minicnn.Linear(4 * 13 * 13, 10)).to(dev)
    optimizer = minicnn.Adam(model.parameters(), lr=3e-3)
    scheduler = minicnn.OneCycleLR(optimizer, max_lr=5e-3, total_steps=args.epochs * len(train))
    minicnn.fit(model, loss_fn, optimizer, train, epochs=args.epochs, scheduler=scheduler,
                scheduler_interval="batch", progress=False, verbose=True,
                precision=args.precision, checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.every, resume=args.resume)
    np.savez(args.out, **{k: minicnn.backend.to_numpy(v) for k, v in model.state_dict().items()})


if __name__ == "__main__":
    main()
