"""minicnn.distributed: the sampler's sharding rule (no MPI), runs of 2 and 3 processes under
mpiexec that must equal one process at the combined batch, the NCCL glue on a strict stand-in
for ``cupy.cuda.nccl``, and what a failing process does to the others.

The mpiexec runs start tests/distributed_worker.py (each run ~1-6 s, most of it start-up and
imports); their reports are shared by the tests that read them. Tolerances: parameters of w
processes at batch B and of one process at batch w*B agree to 1e-12 of the largest parameter
(float64, 20 Adam steps; they differ only in the order of the sums); every process holds the
same bits.
"""
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import minicnn
from minicnn.data import ArrayDataset, DataLoader
from minicnn.distributed import DistributedSampler

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
TOL = 1e-12


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _worker_module():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the sampler: pure Python --------------------------------------------------------------------

@pytest.mark.parametrize("n,w", [(10, 4), (12, 4), (7, 3), (2, 5), (1, 1)])
def test_sampler_pads_by_repeating_the_first_indices(n, w):
    shards = [DistributedSampler(n, w, r, seed=3) for r in range(w)]
    order = shards[0].permutation()
    total = -(-n // w) * w
    expected = np.tile(order, -(-total // n))[:total]         # the order, then its start again
    np.testing.assert_array_equal(shards[0].global_indices(), expected)
    for r, s in enumerate(shards):
        assert len(s) == total // w
        np.testing.assert_array_equal(s.indices(), expected[r::w])
        assert list(s) == expected[r::w].tolist()
    assert sorted(set(np.concatenate([s.indices() for s in shards]).tolist())) == list(range(n))


@pytest.mark.parametrize("n,w", [(10, 4), (12, 4), (7, 3), (5, 5)])
def test_sampler_drop_last_drops_the_tail(n, w):
    shards = [DistributedSampler(n, w, r, seed=3, drop_last=True) for r in range(w)]
    kept = shards[0].permutation()[:n // w * w]
    for r, s in enumerate(shards):
        assert len(s) == n // w
        np.testing.assert_array_equal(s.indices(), kept[r::w])
    together = np.concatenate([s.indices() for s in shards])
    assert sorted(together.tolist()) == sorted(kept.tolist())        # each kept sample once


def test_uneven_shards_cover_every_sample_once():
    shards = [DistributedSampler(10, 4, r, shuffle=False, even=False) for r in range(4)]
    assert [len(s) for s in shards] == [3, 3, 2, 2]
    assert [s.indices().tolist() for s in shards] == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]


def test_the_order_follows_seed_and_epoch_and_leaves_minicnn_generator_alone():
    a, b = DistributedSampler(50, 2, 0, seed=1), DistributedSampler(50, 2, 1, seed=1)
    first = a.permutation()
    np.testing.assert_array_equal(first, b.permutation())      # every rank draws the same
    state = minicnn.backend.get_rng_state()
    a.set_epoch(1)
    second = a.permutation()
    assert not np.array_equal(first, second)
    assert sorted(second.tolist()) == list(range(50))
    a.set_epoch(0)
    np.testing.assert_array_equal(a.permutation(), first)      # deterministic
    assert not np.array_equal(DistributedSampler(50, 2, 0, seed=2).permutation(), first)
    assert minicnn.backend.get_rng_state() == state
    np.testing.assert_array_equal(DistributedSampler(6, 2, 0, shuffle=False).permutation(),
                                  np.arange(6))


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_k_of_all_shards_is_batch_k_of_one_process_at_w_times_the_batch(drop_last):
    """The union of the w loaders' batch k is positions [k*w*B, (k+1)*w*B) of the global
    order, the last (smaller) batch included: what the equality tests compare against."""
    n, w, B = 23, 3, 3
    images = np.random.default_rng(0).standard_normal((n, 1, 2, 2))
    data = ArrayDataset(images, np.arange(n))
    samplers = [DistributedSampler(n, w, r, seed=5, drop_last=drop_last) for r in range(w)]
    loaders = [DataLoader(data, batch_size=B, sampler=s) for s in samplers]
    glob = samplers[0].global_indices()
    assert len({len(loader) for loader in loaders}) == 1
    batches = [list(loader) for loader in loaders]
    for k in range(len(loaders[0])):
        union = sorted(int(i) for b in batches for i in b[k][1])
        assert union == sorted(glob[k * w * B:(k + 1) * w * B].tolist())
    assert len(batches[0][-1][1]) < B                        # an uneven last batch


def test_dataloader_with_a_sampler():
    data = ArrayDataset(np.random.default_rng(1).standard_normal((7, 1, 2, 2)), np.arange(7))
    loader = DataLoader(data, batch_size=2, sampler=[6, 0, 3])
    assert len(loader) == 2 and "sampler=[6, 0, 3]" in repr(loader)
    assert [y.tolist() for _, y in loader] == [[6, 0], [3]]
    np.testing.assert_array_equal(loader.last_order, [6, 0, 3])
    assert [y.tolist() for _, y in loader.iter_from(np.array([1, 1, 2]), 1)] == [[2]]
    with pytest.raises(ValueError, match=r"expected 3 sample indices in \[0, 7\)"):
        loader.iter_from(np.array([1, 9, 2]))
    with pytest.raises(ValueError, match="shuffle=False"):
        DataLoader(data, sampler=[0], shuffle=True)
    with pytest.raises(ValueError, match=r"outside \[0, 7\): \[7\]"):
        list(DataLoader(data, sampler=[0, 7]))


def test_sampler_checks_its_arguments(monkeypatch):
    from minicnn.distributed import comm
    monkeypatch.setattr(comm, "_group", None)         # as in a process that never called init
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        DistributedSampler(10, 2, 2)
    with pytest.raises(ValueError, match="world_size must be an integer >= 1, got 0"):
        DistributedSampler(10, 0, 0)
    with pytest.raises(ValueError, match="cannot go with even=False"):
        DistributedSampler(10, 2, 0, drop_last=True, even=False)
    with pytest.raises(ValueError, match="leaves none"):
        DistributedSampler(1, 2, 0, drop_last=True)
    with pytest.raises(RuntimeError, match=r"call minicnn.distributed.init\(\) first"):
        DistributedSampler(10)
    assert len(DistributedSampler(ArrayDataset(np.zeros((5, 1, 1, 1)), np.arange(5)), 2, 1)) == 3


# --- the NCCL glue, on a strict stand-in ---------------------------------------------------------

class StrictNccl(types.ModuleType):
    """``cupy.cuda.nccl`` as ``cupy_backends/cuda/libs/nccl.pyx`` defines it in CuPy ``version``
    13 or 14, checking every argument's type and meaning; the other processes are simulated as
    holding the same arrays as this one (so a sum over them is ``ndev`` times this one's)."""

    NCCL_SUM, NCCL_INT32, NCCL_INT64, NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 0, 2, 4, 6, 7, 8
    available = True

    def __init__(self, version, registry, current_stream):
        super().__init__("cupy.cuda.nccl")
        self.version, self.calls = version, []
        owner = self

        class NcclCommunicator:
            def __init__(self, ndev, commId, rank):
                assert type(ndev) is int and type(rank) is int and 0 <= rank < ndev
                id_type = tuple if owner.version == 13 else bytes   # commId's declared type
                assert type(commId) is id_type and len(commId) == 128, type(commId)
                self.ndev, self.rank = ndev, rank

            def _array(self, ptr, count, datatype, stream):
                for name, v in (("ptr", ptr), ("count", count), ("datatype", datatype),
                                ("stream", stream)):
                    assert type(v) is int, f"{name} must be a Python int, got {type(v)}"
                array = registry[ptr]
                assert array.size == count and array.flags.c_contiguous
                codes = {np.int32: 2, np.int64: 4, np.float16: 6, np.float32: 7, np.float64: 8}
                assert codes[array.dtype.type] == datatype
                assert stream == current_stream().ptr, "not CuPy's current stream"
                return array

            def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
                array = self._array(sendbuf, count, datatype, stream)
                assert recvbuf == sendbuf and type(op) is int and op == owner.NCCL_SUM
                array[...] = array * self.ndev
                owner.calls.append(("allReduce", count))

            def bcast(self, buff, count, datatype, root, stream):
                self._array(buff, count, datatype, stream)
                assert type(root) is int and root == 0
                owner.calls.append(("bcast", count))
        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        return tuple(range(-64, 64)) if self.version == 13 else bytes(range(128))


class FakeWorld:
    """mpi4py's COMM_WORLD as a ProcessGroup uses it, for rank 0 of ``size``: ``bcast`` pickles."""

    def __init__(self, size):
        self.size = size

    def Get_rank(self):
        return 0

    def Get_size(self):
        return self.size

    def bcast(self, obj, root=0):
        return pickle.loads(pickle.dumps(obj))


@pytest.fixture
def fake_gpu(monkeypatch):
    """minicnn on the CuPy stand-in of minicnn.testing.capture, with device pointers and stream
    pointers, and a strict NCCL module for ``version`` (set by the test)."""
    from minicnn.testing import capture
    registry = {}

    def data(array):
        ptr = array.__array_interface__["data"][0]
        registry[ptr] = array             # the array whose pointer was taken last
        return types.SimpleNamespace(ptr=ptr)
    monkeypatch.setattr(capture.DeviceArray, "data", property(data), raising=False)
    monkeypatch.setattr(capture.Stream, "ptr", property(lambda s: 0 if s.null else id(s)),
                        raising=False)
    with capture.fake_cupy() as cupy:
        def install(version):
            nccl = StrictNccl(version, registry, cupy.cuda.get_current_stream)
            monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
            return cupy, nccl
        yield install


@pytest.mark.parametrize("version", [13, 14])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_nccl_path_on_a_strict_stand_in(fake_gpu, version, batch_norm):
    """2 simulated processes holding the same batch (batch 8: every scaling exact) must train
    exactly as one; each step is one allReduce of the flat buffer on the current stream and
    nothing else (no buffer is sent while training), and with BatchNorm ``eval()`` sends each
    buffer (float and int64) once."""
    from minicnn.distributed import DistributedDataParallel
    from minicnn.distributed.comm import ProcessGroup, _NcclCalls
    cupy, nccl = fake_gpu(version)
    world = FakeWorld(2)
    group = ProcessGroup(world, minicnn.device("cuda"), 0, _NcclCalls(2, 0, world))
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((8, 1, 4, 4)), rng.integers(0, 3, 8)
    xd, yd = cupy.asarray(x), cupy.asarray(y)

    def trained(wrap):
        minicnn.seed(0)
        model = minicnn.Sequential(minicnn.Flatten(), minicnn.Linear(16, 3)).to("cuda")
        if batch_norm:
            model = minicnn.Sequential(minicnn.Flatten(), minicnn.Linear(16, 3),
                                       minicnn.BatchNorm1d(3)).to("cuda")
        if wrap:
            model = DistributedDataParallel(model, group)
        loss_fn, opt = minicnn.CrossEntropyLoss(), minicnn.Adam(model.parameters(), lr=0.1)
        with cupy.cuda.Stream():                 # a stream of its own: NCCL must be given it
            for _ in range(3):
                loss_fn(model(xd), yd)
                opt.zero_grad()
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step()
            model.eval()
            model.eval()                         # already evaluating: nothing sent again
            model.train()
        return model.state_dict()
    plain, ddp = trained(False), trained(True)
    for k in plain:
        np.testing.assert_array_equal(ddp[k], plain[k])
    if not batch_norm:
        assert nccl.calls == [("bcast", 48), ("bcast", 3)] + [("allReduce", 48 + 3 + 1)] * 3
    else:           # parameters 48, 3, 3, 3; buffers running mean, var and the int64 count
        buffers = [("bcast", 3), ("bcast", 3), ("bcast", 1)]
        assert nccl.calls == [("bcast", n) for n in (48, 3, 3, 3)] + buffers + (
            [("allReduce", 48 + 3 + 3 + 3 + 1)] * 3) + buffers


@pytest.mark.parametrize("version", [13, 14])
def test_init_on_a_gpu_picks_the_device_and_makes_a_communicator(fake_gpu, monkeypatch, version):
    from minicnn.distributed import comm
    from minicnn.testing import capture
    fake_gpu(version)
    used = []
    monkeypatch.setattr(capture._Device, "use", lambda self: used.append(True), raising=False)
    monkeypatch.setattr(comm, "_group", None)
    group = comm.init("cuda", mpi=False)
    assert used and group.device == "cuda" and group.size == 1
    assert "NCCL" in repr(group) and comm.get_group() is group


# --- one process, a group that counts its collectives --------------------------------------------

class CountingGroup:
    """A ProcessGroup of one process without MPI that records its collectives."""

    def __new__(cls):
        from minicnn.distributed.comm import ProcessGroup, _OneProcess

        class Counting(ProcessGroup):
            def broadcast_(self, array, root=0):
                self.calls.append(("broadcast", int(array.size)))
                return super().broadcast_(array, root)

            def all_reduce_(self, array):
                self.calls.append(("all_reduce", int(array.size)))
                return super().all_reduce_(array)

            def sum(self, values):
                self.calls.append(("sum", len(values)))
                return super().sum(values)
        group = Counting(_OneProcess(), minicnn.device("cpu"))
        group.calls = []
        return group


def _batch_norm_net():
    minicnn.seed(0)
    return minicnn.Sequential(minicnn.Flatten(), minicnn.Linear(16, 3), minicnn.BatchNorm1d(3))


def test_training_sends_no_buffers_and_eval_sends_rank_0s_once():
    """A training forward reads no running statistics, so nothing is broadcast while training;
    switching to evaluation broadcasts each buffer once (rank 0's), and only from training."""
    from minicnn.distributed import DistributedDataParallel
    group = CountingGroup()
    ddp = DistributedDataParallel(_batch_norm_net(), group)
    assert group.calls == [("broadcast", n) for n in (48, 3, 3, 3, 3, 3, 1)]
    group.calls.clear()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 1, 4, 4)), rng.integers(0, 3, 8)
    loss_fn = minicnn.CrossEntropyLoss()
    for _ in range(3):
        loss_fn(ddp(x), y)
        ddp.backward(loss_fn.backward(), input_grad=False)
    assert group.calls == [("all_reduce", 48 + 3 + 3 + 3 + 1)] * 3
    group.calls.clear()
    assert ddp.eval() is ddp and not ddp.training
    assert group.calls == [("broadcast", 3), ("broadcast", 3), ("broadcast", 1)]
    ddp.eval()
    ddp.train()
    assert ddp.training and len(group.calls) == 3
    group.calls.clear()
    result = minicnn.evaluate(ddp, DataLoader(ArrayDataset(x, y), batch_size=4))
    assert ddp.training and result["images"] == 8
    assert [c for c in group.calls if c[0] == "broadcast"] == [("broadcast", 3),
                                                               ("broadcast", 3), ("broadcast", 1)]


def test_to_rebinds_the_gradients_and_a_moved_module_is_rebound(monkeypatch):
    """``to`` puts the new gradients of ``Module.to`` into the flat buffers at once; the module
    moved behind the wrapper's back is caught at the next backward (an O(1) check)."""
    import minicnn.module
    from minicnn.distributed import DistributedDataParallel
    ddp = DistributedDataParallel(_batch_norm_net(), CountingGroup())

    def bound():
        return all(any(np.shares_memory(p.grad, f) for f in ddp._buffers_flat)
                   for p in ddp.parameters())
    assert bound()
    monkeypatch.setattr(minicnn.module, "to_device", lambda x, dev: np.array(x))   # new arrays
    ddp.to("cpu")
    assert bound()
    ddp.module.to("cpu")
    assert not bound()
    rng = np.random.default_rng(0)
    loss_fn = minicnn.CrossEntropyLoss()
    loss_fn(ddp(rng.standard_normal((4, 1, 4, 4))), rng.integers(0, 3, 4))
    ddp.backward(loss_fn.backward(), input_grad=False)
    assert bound() and any(float(np.abs(p.grad).max()) > 0 for p in ddp.parameters())


def test_collectives_use_the_mpi_module_kept_at_init(monkeypatch):
    from minicnn.distributed import comm

    class World(FakeWorld):
        def Allreduce(self, sendbuf, recvbuf, op):
            assert sendbuf is mpi.IN_PLACE and op is mpi.SUM
            recvbuf *= 2
    mpi = types.SimpleNamespace(IN_PLACE=object(), SUM=object())
    group = comm.ProcessGroup(World(2), minicnn.device("cpu"), mpi=mpi)

    def no_import():
        raise AssertionError("MPI imported again")
    monkeypatch.setattr(comm, "_mpi", no_import)
    assert group.all_reduce_(np.ones(3)).tolist() == [2.0, 2.0, 2.0]
    assert group.sum([1.0, 2.0]) == [2.0, 4.0]


@pytest.mark.parametrize("progress,reads", [(False, 1), (True, 5)])
def test_fit_reads_the_summed_meter_at_log_steps_only_for_a_progress_bar(progress, reads):
    """4 steps at log_every=1: without a progress bar anywhere, the one all-reduce of the meter
    is the epoch's end (not one per log step)."""
    from minicnn.distributed import DistributedDataParallel
    group = CountingGroup()
    minicnn.seed(0)
    ddp = DistributedDataParallel(minicnn.Sequential(minicnn.Flatten(), minicnn.Linear(16, 3)),
                                  group)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.standard_normal((32, 1, 4, 4)), rng.integers(0, 3, 32))
    history = minicnn.fit(ddp, minicnn.CrossEntropyLoss(), minicnn.SGD(ddp.parameters(), lr=0.1),
                          DataLoader(data, batch_size=8), progress=progress, verbose=False,
                          log_every=1)
    assert [c for c in group.calls if c[0] == "sum"] == [("sum", 3)] * reads
    assert history.epochs[0]["train_loss"] > 0


class _Cut(Exception):
    pass


class _StopAfter:
    def __init__(self, loss_fn, k):
        self.loss_fn, self.k, self.steps = loss_fn, k, 0

    def __call__(self, logits, y):
        if self.steps == self.k:
            raise _Cut
        return self.loss_fn(logits, y)

    def backward(self):
        self.steps += 1
        return self.loss_fn.backward()


def test_a_one_process_checkpoint_resumes_in_a_distributed_run_of_one(tmp_path):
    """A checkpoint written without the wrapper (no "ranks") counts as one process: a wrapped
    run of world size 1 resumes it (it raised KeyError: 'ranks') and ends with the parameters
    of the uninterrupted run, bit for bit (batch 8: the wrapper's scaling is exact)."""
    from minicnn.distributed import DistributedDataParallel
    rng = np.random.default_rng(2)
    data = ArrayDataset(rng.standard_normal((64, 1, 4, 4)), rng.integers(0, 3, 64))

    def run(wrap=False, stop=None, **kwargs):
        minicnn.seed(0)
        model = minicnn.Sequential(minicnn.Flatten(), minicnn.Linear(16, 8), minicnn.ReLU(),
                                   minicnn.Dropout(0.25), minicnn.Linear(8, 3))
        if wrap:
            model = DistributedDataParallel(model, CountingGroup())
        loss_fn = minicnn.CrossEntropyLoss()
        if stop is not None:
            loss_fn = _StopAfter(loss_fn, stop)
        loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(64, 1, 0, seed=1))
        try:
            history = minicnn.fit(model, loss_fn, minicnn.Adam(model.parameters(), lr=1e-2),
                                  loader, epochs=3, progress=False, verbose=False, **kwargs)
        except _Cut:
            return None, None
        return model.state_dict(), history

    want, want_history = run()
    ckpt = {"checkpoint_dir": tmp_path / "ckpt", "checkpoint_every": 3}
    assert run(stop=11, **ckpt) == (None, None)               # cut in epoch 2, after step 9's
    assert sorted(os.listdir(tmp_path / "ckpt"))[-1] == "checkpoint-000000009.npz"
    got, history = run(wrap=True, resume=True, **ckpt)
    for name, value in want.items():
        assert np.array_equal(got[name], value), name
    for row, expected in zip(history.epochs, want_history.epochs):
        assert row["train_loss"] == expected["train_loss"]


def test_selfcheck_refuses_more_images_than_the_sample_holds():
    from minicnn.distributed import selfcheck
    with pytest.raises(ValueError, match=r"100 steps at batch 64 need 6,400 images"):
        selfcheck.run("cpu", steps=100, batch=64)


# --- runs under mpiexec --------------------------------------------------------------------------

needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or _mpiexec() is None,
    reason='mpi4py or mpiexec is missing: pip install "minicnn[mpi]"')


def mpirun(n, args, cwd, timeout=120, **env):
    """``mpiexec -n n python tests/distributed_worker.py args``; the CompletedProcess."""
    environ = dict(os.environ, PYTHONPATH=str(ROOT), MINICNN_TUNE_PROCESS="0",
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **env)
    return subprocess.run([_mpiexec(), "-n", str(n), sys.executable, str(WORKER), *map(str, args)],
                          cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)


# w, n, per-process batch, epochs, drop_last: 20 steps each, the last batch of an epoch smaller
#   w=2: 151 samples, the odd one dropped: 75 each, batches 8 x 9 + 3, 10 steps an epoch
#   w=3: 100 samples padded to 102: 34 each, batches 8 x 4 + 2, 5 steps an epoch
CONFIGS = {2: (151, 8, 2, True), 3: (100, 8, 4, False)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """w -> (CompletedProcess, [each rank's report], [each rank's parameters], folder)."""
    found = {}

    def get(w):
        if w not in found:
            n, batch, epochs, drop_last = CONFIGS[w]
            out = tmp_path_factory.mktemp(f"w{w}")
            args = [out, "train", "--n", n, "--batch", batch, "--epochs", epochs,
                    "--checkpoint-dir", out / "ckpt"] + (["--drop-last"] if drop_last else [])
            done = mpirun(w, args, out)
            assert done.returncode == 0, done.stdout + done.stderr
            reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(w)]
            params = [dict(np.load(out / f"rank{r}.npz")) for r in range(w)]
            found[w] = (done, reports, params, out)
        return found[w]
    return get


class GlobalOrder:
    """The order of all w shards together (``global_indices``) as one process's sampler."""

    def __init__(self, sampler):
        self.sampler = sampler

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return self.sampler.total_size

    def __iter__(self):
        return iter(self.sampler.global_indices().tolist())


@pytest.fixture(scope="module")
def reference():
    """w -> (model, history) of one process at batch w*B over the shards' global order."""
    found = {}

    def get(w):
        if w not in found:
            n, batch, epochs, drop_last = CONFIGS[w]
            worker = _worker_module()
            model, optimizer, loss_fn, data, test = worker.build(n, seed=100)   # rank 0's init
            order = GlobalOrder(DistributedSampler(n, w, 0, seed=worker.SEED, drop_last=drop_last))
            history = minicnn.fit(model, loss_fn, optimizer,
                                  DataLoader(data, batch_size=w * batch, sampler=order),
                                  epochs=epochs, val_loader=DataLoader(test, batch_size=16),
                                  progress=False, verbose=False)
            assert optimizer.step_count == 20
            found[w] = (model, history, minicnn.evaluate(model, DataLoader(test, batch_size=16),
                                                         loss_fn))
            minicnn.set_default_dtype(np.float32)
        return found[w]
    return get


@needs_mpi
@pytest.mark.parametrize("w", [2, 3])
def test_w_processes_equal_one_process_at_w_times_the_batch(runs, reference, w):
    """float64, 20 Adam steps with uneven last batches (and padding for w=3, a dropped sample
    for w=2): rank 0's parameters within 1e-12 of the largest of the one-process run's, and
    every rank's the same bits."""
    _, reports, params, _ = runs(w)
    model, history, _ = reference(w)
    assert [r["steps"] for r in reports] == [20] * w
    ref = model.state_dict()
    scale = max(float(np.abs(v).max()) for v in ref.values())
    for name, value in ref.items():
        assert np.abs(params[0][name] - value).max() <= TOL * scale, name
        for r in range(1, w):
            assert np.array_equal(params[r][name], params[0][name]), (name, r)
    for row, want in zip(reports[0]["history"], history.epochs):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert row[key] == pytest.approx(want[key], rel=TOL, abs=TOL), key


@needs_mpi
@pytest.mark.parametrize("w", [2, 3])
def test_gradients_are_weighted_by_sample_counts(runs, w):
    """Processes with batches of 3, 5 (and 7) samples: the reduced gradient is the mean over
    all their samples (1e-12 of the largest), not the mean of the per-process means."""
    _, reports, _, _ = runs(w)
    assert reports[0]["weighted_mean_error"] <= TOL


@needs_mpi
def test_parameters_are_broadcast_from_rank_0_at_the_start(runs):
    for w in (2, 3):
        _, reports, _, _ = runs(w)
        before, after = reports[0]["before"], reports[0]["after"]
        assert len(set(before)) == w                   # each rank seeded its own initialisation
        assert after == [before[0]] * w


@needs_mpi
def test_only_rank_0_prints_and_shows_progress(runs):
    done, reports, _, _ = runs(2)
    assert done.stdout.count("epoch 1: train loss") == 1
    assert done.stdout.count("epoch 2: train loss") == 1
    assert reports[0]["bars"]["shown"] > 0
    assert reports[1]["bars"] == {"shown": 0, "hidden": reports[0]["bars"]["shown"] + 1}


@needs_mpi
@pytest.mark.parametrize("w", [2, 3])
def test_evaluation_is_summed_over_the_processes(runs, reference, w):
    """Each process evaluates its uneven share (90 images); every one reports the figures of
    the whole test set, those of one process evaluating it (1e-12)."""
    _, reports, _, _ = runs(w)
    _, _, want = reference(w)
    worker = _worker_module()
    for report in reports:
        assert report["evaluate"] == reports[0]["evaluate"]
        assert report["history"] == reports[0]["history"]
    assert reports[0]["evaluate"]["images"] == worker.N_TEST
    for key in ("loss", "accuracy"):
        assert reports[0]["evaluate"][key] == pytest.approx(want[key], rel=TOL, abs=TOL)


@needs_mpi
def test_a_stopped_run_resumes_bit_identically_on_every_process(runs, tmp_path):
    """2 processes, checkpoints every 4 steps written by rank 0; cut after step 13, then resumed
    from step 12's checkpoint: the parameters and history of the uninterrupted run, bit for bit."""
    _, reports, params, _ = runs(2)
    n, batch, epochs, _ = CONFIGS[2]
    args = [tmp_path, "train", "--n", n, "--batch", batch, "--epochs", epochs, "--drop-last",
            "--checkpoint-dir", tmp_path / "ckpt"]
    cut = mpirun(2, args + ["--stop-after", 13], tmp_path)
    assert cut.returncode == 0, cut.stderr
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["checkpoint-000000010.npz",
                                                     "checkpoint-000000012.npz"]
    resumed = mpirun(2, args + ["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("resuming from") == 1
    again = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        got = dict(np.load(tmp_path / f"rank{r}.npz"))
        for name, value in params[0].items():
            assert np.array_equal(got[name], value), (r, name)
        assert again[r]["history"] == reports[r]["history"]


@needs_mpi
def test_a_failing_process_ends_every_process(tmp_path):
    """Rank 1 raises in step 3 while rank 0 waits for it in the all-reduce: both end, non-zero,
    well within the timeout, and the output names the rank and the error."""
    done = mpirun(2, [tmp_path, "fail", "--fail-rank", 1, "--fail-at", 3], tmp_path, timeout=60)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "rank 1 of 2 failed" in output and "injected failure in step 3" in output


@needs_mpi
def test_the_example_trains_on_two_processes(tmp_path):
    """examples/mnist.py --distributed on the bundled sample (5,000 images; ~6 s): one process
    prints, both end with the same history."""
    done = mpirun(2, [tmp_path / "out", "example", "--distributed", "--epochs", "1",
                      "--no-progress", "--data-dir", tmp_path / "none"], tmp_path,
                  MINICNN_DATA="", XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("; 2 process(es)") == 1 and done.stdout.count("epoch 1:") == 1
    rows = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text())["history"][0]
            for r in range(2)]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert rows[0][key] == rows[1][key], key
    assert rows[0]["val_accuracy"] >= 0.8            # 0.875 measured (seed 0)


def test_selfcheck_at_world_size_1_without_mpiexec(tmp_path):
    """The one-command check meant for a GPU machine, here on the CPU: the wrapped steps equal
    the plain ones bit for bit (batch 64), with MPI as a singleton (or no MPI at all)."""
    done = subprocess.run([sys.executable, "-m", "minicnn.distributed", "selfcheck", "--device",
                           "cpu", "--steps", "3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT),
                                                OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bit-identical" in done.stdout and "OK" in done.stdout


def test_without_mpi4py_the_error_says_how_to_install_it(monkeypatch):
    from minicnn.distributed import comm
    monkeypatch.setitem(sys.modules, "mpi4py", None)       # import mpi4py raises ImportError
    monkeypatch.setattr(comm, "_group", None)
    with pytest.raises(ImportError, match=r'pip install "minicnn\[mpi\]"'):
        comm.init("cpu")
