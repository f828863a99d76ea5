"""Train the same network for the same steps on the CPU and on the GPU; print both times.

    python examples/cpu_vs_gpu.py [--steps 200] [--batch-size 128]

Both runs start from the same seed, so they begin from identical weights and see identical
batches (real MNIST when available, else the bundled sample); the script prints each backend's
wall-clock time, the speed-up, and how far apart the final parameters are. Without a usable GPU
it says why and times the CPU alone.
"""
import argparse
import os
import time

# Read by OpenBLAS once, when NumPy loads it: idle threads sleep right after a product instead of
# spinning ~0.1 s on a core the next work needs (docs/design.md, "Process-wide settings").
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
import minicnn  # noqa: E402
import numpy as np  # noqa: E402
from minicnn.backend import cuda_unavailable_reason  # noqa: E402
from minicnn.data import MNIST, DataLoader, DatasetUnavailable, mnist_sample  # noqa: E402
from minicnn.models import mnist_cnn  # noqa: E402


def train(device, dataset, steps, batch_size, seed):
    """Train for ``steps`` steps on ``device``; returns (seconds, final loss, parameters)."""
    minicnn.seed(seed)
    # timed, so the fast path on both devices: the fused network (minicnn.fuse), loss and Adam
    model = minicnn.fuse(mnist_cnn()).to(device)
    optimizer = minicnn.fused.FusedAdam(model.parameters(), lr=1e-3)
    loss_fn = minicnn.fused.CrossEntropyLoss()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, device=device)
    done, loss = 0, None
    start = time.perf_counter()
    while done < steps:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            model.backward(loss_fn.backward())
            optimizer.step()
            done += 1
            if done == steps:
                break
    loss = float(minicnn.to_numpy(loss))     # waits for the device: the clock stops after it
    seconds = time.perf_counter() - start
    return seconds, loss, [minicnn.to_numpy(p.data) for p in model.parameters()]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Time the same training on the CPU and the GPU.")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    # process-wide, and it changes the CPU time: say so
    print(f"minicnn.tune_process(): {minicnn.tune_process() or 'changed nothing'}")
    try:
        dataset = MNIST(args.data_dir, train=True, download=False)
    except DatasetUnavailable:
        dataset = mnist_sample(train=True)
    print(f"{args.steps} steps at batch {args.batch_size} on {len(dataset):,} images")
    cpu_s, cpu_loss, cpu_params = train("cpu", dataset, args.steps, args.batch_size, args.seed)
    print(f"cpu : {cpu_s:7.2f} s  ({args.steps * args.batch_size / cpu_s:>9,.0f} images/s)  "
          f"final loss {cpu_loss:.4f}")
    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"gpu : not available ({reason})")
        return {"cpu": cpu_s}
    train("cuda", dataset, 5, args.batch_size, args.seed)      # compile kernels, warm caches
    gpu_s, gpu_loss, gpu_params = train("cuda", dataset, args.steps, args.batch_size, args.seed)
    print(f"cuda: {gpu_s:7.2f} s  ({args.steps * args.batch_size / gpu_s:>9,.0f} images/s)  "
          f"final loss {gpu_loss:.4f}")
    drift = max(float(np.max(np.abs(g - c))) for g, c in zip(gpu_params, cpu_params))
    print(f"speed-up {cpu_s / gpu_s:.1f}x; largest parameter difference CPU vs GPU {drift:.2e} "
          "(float32, different summation orders)")
    return {"cpu": cpu_s, "cuda": gpu_s}


if __name__ == "__main__":
    main()
