"""The CUDA-graph training step (minicnn/graph.py) without a GPU.

A stand-in recorder keeps what a real capture keeps: recording runs nothing, a replay runs the
recorded function again on the same static input arrays. So these tests check the runner's
bookkeeping: batches copied into the static inputs before each replay, the host half of the
optimizer step run before it, warm-up steps, eager steps for other shapes, sums that stay on the
device across epochs. What only a GPU can show (that the step records at all, with nothing read
back) is in tests/test_gpu.py.
"""
import numpy as np
import pytest

import minicnn
from minicnn import train
from minicnn.fused import FusedAdam, FusedAdamW, graph
from minicnn.data import ArrayDataset, DataLoader
from minicnn.fused.graph import GraphStep
from minicnn.models import mnist_cnn


class StandInRecorder:
    """Records by remembering the function (running nothing), as stream capture does."""

    def __init__(self):
        self.warmed = self.recorded = 0

    def warm(self, fn):
        self.warmed += 1
        fn()

    def record(self, fn):
        self.recorded += 1
        return _Replay(fn)


class _Replay:
    def __init__(self, fn):
        self.launch = fn


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    return ArrayDataset(images, rng.integers(0, 10, n))


def _train(cuda_graph, monkeypatch, epochs=2, optimizer=FusedAdam):
    minicnn.seed(0)
    model = mnist_cnn()
    opt = optimizer(model.parameters(), lr=1e-3)
    sched = minicnn.StepLR(opt, step_size=3, gamma=0.5)     # lr changes between replays
    recorders = []
    if cuda_graph:
        def recorder():
            recorders.append(StandInRecorder())
            return recorders[-1]
        monkeypatch.setattr(graph, "CudaRecorder", recorder)
        monkeypatch.setattr(train, "_check_graphable", lambda *a: None)
    loader = DataLoader(_data(), batch_size=64, shuffle=True)   # 4 full batches + 44
    history = minicnn.fit(model, minicnn.CrossEntropyLoss(), opt, loader, epochs=epochs,
                          scheduler=sched, scheduler_interval="batch", progress=False,
                          verbose=False, cuda_graph=cuda_graph)
    return model, history, recorders


@pytest.mark.parametrize("optimizer", [FusedAdam, FusedAdamW])
def test_graph_path_trains_exactly_like_the_eager_path(monkeypatch, optimizer):
    """Two epochs of 5 batches (the last one smaller, run eagerly), lr changed by a scheduler
    every 3 steps: parameters and epoch metrics equal to the last bit."""
    eager, eager_hist, _ = _train(False, monkeypatch, optimizer=optimizer)
    graphed, graph_hist, recorders = _train(True, monkeypatch, optimizer=optimizer)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        np.testing.assert_array_equal(a.data, b.data)
    for a, b in zip(eager_hist.epochs, graph_hist.epochs):
        assert (a["train_loss"], a["train_accuracy"]) == (b["train_loss"], b["train_accuracy"])
    [rec] = recorders
    assert (rec.warmed, rec.recorded) == (3, 1)     # 3 warm-up steps, then recorded once


def test_graph_step_copies_each_batch_into_its_static_inputs():
    seen, prepared = [], []
    step = GraphStep(lambda x, y: seen.append((x.copy(), y.copy())),
                     lambda: prepared.append(len(seen)), warmup=1, recorder=StandInRecorder())
    batches = [(np.full((2, 3), i, np.float32), np.full(2, i)) for i in range(1, 5)]
    for x, y in batches:
        step(x, y)
    step(np.ones((1, 3), np.float32), np.ones(1, int))        # another shape: eager
    assert [int(x[0, 0]) for x, _ in seen] == [1, 2, 3, 4, 1]
    assert prepared == [0, 1, 2, 3, 4]                       # the host half before every step
    assert step.replays == 3                                 # steps 2, 3, 4


def test_fit_refuses_what_a_graph_cannot_record():
    model = mnist_cnn()
    loader = DataLoader(_data(64), batch_size=64)

    def fit(m, opt, **kw):
        minicnn.fit(m, minicnn.CrossEntropyLoss(), opt, loader, progress=False, verbose=False,
                    cuda_graph=True, **kw)
    with pytest.raises(ValueError, match="needs the model on a CUDA device, got cpu"):
        fit(model, FusedAdam(model.parameters()))


def test_refusals_name_the_reason(monkeypatch):
    """Past the device check: the optimizer, mixed precision and Dropout are refused."""
    model = mnist_cnn()
    monkeypatch.setattr(minicnn.module.Parameter, "device", property(lambda p: "cuda"))
    check = train._check_graphable
    with pytest.raises(ValueError, match="reads its step count .* got SGD"):
        check(model, minicnn.SGD(model.parameters(), lr=0.1), None)
    with pytest.raises(ValueError, match=r"capturable optimizer.* minicnn\.fused\.FusedAdam or "
                                         r"FusedAdamW, got Adam$"):
        check(model, minicnn.Adam(model.parameters()), None)     # the plain reference is not
    adam = FusedAdam(model.parameters())
    with pytest.raises(ValueError, match="GradScaler"):
        check(model, adam, minicnn.GradScaler())
    dropout = minicnn.Sequential(minicnn.Flatten(), minicnn.Dropout(0.5), minicnn.Linear(784, 10))
    with pytest.raises(ValueError, match="Dropout"):
        check(dropout, FusedAdam(dropout.parameters()), None)
    check(model, adam, None)                                 # the example network is fine


def test_tf32_switch_is_off_by_default_and_restores(monkeypatch):
    """The switch itself, as recorded without a GPU (tests/test_gpu.py has what a GPU does)."""
    monkeypatch.setattr(minicnn.backend, "cuda_unavailable_reason", lambda: "no GPU in this test")
    assert minicnn.backend.tf32_allowed() is False
    try:
        assert minicnn.backend.allow_tf32() is False          # returns the previous setting
        assert minicnn.backend.tf32_allowed() is True
    finally:
        minicnn.backend.allow_tf32(False)
    assert minicnn.backend.tf32_allowed() is False
