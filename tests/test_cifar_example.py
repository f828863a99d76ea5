"""examples/cifar10_resnet18.py end to end on a tiny synthetic CIFAR-10 written in the official
binary format: fp32 and --amp, a checkpoint, ImageNet weights with a new head, --synthetic, and
the exit status 2 when there is no CIFAR-10 and no network.

ResNet-18 is slow on a CPU, so every run uses 8 images of 32x32 in batches of 4 (two steps and
an evaluation of two batches, ~1 s).
"""
import runpy
from pathlib import Path

import numpy as np
import pytest

import minicnn
from minicnn import CIFAR10
from minicnn.models import resnet18

ROOT = Path(__file__).resolve().parents[1]
N = 8                      # records per synthetic batch file
QUICK = ["--limit", "8", "--batch-size", "4", "--epochs", "1", "--no-progress", "--no-download"]


@pytest.fixture
def example():
    return runpy.run_path(str(ROOT / "examples" / "cifar10_resnet18.py"))


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    """tmp_path/cifar-10-batches-bin with 6 batch files of N random records each, and nothing
    else to find: no $MINICNN_DATA, a private user cache."""
    monkeypatch.setattr(CIFAR10, "records_per_file", N)
    monkeypatch.delenv("MINICNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "data" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        rng = np.random.default_rng(k)
        images = rng.integers(0, 256, (N, 3 * 32 * 32), dtype=np.uint8)
        labels = ((np.arange(N) + k) % 10).astype(np.uint8)
        # one record: the label byte, then the R, G and B planes of 32x32 bytes each
        records = np.concatenate([labels[:, None], images], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    return tmp_path / "data"


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_example_trains_and_saves(example, cifar_dir, tmp_path, capsys, amp):
    ckpt = tmp_path / "resnet.npz"
    history = example["main"](QUICK + ["--data-dir", str(cifar_dir), "--save", str(ckpt)]
                              + (["--amp"] if amp else []))
    row = history.epochs[0]
    assert 0 <= row["val_accuracy"] <= 1 and np.isfinite(row["train_loss"])
    assert ("loss_scale" in row) == amp
    out = capsys.readouterr().out
    assert "8 training and 8 test images" in out and ("fp16" if amp else "fp32") in out
    assert "test loss" in out and "best test accuracy" in out
    model = resnet18(num_classes=10, cifar_stem=True)
    opt = minicnn.Adam(model.parameters())
    meta = minicnn.load(model, ckpt, optimizer=opt)
    assert opt.step_count == 2                    # 8 images in batches of 4
    assert meta["epoch"] == 1 and meta["test_accuracy"] == row["val_accuracy"]
    assert meta["precision"] == ("fp16" if amp else "fp32")
    if amp:
        assert meta["grad_scaler"]["scale"] == row["loss_scale"] == 65536.0


def test_example_starts_from_imagenet_weights(example, cifar_dir, tmp_path):
    """A torchvision-named state_dict (here: minicnn's own ImageNet-stem ResNet-18) loads, and
    the 1000-class head is replaced by a 10-class one."""
    minicnn.seed(5)
    imagenet = resnet18(num_classes=1000, cifar_stem=False)
    weights = tmp_path / "resnet18.npz"
    np.savez(weights, **imagenet.state_dict())
    ckpt = tmp_path / "finetuned.npz"
    history = example["main"](QUICK + ["--data-dir", str(cifar_dir), "--pretrained", str(weights),
                                       "--save", str(ckpt), "--amp"])
    assert len(history) == 1
    model = resnet18(num_classes=1000, cifar_stem=False)
    model.fc = minicnn.Linear(512, 10)
    minicnn.load(model, ckpt)
    # two Adam steps of 1e-3 from the ImageNet weights: close to them, but trained
    start = imagenet.state_dict()["conv1.weight"]
    now = model.state_dict()["conv1.weight"]
    assert 0 < np.max(np.abs(now - start)) <= 2.5e-3


def test_example_synthetic_needs_no_data(example, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MINICNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    history = example["main"](QUICK + ["--synthetic", "--amp"])
    assert len(history) == 1 and history.epochs[0]["images_per_s"] > 0
    captured = capsys.readouterr()
    assert "random images" in captured.err and "8 training and 8 test images" in captured.out
    assert not (tmp_path / "cache").exists()


def test_example_without_cifar_or_network_exits_2(example, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MINICNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(CIFAR10, "mirrors", ["http://127.0.0.1:9/"])    # discard port: refused
    with pytest.raises(SystemExit) as e:
        example["main"](["--data-dir", str(tmp_path / "empty"), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 is not available" in err and "127.0.0.1:9" in err
    assert "--synthetic" in err and "no CIFAR-10 sample" in err
    assert not any((tmp_path / "cache").rglob("*.gz"))


def test_example_rejects_a_bad_limit(example, capsys):
    with pytest.raises(SystemExit) as e:
        example["main"](["--limit", "0"])
    assert e.value.code == 2 and "--limit must be at least 1" in capsys.readouterr().err


def test_example_resumes_from_its_checkpoints_bit_for_bit(example, cifar_dir, tmp_path, capsys):
    """Two epochs straight, against one epoch then --resume for the second, with --amp and the
    augmentations: the same weights, bit for bit."""
    args = ["--limit", "8", "--batch-size", "4", "--no-progress", "--no-download", "--amp",
            "--data-dir", str(cifar_dir)]
    example["main"](args + ["--epochs", "2", "--save", str(tmp_path / "straight.npz")])
    ckpt = tmp_path / "ckpt"
    example["main"](args + ["--epochs", "1", "--checkpoint-dir", str(ckpt),
                            "--checkpoint-every", "1"])
    example["main"](args + ["--epochs", "2", "--checkpoint-dir", str(ckpt), "--resume",
                            "--save", str(tmp_path / "resumed.npz")])
    assert "resuming from" in capsys.readouterr().out
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        for key in a.files:
            if key.startswith("model/"):
                assert np.array_equal(a[key], b[key]), key


def test_example_resume_needs_a_checkpoint_dir(example, capsys):
    with pytest.raises(SystemExit):
        example["main"](["--resume"])
    assert "--resume and --checkpoint-every need --checkpoint-dir" in capsys.readouterr().err
