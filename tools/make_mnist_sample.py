"""Write minicnn/_sample/mnist_sample.npz: the first 5,000 training and 1,000 test MNIST images.

Usage: python tools/make_mnist_sample.py MNIST_DIR [--out PATH]

MNIST_DIR holds the four IDX files (raw or .gz). Their uncompressed bytes are checked against the
published SHA-256 sums first, so the bundled sample is a verbatim slice of the real MNIST.
Keys: train_images (5000, 28, 28), train_labels (5000,), test_images (1000, 28, 28),
test_labels (1000,), all uint8.
"""
import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minicnn.data import read_idx  # noqa: E402

# SHA-256 of the uncompressed IDX files (gzip wrappers differ between mirrors; contents do not).
IDX_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SIZES = {"train": ("train", 5000), "test": ("t10k", 1000)}


def load_verified(folder, name):
    """The array in IDX file ``name`` (raw or .gz) in ``folder``, after checking its SHA-256."""
    path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
    if path is None:
        sys.exit(f"make_mnist_sample: expected {name}[.gz] in {folder}, found neither")
    array = read_idx(path)
    # IDX header (magic + big-endian dims) followed by the payload: the uncompressed file.
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    digest = hashlib.sha256(header + array.tobytes()).hexdigest()
    if digest != IDX_SHA256[name]:
        sys.exit(f"make_mnist_sample: {path}: expected uncompressed SHA-256 {IDX_SHA256[name]}, "
                 f"got {digest}")
    return array


def main(argv=None):
    here = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mnist_dir", type=Path, help="folder with the four MNIST IDX files")
    parser.add_argument("--out", type=Path,
                        default=here / "minicnn" / "_sample" / "mnist_sample.npz")
    args = parser.parse_args(argv)

    arrays = {}
    for split, (prefix, n) in SIZES.items():
        arrays[f"{split}_images"] = load_verified(args.mnist_dir, f"{prefix}-images-idx3-ubyte")[:n]
        arrays[f"{split}_labels"] = load_verified(args.mnist_dir, f"{prefix}-labels-idx1-ubyte")[:n]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; this one ships in the wheel
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes): "
          + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
