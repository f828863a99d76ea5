"""Training throughput of the example MNIST network on the CPU: minicnn (NumPy) beside PyTorch.

    python benchmarks/train_cpu.py [--batch-sizes 64 128] [--steps 30] [--repeats 5]

One training step = forward, cross-entropy, backward, Adam(1e-3) update, fp32 on both sides, on
the same random MNIST-shaped batch (the work does not depend on the values). Warm-up steps are
excluded; each figure is the median over repeats of the rate of ``--steps`` steps, minicnn and
PyTorch taking turns.
PyTorch runs with its default thread count; its row is left out when it is not installed.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minicnn  # noqa: E402
from minicnn.models import mnist_cnn  # noqa: E402


def median_images_per_s(steps_by_name, batch, steps, repeats, warmup=3):
    """{name: step function} -> {name: median images/s}. The contenders take turns, repeat by
    repeat, so a slow spell of the machine hits all of them rather than one."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    rates = {name: [] for name in steps_by_name}
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            rates[name].append(batch * steps / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def minicnn_step(x, y):
    model = mnist_cnn()
    loss_fn = minicnn.CrossEntropyLoss()
    opt = minicnn.Adam(model.parameters(), lr=1e-3)

    def step():
        loss_fn(model(x), y)
        opt.zero_grad()
        model.backward(loss_fn.backward())
        opt.step()
    return step


def torch_step(x, y):
    import torch
    from torch import nn
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad()
        loss_fn(model(xt), yt).backward()
        opt.step()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        import torch
        versions = f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        torch = None
        versions = "PyTorch not installed: its column is empty"
    print(f"minicnn {minicnn.__version__}, NumPy {np.__version__}, {versions}, "
          f"{os.cpu_count()} CPUs; fp32, Adam, median of {args.repeats} x {args.steps} steps")
    print(f"{'batch':>6} {'minicnn img/s':>14} {'PyTorch img/s':>14} {'ratio':>7}")
    rng = np.random.default_rng(0)
    for batch in args.batch_sizes:
        x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, batch)
        steps = {"minicnn": minicnn_step(x, y)}
        if torch is not None:
            steps["torch"] = torch_step(x, y)
        rate = median_images_per_s(steps, batch, args.steps, args.repeats)
        ours, theirs = rate["minicnn"], rate.get("torch")
        if theirs is None:
            print(f"{batch:>6} {ours:>14,.0f} {'-':>14} {'-':>7}")
        else:
            print(f"{batch:>6} {ours:>14,.0f} {theirs:>14,.0f} {ours / theirs:>6.2f}x")

if __name__ == "__main__":
    main()
