"""Training speed of ResNet-18 (CIFAR stem, 32x32 inputs), minicnn beside PyTorch, fp32 and fp16.

    python benchmarks/resnet.py --device cuda                    # batch 256, fp32
    python benchmarks/resnet.py --device cuda --amp --json out.json
    python benchmarks/resnet.py --batch-size 16 --steps 2 --repeats 3 --amp   # CPU: keep it small

One training step = forward, cross-entropy, backward, Adam(1e-3) update of ResNet-18 with the CIFAR
stem (3x3 stride-1 first convolution, no max pooling; 11.2 M parameters), on one random batch of
CIFAR-shaped images, in training mode (BatchNorm with batch statistics). minicnn trains its fast
path, asked for here: ``minicnn.fuse`` of the network (fused convolutions in place of the plain
ones), ``FusedAdam`` and ``minicnn.fused.CrossEntropyLoss``. PyTorch runs the same network,
written out below (torchvision is not needed), eagerly, with TF32 off in fp32.

Rows: fp32 for both; with ``--amp`` also mixed precision for both: minicnn under
``minicnn.amp.autocast()`` with a ``GradScaler``, PyTorch under ``torch.autocast(device,
torch.float16)`` with ``torch.amp.GradScaler``. They are not the same computation: PyTorch's
autocast also keeps activations in fp16, minicnn's keeps everything but the matrix products'
operands in fp32 (see minicnn/amp.py). On the CPU minicnn's fp16 is an emulation (fp16-rounded
operands fed to sgemm), so expect it no faster than fp32 there; PyTorch's CPU fp16 convolutions
are much slower than its fp32 ones.

Method as benchmarks/train.py (whose ``median_rates``, ``timed`` and ``_synchronizer`` are used): warm-up
steps excluded, each figure the median over ``--repeats`` of the rate of ``--steps`` steps, the
contenders taking turns, the device synchronised before the clock is read.
"""
import argparse
import importlib.util
import json
import os
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
# Read by OpenBLAS once, when NumPy loads it: idle threads sleep right after a product instead of
# spinning ~0.1 s on a core the next work needs (docs/design.md, "Process-wide settings").
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
import minicnn  # noqa: E402
import numpy as np  # noqa: E402
from minicnn.amp import GradScaler, autocast  # noqa: E402
from minicnn.models import resnet18  # noqa: E402


def _load_train_benchmark():
    """benchmarks/train.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("minicnn_benchmarks_train",
                                                  os.path.join(HERE, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_train_bench = _load_train_benchmark()
median_rates, timed, _synchronizer, environment = (
    _train_bench.median_rates, _train_bench.timed, _train_bench._synchronizer,
    _train_bench.environment)


# --- minicnn -------------------------------------------------------------------------------------

def minicnn_step(x, y, device, amp=False):
    minicnn.seed(0)
    model = minicnn.fuse(resnet18(num_classes=10, cifar_stem=True)).to(device)
    loss_fn = minicnn.fused.CrossEntropyLoss()
    opt = minicnn.fused.FusedAdam(model.parameters(), lr=1e-3)
    scaler = GradScaler() if amp else None
    x, y = minicnn.to_device(x, device), minicnn.to_device(y, device)

    def step():
        with autocast(enabled=amp):
            logits = model(x)
        loss_fn(logits, y)
        opt.zero_grad()
        if scaler is None:
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
        else:
            model.backward(scaler.scale(loss_fn.backward()), input_grad=False)
            scaler.step(opt)
            scaler.update()
    return step


# --- PyTorch -------------------------------------------------------------------------------------

def torch_resnet18(num_classes=10):
    """ResNet-18 with the CIFAR stem in plain torch.nn, layer for layer as minicnn's
    ``resnet18(cifar_stem=True)`` (torchvision's BasicBlock, conv1 3x3 stride 1, no max pool)."""
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, in_planes, planes, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or in_planes != planes:
                self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                                nn.BatchNorm2d(planes))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    def layer(in_planes, planes, stride):
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes))

    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        layer(64, 64, 1), layer(64, 128, 2), layer(128, 256, 2), layer(256, 512, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


def torch_step(x, y, device, amp=False):
    import torch
    torch.manual_seed(0)
    model = torch_resnet18().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(device) if amp else None
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def step():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        opt.zero_grad()
        with torch.autocast(device_type=device, dtype=torch.float16, enabled=amp):
            loss = loss_fn(model(xt), yt)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    ap.add_argument("--amp", action="store_true", help="also time mixed precision (fp16) rows")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if installed")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    # process-wide: it changes what is timed, for PyTorch in this process too
    print(f"minicnn.tune_process(): {minicnn.tune_process() or 'changed nothing'}")

    device = minicnn.device(args.device).type
    sync = _synchronizer(device)
    have_torch = _train_bench.torch_usable(device, args.no_torch)
    env = environment(device)
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"ResNet-18 (CIFAR stem) training step, Adam, batch {args.batch_size}; median of "
          f"{args.repeats} x {args.steps} steps after {args.warmup} warm-up steps")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, args.batch_size)
    steps = {"minicnn_fp32": minicnn_step(x, y, device)}
    if have_torch:
        steps["torch_fp32"] = torch_step(x, y, device)
    if args.amp:
        steps["minicnn_fp16"] = minicnn_step(x, y, device, amp=True)
        if have_torch:
            steps["torch_fp16"] = torch_step(x, y, device, amp=True)
    runners = {name: timed(step, sync) for name, step in steps.items()}
    rate = median_rates(runners, args.batch_size, args.steps, args.repeats, warmup=args.warmup)

    print(f"{'precision':<10} {'minicnn img/s':>14} {'ms/step':>9} {'PyTorch img/s':>14} "
          f"{'ms/step':>9} {'ratio':>7}")
    rows = []
    for precision in ("fp32", "fp16") if args.amp else ("fp32",):
        ours, theirs = rate[f"minicnn_{precision}"], rate.get(f"torch_{precision}")
        row = {"precision": precision, "batch": args.batch_size, "minicnn_images_per_s": ours,
               "minicnn_ms_per_step": 1e3 * args.batch_size / ours}
        line = f"{precision:<10} {ours:>14,.1f} {row['minicnn_ms_per_step']:>9,.1f}"
        if theirs is not None:
            row.update(torch_images_per_s=theirs, torch_ms_per_step=1e3 * args.batch_size / theirs)
            line += (f" {theirs:>14,.1f} {row['torch_ms_per_step']:>9,.1f} "
                     f"{ours / theirs:>6.2f}x")
        else:
            line += f" {'-':>14} {'-':>9} {'-':>7}"
        rows.append(row)
        print(line, flush=True)
    if args.amp:
        speedup = rate["minicnn_fp16"] / rate["minicnn_fp32"]
        print(f"minicnn fp16 / fp32 speed: {speedup:.2f}x" + (
            f"; PyTorch: {rate['torch_fp16'] / rate['torch_fp32']:.2f}x" if have_torch else ""))
    if args.json:
        report = {"environment": env,
                  "settings": {"model": "resnet18_cifar_stem", "optimizer": "Adam(1e-3)",
                               "batch": args.batch_size, "steps": args.steps,
                               "repeats": args.repeats, "warmup": args.warmup},
                  "training": rows}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.json)
    return rows


if __name__ == "__main__":
    main()
