"""Checkpointed training resumes bit-identically: after SIGKILL between steps, inside a step and
while a checkpoint is written; and in-process, one epoch then a resumed second one."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minicnn
from minicnn.data import ArrayDataset, DataLoader, mnist_sample
from minicnn.errors import CheckpointError
from minicnn.io import read_training

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "resume_worker.py"

# 192 images in batches of 16: 12 steps an epoch, 2 epochs; a checkpoint every 5 steps and at
# each epoch's end: steps 5, 10, 12 (epoch 1), 15, 20, 24 (epoch 2)
KILLS = [("between", 7), ("inside", 16), ("write", 3)]   # write 3: the epoch-1 end checkpoint
CONFIGS = {"fp32": [], "dropout": ["--dropout"], "fp16": ["--precision", "fp16", "--dropout"]}


def run_worker(out, ckpt_dir, flags, kill=None, resume=False):
    env = dict(os.environ, MINICNN_TUNE_PROCESS="0", PYTHONPATH=str(ROOT))
    env.pop("MINICNN_TEST_KILL", None)
    if kill is not None:
        env["MINICNN_TEST_KILL"] = kill
    cmd = [sys.executable, str(WORKER), str(out), "--checkpoint-dir", str(ckpt_dir), *flags]
    return subprocess.run(cmd + (["--resume"] if resume else []), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def params(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), \
            f"{k}: max difference {np.abs(a[k] - b[k]).max()}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final parameters, per configuration (computed once)."""
    cache = {}

    def get(config, extra=()):
        key = (config, tuple(extra))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"ref-{config}")
            done = run_worker(d / "out.npz", d / "ckpt", CONFIGS[config] + list(extra))
            assert done.returncode == 0, done.stderr
            cache[key] = params(d / "out.npz")
        return cache[key]
    return get


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("when,k", KILLS, ids=[w for w, _ in KILLS])
def test_sigkill_then_resume_is_bit_identical(tmp_path, reference, config, when, k):
    ckpt = tmp_path / "ckpt"
    killed = run_worker(tmp_path / "out.npz", ckpt, CONFIGS[config], kill=f"{when}:{k}")
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    assert not (tmp_path / "out.npz").exists()
    if when == "write":        # half a temporary file, beside the two complete checkpoints
        assert any(n.endswith(".tmp") for n in os.listdir(ckpt))
    resumed = run_worker(tmp_path / "out.npz", ckpt, CONFIGS[config], resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert_bit_identical(params(tmp_path / "out.npz"), reference(config))
    assert not any(n.endswith(".tmp") for n in os.listdir(ckpt))
    assert len(os.listdir(ckpt)) == 2          # the newest two kept


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["dropout", "fp16"])
def test_sigkill_then_resume_is_bit_identical_on_gpu(tmp_path, reference, config):
    reason = minicnn.backend.cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    gpu = ["--device", "cuda"]
    for when, k in KILLS:
        d = tmp_path / when
        killed = run_worker(d / "out.npz", d / "ckpt", CONFIGS[config] + gpu, kill=f"{when}:{k}")
        assert killed.returncode == -9, (killed.returncode, killed.stderr)
        resumed = run_worker(d / "out.npz", d / "ckpt", CONFIGS[config] + gpu, resume=True)
        assert resumed.returncode == 0, resumed.stderr
        assert_bit_identical(params(d / "out.npz"), reference(config, gpu))


# --- in process ----------------------------------------------------------------------------------

def small_run(seed_model=0):
    minicnn.seed(seed_model)
    sample = mnist_sample(train=True)
    data = ArrayDataset(sample.images[:320], sample.labels[:320])
    train = DataLoader(data, batch_size=32, shuffle=True)
    model = minicnn.Sequential(minicnn.Conv2d(1, 4, 3), minicnn.ReLU(), minicnn.MaxPool2d(2),
                               minicnn.Flatten(), minicnn.Dropout(0.25),
                               minicnn.Linear(4 * 13 * 13, 10))
    optimizer = minicnn.Adam(model.parameters(), lr=3e-3)
    scheduler = minicnn.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler, train


def fit(model, optimizer, scheduler, train, **kw):
    return minicnn.fit(model, minicnn.CrossEntropyLoss(), optimizer, train, scheduler=scheduler,
                       progress=False, verbose=False, **kw)


def test_one_epoch_then_a_resumed_one_equals_two_straight(tmp_path):
    model, opt, sched, train = small_run()
    straight = fit(model, opt, sched, train, epochs=2)
    expected = {k: v.copy() for k, v in model.state_dict().items()}

    m1, o1, s1, t1 = small_run()
    fit(m1, o1, s1, t1, epochs=1, checkpoint_dir=tmp_path)
    m2, o2, s2, t2 = small_run(seed_model=5)       # a fresh process's model, other weights
    resumed = fit(m2, o2, s2, t2, epochs=2, checkpoint_dir=tmp_path, resume=True)
    assert_bit_identical(m2.state_dict(), expected)
    assert len(resumed) == 2
    for a, b in zip(resumed.epochs, straight.epochs):
        assert (a["train_loss"], a["train_accuracy"]) == (b["train_loss"], b["train_accuracy"])


def test_checkpoints_hold_the_position_and_the_newest_two_are_kept(tmp_path):
    model, opt, sched, train = small_run()
    fit(model, opt, sched, train, epochs=1, checkpoint_dir=tmp_path / "new", checkpoint_every=4)
    names = sorted(os.listdir(tmp_path / "new"))
    assert names == ["checkpoint-000000008.npz", "checkpoint-000000010.npz"]   # keep 2
    training = read_training(tmp_path / "new" / names[-1])
    assert (training["epoch"], training["step"], training["global_step"]) == (1, 10, 10)
    assert sorted(training["order"]) == list(range(320))


def test_resume_says_it_starts_fresh(tmp_path, capsys):
    model, opt, sched, train = small_run()
    minicnn.fit(model, minicnn.CrossEntropyLoss(), opt, train, epochs=1, progress=False,
                verbose=True, checkpoint_dir=tmp_path, resume=True)
    assert f"no checkpoint in {str(tmp_path)!r}; starting fresh" in capsys.readouterr().out


def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    model, opt, sched, train = small_run()
    fit(model, opt, sched, train, epochs=2, checkpoint_dir=tmp_path)
    expected = {k: v.copy() for k, v in model.state_dict().items()}
    newest, before = tmp_path / "checkpoint-000000020.npz", tmp_path / "checkpoint-000000010.npz"
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 3])                   # truncated
    m2, o2, s2, t2 = small_run(seed_model=3)
    with pytest.warns(RuntimeWarning) as caught:
        fit(m2, o2, s2, t2, epochs=2, checkpoint_dir=tmp_path, resume=True)
    message = str(caught[0].message)
    assert str(newest) in message and str(before) in message
    assert_bit_identical(m2.state_dict(), expected)


def test_no_readable_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoint-000000003.npz").write_bytes(b"not a zip")
    model, opt, sched, train = small_run()
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        fit(model, opt, sched, train, epochs=1, checkpoint_dir=tmp_path, resume=True)


def test_a_version_1_file_loads_weights_but_cannot_resume(tmp_path, monkeypatch):
    model, opt, sched, train = small_run()
    monkeypatch.setattr(minicnn.io, "FORMAT_VERSION", 1)
    minicnn.save(model, tmp_path / "checkpoint-000000001.npz", optimizer=opt)
    monkeypatch.undo()
    minicnn.load(small_run()[0], tmp_path / "checkpoint-000000001.npz", optimizer=opt)
    with pytest.raises(CheckpointError, match="format version 1.*needs version 2"):
        read_training(tmp_path / "checkpoint-000000001.npz")


@pytest.mark.parametrize("kwargs,error,match", [
    ({"resume": True}, ValueError, "need checkpoint_dir"),
    ({"checkpoint_every": 3}, ValueError, "need checkpoint_dir"),
    ({"checkpoint_dir": ".", "checkpoint_every": 0}, ValueError, "checkpoint_every must be"),
    ({"checkpoint_dir": ".", "keep_checkpoints": 0}, ValueError, "keep_checkpoints must be"),
])
def test_fit_checks_its_checkpoint_arguments(kwargs, error, match):
    model, opt, sched, train = small_run()
    with pytest.raises(error, match=match):
        fit(model, opt, sched, train, epochs=1, **kwargs)


def test_save_and_load_carry_the_grad_scaler(tmp_path):
    model = small_run()[0]
    scaler = minicnn.GradScaler(init_scale=1024.0, growth_interval=7)
    scaler._growth_tracker = 3
    minicnn.save(model, tmp_path / "a.npz", scaler=scaler)
    other = minicnn.GradScaler()
    minicnn.load(model, tmp_path / "a.npz", scaler=other)
    assert other.state_dict() == scaler.state_dict()
    minicnn.save(model, tmp_path / "b.npz")
    with pytest.raises(CheckpointError, match="holds no GradScaler state"):
        minicnn.load(model, tmp_path / "b.npz", scaler=other)
