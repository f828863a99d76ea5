"""Training images/s of the example MNIST network on the CPU at batch 64 and 128, minicnn (NumPy)
beside PyTorch in the same run, with the ratio.

    python benchmarks/train_cpu.py [--steps 20] [--repeats 5]

The CPU rows of ``benchmarks/train.py``, which holds the method and more options.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402

if __name__ == "__main__":
    train.main(["--device", "cpu", "--batch-sizes", "64", "128", *sys.argv[1:]])
