"""Train ResNet-18 on CIFAR-10 with random crops and flips, in fp32 or mixed precision.

    python examples/cifar10_resnet18.py --device cuda --epochs 30 --amp    # the full run
    python examples/cifar10_resnet18.py --limit 512 --epochs 1             # a quick CPU check
    python examples/cifar10_resnet18.py --pretrained resnet18.safetensors  # from ImageNet weights
    python examples/cifar10_resnet18.py --synthetic --device cuda --amp    # throughput only
    python examples/cifar10_resnet18.py --device cuda --amp --checkpoint-dir ckpt --resume  # restartable

Network: ResNet-18 with the CIFAR stem (3x3 stride-1 first convolution, no max pooling; 11.2 M
parameters), or with ``--pretrained PATH`` torchvision's ImageNet ResNet-18 (7x7 stem) loaded from
a ``.safetensors``/``.npz`` file of its state_dict, with its 1000-class head replaced by
``Linear(512, 10)``; images stay 32x32 (the ImageNet stem takes them to 8x8 before layer1) and
are standardised with ImageNet's statistics. Adam, cross-entropy; every training batch is padded
by 4, randomly cropped back to 32x32 and flipped left-right with probability 1/2, on the device
(``minicnn.augment``). ``--amp`` trains with fp16 matrix products and dynamic loss scaling
(``minicnn.amp``; ``fit(precision="fp16")``). Test accuracy is printed after every epoch.

CIFAR-10 is looked for in ``--data-dir``, ``$MINICNN_DATA`` and the user cache, and downloaded
(170 MB) when missing. No sample of it ships with minicnn: without the files and without network
the script says so and exits with status 2; ``--synthetic`` trains on random images instead, to
measure speed (its accuracy means nothing).
"""
import argparse
import os
import sys

# Read by OpenBLAS once, when NumPy loads it: idle threads sleep right after a product instead of
# spinning ~0.1 s on a core the next work needs (docs/design.md, "Process-wide settings").
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
import minicnn  # noqa: E402
import numpy as np  # noqa: E402
from minicnn import CIFAR10, augment  # noqa: E402
from minicnn.amp import GradScaler  # noqa: E402
from minicnn.data import ArrayDataset, DataLoader, DatasetUnavailable  # noqa: E402
from minicnn.models import resnet18  # noqa: E402
from minicnn.train import add_checkpoint_arguments, checkpoint_options  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _subset(dataset, limit):
    if limit is None or limit >= len(dataset):
        return dataset
    return ArrayDataset(dataset.images[:limit], dataset.labels[:limit])


def synthetic_data(n_train, n_test):
    """Random standard-normal images with random labels, drawn from minicnn's generator."""
    rng = minicnn.backend.rng()

    def make(n):
        images = rng.standard_normal((n, 3, 32, 32)).astype(minicnn.get_default_dtype())
        return ArrayDataset(images, rng.integers(0, 10, n))
    return make(n_train), make(n_test)


def load_data(args):
    """(train, test) datasets; exits with status 2 when CIFAR-10 cannot be had."""
    if args.synthetic:
        print("--synthetic: random images and labels, for measuring speed; accuracy means nothing",
              file=sys.stderr)
        return synthetic_data(args.limit or 5000, args.limit or 1000)
    # ImageNet weights expect ImageNet's standardisation; otherwise CIFAR-10's own statistics.
    normalize = args.pretrained is None
    try:
        train, test = (CIFAR10(args.data_dir, train=split, download=not args.no_download,
                               normalize=normalize) for split in (True, False))
    except DatasetUnavailable as e:
        bar = "!" * 78
        print(f"{bar}\nCIFAR-10 is not available: {e}\n\nminicnn ships no CIFAR-10 sample. Put "
              f"cifar-10-binary.tar.gz (or its unpacked cifar-10-batches-bin/) in --data-dir or "
              f"$MINICNN_DATA, or run with --synthetic to train on random images (speed only)."
              f"\n{bar}", file=sys.stderr)
        raise SystemExit(2) from None
    if not normalize:
        for ds in (train, test):
            ds.images -= np.asarray(IMAGENET_MEAN, dtype=ds.images.dtype).reshape(1, 3, 1, 1)
            ds.images /= np.asarray(IMAGENET_STD, dtype=ds.images.dtype).reshape(1, 3, 1, 1)
    return _subset(train, args.limit), _subset(test, args.limit)


def build_model(pretrained):
    """ResNet-18 with the CIFAR stem, or torchvision's ImageNet ResNet-18 with a new 10-way head."""
    if pretrained is None:
        return resnet18(num_classes=10, cifar_stem=True)
    model = resnet18(num_classes=1000, cifar_stem=False)
    minicnn.load_torch_weights(model, pretrained)
    model.fc = minicnn.Linear(512, 10)          # a fresh head for CIFAR-10's classes
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train ResNet-18 on CIFAR-10 with minicnn.")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--data-dir", default=None,
                    help="folder holding CIFAR-10 (default: $MINICNN_DATA, then the user cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amp", action="store_true",
                    help="mixed precision: fp16 matrix products, fp32 weights, loss scaling")
    ap.add_argument("--pretrained", default=None, metavar="PATH",
                    help="torchvision resnet18 weights (.safetensors or .npz) to start from")
    ap.add_argument("--save", default=None, metavar="PATH",
                    help="write a checkpoint (.npz, with optimizer state) after every epoch")
    ap.add_argument("--limit", type=int, default=None, metavar="N",
                    help="use only the first N training and N test images (quick runs)")
    ap.add_argument("--synthetic", action="store_true",
                    help="train on random images (no CIFAR-10 needed): for speed checks")
    ap.add_argument("--no-download", action="store_true", help="never download CIFAR-10")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_checkpoint_arguments(ap)       # --checkpoint-dir DIR --checkpoint-every N --resume
    args = ap.parse_args(argv)
    resumable = checkpoint_options(ap, args)
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be at least 1, got {args.limit}")
    minicnn.tune_process()      # process-wide: glibc keeps freed memory for reuse (fit does it too)

    dev = minicnn.device(args.device)
    minicnn.seed(args.seed)
    train_set, test_set = load_data(args)
    # The fast path, asked for here: minicnn.fuse puts fused modules in place of the plain layers
    # (each convolution's fast im2col and input gradient, the stem's max pool split between
    # threads), with the same parameters and state_dict names; and the one-kernel loss.
    model = minicnn.fuse(build_model(args.pretrained)).to(dev)
    optimizer = minicnn.Adam(model.parameters(), lr=args.lr)
    loss_fn = minicnn.fused.CrossEntropyLoss()
    scaler = GradScaler() if args.amp else None
    train = augment.batches(DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                       device=dev),
                            augment.random_crop, augment.random_flip)
    test = DataLoader(test_set, batch_size=args.batch_size, device=dev)
    precision = "fp16" if args.amp else "fp32"
    print(f"device {dev}; {len(train_set):,} training and {len(test_set):,} test images; "
          f"ResNet-18 ({'ImageNet weights, ' if args.pretrained else ''}"
          f"{model.num_parameters():,} parameters, fused by minicnn.fuse); {precision}, batch "
          f"{args.batch_size}")

    def save(row):
        meta = {"epoch": row["epoch"], "test_accuracy": row["val_accuracy"],
                "precision": precision}
        if scaler is not None:
            meta["grad_scaler"] = scaler.state_dict()
        minicnn.save(model, args.save, optimizer=optimizer, metadata=meta)

    history = minicnn.fit(model, loss_fn, optimizer, train, epochs=args.epochs, val_loader=test,
                          progress=not args.no_progress, on_epoch_end=save if args.save else None,
                          precision=precision, scaler=scaler, **resumable)
    best = max(history["val_accuracy"])
    print(f"best test accuracy {best:.4f}" + (f"; final loss scale {scaler.get_scale():g}"
                                              if scaler is not None else ""))
    return history


if __name__ == "__main__":
    main()
