"""Checkpoints: exact round trips, identical resumption, corrupt and mismatched files rejected
without touching the model, and atomic writes."""
import json
import os
import stat

import numpy as np
import pytest

import minicnn.io
from minicnn.io import CheckpointError, load, save
from minicnn.lr_scheduler import OneCycleLR, StepLR
from minicnn.module import Module, new_param
from minicnn.optim import SGD, Adam


class Head(Module):
    def __init__(self, rng, n_in, n_out):
        self.weight = new_param(rng.standard_normal((n_out, n_in)))
        self.bias = new_param(rng.standard_normal(n_out))


class Net(Module):
    """Two parameters of its own and a child module, so names are nested ("head.weight")."""

    def __init__(self, seed=0, hidden=4, head_name="head"):
        rng = np.random.default_rng(seed)
        self.weight = new_param(rng.standard_normal((hidden, 3)))
        self.scale = new_param(rng.standard_normal(hidden))
        setattr(self, head_name, Head(rng, hidden, 2))


def snapshot(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def assert_same(model, snap):
    state = model.state_dict()
    assert list(state) == list(snap)
    for k in snap:
        np.testing.assert_array_equal(state[k], snap[k])


def train(model, opt, sched, steps, seed):
    """Steps of a made-up loss whose gradient depends on the parameters (0.5*|p - target|^2)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad[...] = p.data - rng.standard_normal(p.shape)
        opt.step()
        if sched is not None:
            sched.step()


@pytest.fixture
def ckpt(tmp_path):
    return tmp_path / "model.ckpt"  # no .npz suffix: the exact name must be kept


def test_round_trip_restores_parameters_exactly(ckpt):
    model = Net(seed=0)
    saved = snapshot(model)
    save(model, ckpt, metadata={"epoch": 3, "note": "hello", "acc": [0.5, 0.75]})
    assert os.listdir(ckpt.parent) == ["model.ckpt"]  # the exact path, nothing else

    other = Net(seed=1)
    arrays = [p.data for p in other.parameters()]
    meta = load(other, ckpt)
    assert meta == {"epoch": 3, "note": "hello", "acc": [0.5, 0.75]}
    assert_same(other, saved)
    assert all(p.data is a for p, a in zip(other.parameters(), arrays))  # loaded in place


def test_file_layout(ckpt):
    model = Net()
    opt = Adam(model.parameters(), lr=0.01)
    train(model, opt, None, 2, seed=3)
    sched = StepLR(opt, step_size=2)
    save(model, ckpt, optimizer=opt, scheduler=sched, metadata={"run": 1})
    with np.load(ckpt, allow_pickle=False) as npz:
        files = set(npz.files)
        meta = json.loads(npz["__meta__"].tobytes().decode("utf-8"))
        assert npz["__meta__"].dtype == np.uint8
        np.testing.assert_array_equal(npz["model/head.weight"], model.head.weight.data)
        np.testing.assert_array_equal(npz["optim/0.exp_avg"], opt.state[0]["exp_avg"])
    names = ["weight", "scale", "head.weight", "head.bias"]
    assert files == ({"__meta__"} | {f"model/{n}" for n in names}
                     | {f"optim/{i}.{b}" for i in range(4) for b in ("exp_avg", "exp_avg_sq")})
    assert meta["format"] == "minicnn-checkpoint" and meta["format_version"] == 2
    assert "minicnn_version" in meta
    assert meta["model"]["class"] == "Net"
    assert meta["model"]["parameters"][2] == {"name": "head.weight", "shape": [2, 4],
                                              "dtype": "float32"}
    assert meta["optimizer"]["type"] == "Adam" and meta["optimizer"]["step"] == 2
    assert meta["optimizer"]["hyper"]["lr"] == 0.01
    assert meta["scheduler"]["type"] == "StepLR" and meta["metadata"] == {"run": 1}


@pytest.mark.parametrize("make_opt, make_sched", [
    (lambda ps: Adam(ps, lr=0.05, weight_decay=0.01), lambda o: OneCycleLR(o, 0.1, total_steps=10)),
    (lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True), lambda o: StepLR(o, 2, 0.5)),
])
def test_resumes_training_identically(ckpt, make_opt, make_sched):
    straight = Net()
    opt = make_opt(straight.parameters())
    sched = make_sched(opt)
    train(straight, opt, sched, 3, seed=10)
    train(straight, opt, sched, 2, seed=11)

    first = Net()
    opt = make_opt(first.parameters())
    sched = make_sched(opt)
    train(first, opt, sched, 3, seed=10)
    save(first, ckpt, optimizer=opt, scheduler=sched)

    resumed = Net(seed=7)
    opt2 = make_opt(resumed.parameters())
    sched2 = make_sched(opt2)
    load(resumed, ckpt, optimizer=opt2, scheduler=sched2)
    assert opt2.step_count == 3 and sched2.last_epoch == 3
    train(resumed, opt2, sched2, 2, seed=11)
    assert_same(resumed, snapshot(straight))


# --- bad files: CheckpointError, model untouched ---------------------------------------------

def load_fails(path, match, optimizer=None, scheduler=None, model=None):
    model = model or Net(seed=5)
    before = snapshot(model)
    opt_before = None if optimizer is None else optimizer.state_dict()
    with pytest.raises(CheckpointError, match=match) as info:
        load(model, path, optimizer=optimizer, scheduler=scheduler)
    assert_same(model, before)
    if optimizer is not None:
        after = optimizer.state_dict()
        assert after["hyper"] == opt_before["hyper"] and after["step"] == opt_before["step"]
    return str(info.value)


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1, -30], ids=lambda k: f"keep={k}")
def test_truncated_file(ckpt, keep):
    save(Net(), ckpt, optimizer=SGD(Net().parameters(), lr=0.1))
    data = ckpt.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    ckpt.write_bytes(data[:n])
    message = load_fails(ckpt, "not a readable minicnn checkpoint")
    assert str(ckpt) in message


def test_garbage_bytes(ckpt):
    ckpt.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    load_fails(ckpt, "truncated or corrupt")


def test_corrupted_bytes_inside_the_archive(ckpt):
    save(Net(), ckpt)
    data = bytearray(ckpt.read_bytes())
    start = data.index(b"model/head.weight.npy") + 200  # inside the array data of that entry
    data[start:start + 8] = b"\xff" * 8
    ckpt.write_bytes(bytes(data))
    load_fails(ckpt, "Bad CRC-32")


def test_npz_that_is_not_a_checkpoint(ckpt, tmp_path):
    with open(ckpt, "wb") as f:
        np.savez(f, weight=np.ones(3))
    load_fails(ckpt, "no '__meta__' entry")
    npy = tmp_path / "array.npy"
    np.save(npy, np.ones(3))
    load_fails(npy, "single .npy array")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(Net(), tmp_path / "nope.ckpt")


def test_wrong_shapes(ckpt):
    save(Net(hidden=4), ckpt)
    message = load_fails(ckpt, "does not fit Net", model=Net(hidden=5))
    assert "'weight' has shape (4, 3) in the checkpoint, (5, 3) in the model" in message


def test_wrong_names(ckpt):
    save(Net(), ckpt)
    message = load_fails(ckpt, "does not fit Net", model=Net(head_name="classifier"))
    assert "missing entries ['classifier.weight', 'classifier.bias']" in message
    assert "unexpected entries ['head.weight', 'head.bias']" in message


def test_missing_optimizer_state(ckpt):
    save(Net(), ckpt)
    model = Net(seed=5)
    opt = Adam(model.parameters())
    load_fails(ckpt, "holds no optimizer state", optimizer=opt, model=model)
    load_fails(ckpt, "holds no scheduler state", scheduler=StepLR(opt, 2), model=model)
    load(model, ckpt)  # without optimizer= it loads


def test_optimizer_state_that_does_not_fit(ckpt):
    model = Net()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, None, 1, seed=0)
    save(model, ckpt, optimizer=opt)
    other = Net(seed=5)
    load_fails(ckpt, "state is from a SGD optimizer, expected Adam",
               optimizer=Adam(other.parameters()), model=other)
    load_fails(ckpt, "state is for 4 parameters, this optimizer has 2",
               optimizer=SGD(other.parameters()[:2], lr=0.1), model=other)


def test_header_and_arrays_must_agree(ckpt):
    save(Net(), ckpt)
    with np.load(ckpt, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    del arrays["model/scale"]
    with open(ckpt, "wb") as f:
        np.savez(f, **arrays)
    load_fails(ckpt, r"is inconsistent: entries missing \['model/scale'\]")


def test_newer_format_version(ckpt):
    save(Net(), ckpt)
    with np.load(ckpt, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["__meta__"].tobytes())
    meta["format_version"] = 99
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(ckpt, "wb") as f:
        np.savez(f, **arrays)
    load_fails(ckpt, "format version 99")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# --- saving: validation and atomicity -----------------------------------------------------------

def test_metadata_must_be_json(ckpt):
    with pytest.raises(TypeError, match="metadata must be JSON-serializable"):
        save(Net(), ckpt, metadata={"array": np.ones(2)})
    with pytest.raises(TypeError, match="metadata must be a dict"):
        save(Net(), ckpt, metadata=[1, 2])
    with pytest.raises(TypeError, match="optimizer must be a minicnn Optimizer or None"):
        save(Net(), ckpt, optimizer="adam")
    assert os.listdir(ckpt.parent) == []


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save(Net(), tmp_path / "no" / "such" / "dir.ckpt")


def failing_savez(file, **arrays):
    file.write(b"PK\x03\x04 half a checkpoint")
    raise RuntimeError("disk full")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_write_leaves_nothing_behind(ckpt, monkeypatch, existing):
    if existing:
        save(Net(seed=0), ckpt)
        old = ckpt.read_bytes()
    monkeypatch.setattr(minicnn.io.np, "savez", failing_savez)
    with pytest.raises(RuntimeError, match="disk full"):
        save(Net(seed=1), ckpt)
    assert os.listdir(ckpt.parent) == (["model.ckpt"] if existing else [])
    if existing:
        assert ckpt.read_bytes() == old
        monkeypatch.undo()
        model = Net(seed=2)
        load(model, ckpt)
        assert_same(model, snapshot(Net(seed=0)))


def test_failed_rename_leaves_nothing_behind(ckpt, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(minicnn.io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save(Net(), ckpt)
    assert os.listdir(ckpt.parent) == []


def test_overwrite_and_file_mode(ckpt):
    save(Net(seed=0), ckpt)
    save(Net(seed=1), ckpt)
    model = Net(seed=2)
    load(model, ckpt)
    assert_same(model, snapshot(Net(seed=1)))
    umask = os.umask(0)
    os.umask(umask)
    if os.name == "posix":
        assert (os.stat(ckpt).st_mode & 0o777) == (0o666 & ~umask)


@pytest.mark.parametrize("data,want", [(b"\x00bytes\xff", b"\x00bytes\xff"),
                                       ("text \u00e9", "text \u00e9".encode("utf-8")),
                                       (lambda f: f.write(b"by a writer"), b"by a writer")],
                         ids=["bytes", "str", "writer"])
def test_write_atomic_writes_whole_files_with_the_mode_open_gives(tmp_path, data, want):
    """One writer for checkpoints, ONNX files, selftest reports and generated docs: the content,
    and the mode open() would give (0666 less the umask), not the temporary file's private 0600."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    minicnn.io.write_atomic(path, data)
    assert path.read_bytes() == want
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]      # no temporary file left
