"""Training speed of the example MNIST network, minicnn beside PyTorch, on one device.

    python benchmarks/train.py                          # CPU, batch 64 128 1024
    python benchmarks/train.py --device cuda --json out.json
    python benchmarks/train.py --layers                 # plus a per-layer forward/backward table

One training step = forward, cross-entropy, backward, Adam(1e-3) update, on the same random
MNIST-shaped batch for both frameworks (the work does not depend on the values), fp32 on both.
minicnn is timed twice: "minicnn fused" is the fast path, asked for here with ``minicnn.fuse``
(fused modules in place of the plain layers), ``minicnn.fused.CrossEntropyLoss`` and
``FusedAdam``; "minicnn plain" the plain layers, loss and ``Adam``, every layer running its own
forward and backward. The ratios to PyTorch are of the fused column (and of the plain one).
On a GPU, the fused step also runs as a recorded CUDA graph (``minicnn.fused.graph``), and PyTorch
runs eagerly with cuDNN, in fp32 and again with TF32 allowed (a separate column);
the timer synchronises the device before reading the clock. Warm-up steps are excluded; each
figure is the median over ``--repeats`` of the rate of ``--steps`` steps, the frameworks taking
turns so that a slow spell of the machine hits all of them.

On the CPU, PyTorch is timed twice. "PyTorch" runs in this process, where ``main`` has called
``minicnn.tune_process()`` (glibc keeps freed memory for reuse), which speeds PyTorch's large
temporaries up as much as minicnn's: the like-for-like comparison, and the one the ratio is taken
against. "PyTorch alone" runs in a process of its own that does not call it, with glibc's
default allocator, as a PyTorch script does, and takes its turns through a pipe.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# Read by OpenBLAS once, when NumPy loads it: idle threads sleep right after a product instead of
# spinning ~0.1 s on a core the next work needs (docs/design.md, "Process-wide settings").
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
import minicnn  # noqa: E402
import numpy as np  # noqa: E402
from minicnn.fused import FusedAdam  # noqa: E402
from minicnn.models import mnist_cnn  # noqa: E402


def _synchronizer(device):
    """A function that waits for all queued device work (a no-op on the CPU)."""
    if device != "cuda":
        return lambda: None
    import cupy
    waits = [cupy.cuda.Device().synchronize]
    try:
        import torch
        if torch.cuda.is_available():
            waits.append(torch.cuda.synchronize)
    except ImportError:
        pass
    return lambda: [w() for w in waits]


def torch_usable(device, refused=False):
    """Whether PyTorch can run beside minicnn on ``device`` (False when ``refused``)."""
    if refused:
        return False
    try:
        import torch
    except ImportError:
        return False
    return device == "cpu" or torch.cuda.is_available()


def timed(step, sync):
    """A runner: ``run(n)`` takes ``n`` steps and returns the seconds they took (device synced)."""
    def run(n):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return time.perf_counter() - t0
    return run


def median_rates(runners, batch, steps, repeats, warmup=3):
    """{name: runner (``timed``)} -> {name: median images/s}; contenders take turns per repeat."""
    for run in runners.values():
        run(warmup)
    rates = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            rates[name].append(batch * steps / run(steps))
    return {name: statistics.median(r) for name, r in rates.items()}


class TorchAlone:
    """A runner for PyTorch's CPU step in a process of its own, with glibc's default allocator:
    ``run(n)`` sends n down the child's stdin and reads back the seconds n steps took."""

    def __init__(self, batch):
        import subprocess
        self.child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--torch-worker",
                                       str(batch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True)

    def __call__(self, n):
        self.child.stdin.write(f"{n}\n")
        self.child.stdin.flush()
        answer = self.child.stdout.readline()
        if not answer:
            raise RuntimeError("the PyTorch worker process ended; its error is above")
        return float(answer)

    def close(self):
        self.child.stdin.close()
        self.child.wait()


def torch_worker(batch):
    """The child of ``TorchAlone``: for each n read from stdin, take n steps, print the seconds."""
    x, y = batch_data(batch)
    run = timed(torch_step(x, y, "cpu"), lambda: None)
    for line in sys.stdin:
        print(run(int(line)), flush=True)


def batch_data(batch):
    """A random MNIST-shaped batch (x, y); every framework trains on the same one."""
    rng = np.random.default_rng(batch)
    return rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, batch)


def minicnn_model(device, fused=True):
    """The example network on ``device``; ``fused``: ``minicnn.fuse`` of it, the fast path."""
    model = mnist_cnn()
    return (minicnn.fuse(model) if fused else model).to(device)


def minicnn_step(x, y, device, graph=False, fused=True):
    """A training step of minicnn on (x, y), the fused network, loss and Adam (``fused``) or the
    plain ones; with ``graph``, recorded once as a CUDA graph and replayed
    (``fit(cuda_graph=True)``)."""
    model = minicnn_model(device, fused)
    loss_fn = minicnn.fused.CrossEntropyLoss() if fused else minicnn.CrossEntropyLoss()
    opt = (FusedAdam if fused else minicnn.Adam)(model.parameters(), lr=1e-3)
    x, y = minicnn.to_device(x, device), minicnn.to_device(y, device)

    def body(xs, ys):
        loss_fn(model(xs), ys)
        opt.zero_grad()
        model.backward(loss_fn.backward(), input_grad=False)   # the data needs no gradient
        opt.apply_step()
    if graph:
        from minicnn.fused.graph import GraphStep
        recorded = GraphStep(body, opt.prepare_step)
        return lambda: recorded(x, y)

    def step():
        opt.prepare_step()
        body(x, y)
    return step


def torch_model(device):
    from torch import nn
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)


def torch_step(x, y, device, tf32=False):
    import torch
    model = torch_model(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def step():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        opt.zero_grad()
        loss_fn(model(xt), yt).backward()
        opt.step()
    return step


def layer_times(batch, device, sync, repeats):
    """Per module of the fused network (name, fused fwd ms, fused bwd ms, plain fwd ms, plain bwd
    ms, torch fwd ms, torch bwd ms): the fused module beside the run of plain minicnn layers and of
    PyTorch layers it replaces (a fused module keeps the name of the first plain layer of its run:
    "0" .. "3" are layers 0, 1, 2); medians, torch None without PyTorch."""
    rng = np.random.default_rng(0)
    named = list(minicnn_model(device).named_children())
    plain = list(minicnn_model(device, fused=False))
    starts = [int(name) for name, _ in named] + [len(plain)]
    runs = [minicnn.Sequential(*plain[a:b]) for a, b in zip(starts, starts[1:])]
    try:
        import torch
        tplain = list(torch_model(device))
        theirs = [torch.nn.Sequential(*tplain[a:b]) for a, b in zip(starts, starts[1:])]
    except ImportError:
        theirs = [None] * len(named)

    def median_ms(fn):
        fn()
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def fwd_bwd_ms(forward, backward):
        fwd = median_ms(forward)
        return fwd, max(median_ms(lambda: (forward(), backward())) - fwd, 0.0)

    rows, shape = [], (batch, 1, 28, 28)
    for (_, layer), run, tlayer in zip(named, runs, theirs):
        x_host = rng.standard_normal(shape).astype(np.float32)
        out_shape = layer.output_shape(shape)
        dy_host = rng.standard_normal(out_shape).astype(np.float32)
        x, dy = minicnn.to_device(x_host, device), minicnn.to_device(dy_host, device)
        row = [f"{type(layer).__name__}{tuple(out_shape[1:])}",
               *fwd_bwd_ms(lambda: layer(x), lambda: layer.backward(dy)),
               *fwd_bwd_ms(lambda: run(x), lambda: run.backward(dy)), None, None]
        if tlayer is not None:
            xt = torch.from_numpy(x_host).to(device).requires_grad_()
            dyt = torch.from_numpy(dy_host).to(device)
            out = {}
            row[5:] = fwd_bwd_ms(lambda: out.__setitem__("y", tlayer(xt)),
                                 lambda: out["y"].backward(dyt))
        rows.append(row)
        shape = out_shape
    return rows


def environment(device):
    env = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
           "cpus": os.cpu_count(), "python": platform.python_version(),
           "numpy": np.__version__, "minicnn": minicnn.__version__, "device": device}
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    if device == "cuda":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        env["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        env["cupy"] = cupy.__version__
        env["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 1024])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", action="store_true", help="also time each layer at the first batch size")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if installed")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--torch-worker", type=int, metavar="BATCH", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_worker:
        return torch_worker(args.torch_worker)
    # process-wide: it changes what is timed, for PyTorch in this process too (see the docstring)
    print(f"minicnn.tune_process(): {minicnn.tune_process() or 'changed nothing'}")

    device = minicnn.device(args.device).type
    sync = _synchronizer(device)
    have_torch = torch_usable(device, args.no_torch)
    env = environment(device)
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"training step of the example network, fp32, Adam; median of {args.repeats} x "
          f"{args.steps} steps")
    names = {"minicnn": "minicnn fused", "minicnn_plain": "minicnn plain",
             "minicnn_graph": "minicnn graph", "torch": "PyTorch", "torch_tf32": "PyTorch TF32",
             "torch_alone": "PyTorch alone"}
    results = []
    for batch in args.batch_sizes:
        x, y = batch_data(batch)
        runners = {"minicnn": timed(minicnn_step(x, y, device), sync),
                   "minicnn_plain": timed(minicnn_step(x, y, device, fused=False), sync)}
        if device == "cuda":
            runners["minicnn_graph"] = timed(minicnn_step(x, y, device, graph=True), sync)
        alone = None
        if have_torch:
            runners["torch"] = timed(torch_step(x, y, device), sync)
            if device == "cuda":
                runners["torch_tf32"] = timed(torch_step(x, y, device, tf32=True), sync)
            else:
                runners["torch_alone"] = alone = TorchAlone(batch)
        try:
            rate = median_rates(runners, batch, args.steps, args.repeats)
        finally:
            if alone is not None:
                alone.close()
        results.append({"batch": batch, **{f"{k}_images_per_s": v for k, v in rate.items()}})
        # each minicnn column against PyTorch in this process, and against PyTorch alone
        ratios = [(k, base) for base in ("torch", "torch_alone") if base in rate
                  for k in rate if k.startswith("minicnn")]
        if batch == args.batch_sizes[0]:
            print(f"{'batch':>6}" + "".join(f" {names[k] + ' img/s':>19}" for k in rate)
                  + "".join(f" {names[k] + ' / ' + names[b]:>24}" for k, b in ratios))
        print(f"{batch:>6}" + "".join(f" {v:>19,.0f}" for v in rate.values())
              + "".join(f" {rate[k] / rate[b]:>23.2f}x" for k, b in ratios), flush=True)

    layers = None
    if args.layers:
        batch = args.batch_sizes[0]
        layers = layer_times(batch, device, sync, max(args.repeats, 5) * 3)
        print(f"\nper module of the fused network at batch {batch}, beside the plain minicnn "
              "layers and the PyTorch layers it replaces; milliseconds (median; backward = "
              "forward+backward minus forward)")
        print(f"{'layer':<28} {'fused fwd':>10} {'bwd':>7} {'plain fwd':>10} {'bwd':>7} "
              f"{'PyTorch fwd':>11} {'bwd':>7}")
        for name, f, b, pf, pb, tf, tb in layers:
            torch_cols = f"{tf:>11.3f} {tb:>7.3f}" if tf is not None else f"{'-':>11} {'-':>7}"
            print(f"{name:<28} {f:>10.3f} {b:>7.3f} {pf:>10.3f} {pb:>7.3f} {torch_cols}")
    if args.json:
        report = {"environment": env, "training": results,
                  "layers": [dict(zip(("layer", "minicnn_fwd_ms", "minicnn_bwd_ms",
                                       "minicnn_plain_fwd_ms", "minicnn_plain_bwd_ms",
                                       "torch_fwd_ms", "torch_bwd_ms"), row))
                             for row in layers or []]}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.json)
    return results


if __name__ == "__main__":
    main()
