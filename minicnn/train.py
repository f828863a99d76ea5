"""Training and evaluation loops with progress bars and a per-epoch history.

Loss and accuracy are summed on the model's device and read back once per ``log_every`` steps
and at the end of an epoch, so a GPU step never waits for the host (except for the one inf/NaN
flag a ``GradScaler`` reads per step in mixed precision).
"""
import contextlib
import os
import re
import time
import warnings

import numpy as np
from tqdm.auto import tqdm

from .amp import GradScaler, autocast
from .backend import get_array_module, get_rng_state, set_rng_state, to_numpy, tune_process
from .errors import CheckpointError


class History:
    """Per-epoch metrics of ``fit``: ``history.epochs`` is a list of dicts, ``history["val_accuracy"]``
    the list of one metric over the epochs."""

    def __init__(self):
        self.epochs = []

    def append(self, row):
        self.epochs.append(row)

    def __getitem__(self, key):
        return [row[key] for row in self.epochs if key in row]

    def __len__(self):
        return len(self.epochs)

    def __repr__(self):
        return f"History({self.epochs!r})"


class _Meter:
    """Sums of loss and correct predictions, kept on the model's device and added to in place
    (so a recorded CUDA graph adds to the same sums on every replay); read on demand. The
    caller counts the images, on the host."""

    def __init__(self, sums=None, count=0):
        self.sums = None        # [sum of loss * batch size, correct predictions], float64
        self.count = count
        self._start = sums      # host values to start from (a resumed epoch), set on first add

    def add(self, loss, logits, targets):
        xp = get_array_module(logits)
        if self.sums is None:
            self.sums = (xp.zeros(2, dtype=np.float64) if self._start is None
                         else xp.asarray(np.asarray(self._start, dtype=np.float64)))
        loss_sum, correct = self.sums[:1], self.sums[1:]      # views: the adds write in place
        if loss is not None:
            xp.add(loss_sum, loss * targets.shape[0], out=loss_sum)
        xp.add(correct, (logits.argmax(axis=1) == targets).sum(), out=correct)

    def read(self, group=None):
        """(mean loss, accuracy, images) as Python numbers: the one host sync. With ``group``
        (a distributed run's ``ProcessGroup``) over all its processes: every one gets the same."""
        loss, correct = self.host_sums()
        count = self.count
        if group is not None:
            loss, correct, count = group.sum([loss, correct, count])
            count = int(count)
        n = max(count, 1)
        return loss / n, correct / n, count

    def host_sums(self):
        """[loss sum, correct] as Python floats (a host sync)."""
        if self.sums is None:
            return [float(v) for v in (self._start if self._start is not None else (0.0, 0.0))]
        return [float(v) for v in to_numpy(self.sums)]


class _Checkpoints:
    """The training checkpoints of one folder: ``checkpoint-<global step>.npz``, the newest
    ``keep`` kept; each written atomically by ``minicnn.io.save``."""

    _NAME = re.compile(r"checkpoint-(\d+)\.npz")

    def __init__(self, directory, keep):
        self.directory = os.fspath(directory)
        self.keep = keep
        os.makedirs(self.directory, exist_ok=True)

    def listed(self):
        """Paths of the checkpoints in the folder, newest (highest step) first."""
        found = [(int(m.group(1)), name) for name in os.listdir(self.directory)
                 if (m := self._NAME.fullmatch(name))]
        return [os.path.join(self.directory, name) for _, name in sorted(found, reverse=True)]

    def write(self, global_step, model, optimizer, scheduler, scaler, training):
        from .io import save
        path = os.path.join(self.directory, f"checkpoint-{global_step:09d}.npz")
        save(model, path, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
             training=training)
        for old in self.listed()[self.keep:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
        # temporary files of writes that a crash interrupted
        for name in os.listdir(self.directory):
            if name.startswith(".checkpoint-") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))

    def restore(self, model, optimizer, scheduler, scaler):
        """Load the newest readable checkpoint; its training dict and path, or (None, None) when
        the folder holds none. An unreadable one is skipped with a warning naming it and the one
        used instead; CheckpointError when there are some and none is readable."""
        from .io import load, read_training
        failed = []
        for path in self.listed():
            try:
                training = read_training(path)
                _check_training(path, training)
                load(model, path, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            except CheckpointError as e:
                failed.append((path, e))
                continue
            for bad, e in failed:
                warnings.warn(f"fit: checkpoint {bad!r} is unreadable ({e}); resuming from "
                              f"the one before it, {path!r}", RuntimeWarning, stacklevel=3)
            return training, path
        if failed:
            raise CheckpointError("fit: resume=True found no readable checkpoint in "
                                  f"{self.directory!r}: " + "; ".join(str(e) for _, e in failed))
        return None, None


_TRAINING_KEYS = ("epoch", "step", "global_step", "rng", "meter", "history")


def _check_training(path, training):
    missing = [k for k in _TRAINING_KEYS if k not in training]
    if "order" not in training and training.get("step", 0) > 0:
        missing.append("order")
    if missing:
        raise CheckpointError(f"load: checkpoint {path!r} has a training position without "
                              f"the entries {missing}")


def _check_world(path, training, group):
    """A checkpoint resumes only in a run of as many processes as wrote it: each process's
    generator, running sums and share of the data were saved (``training["ranks"]``)."""
    saved = len(training["ranks"]) if "ranks" in training else 1
    size = 1 if group is None else group.size
    if saved != size:
        raise CheckpointError(f"fit: checkpoint {path!r} was written by a run of {saved} "
                              f"process(es); resume it with {saved}, not {size}")


def _set_epoch(loader, epoch):
    """Tell the loader's sampler the epoch (a ``DistributedSampler`` draws its order from it)."""
    set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)


def _check_finite(loader):
    """Refuse training data with NaN or inf: it would silently poison every weight."""
    images = getattr(getattr(loader, "dataset", None), "images", None)
    if images is None:
        return
    xp = get_array_module(images)
    finite = xp.isfinite(images.reshape(images.shape[0], -1)).all(axis=1)
    if not bool(finite.all()):
        bad = np.flatnonzero(~to_numpy(finite))
        raise ValueError(f"fit: the training data holds NaN or inf in {bad.size} samples "
                         f"(first indices {bad[:5].tolist()}); clean or drop them before training")


def _check_graphable(model, optimizer, scaler):
    """Raise, saying why, unless ``fit(cuda_graph=True)`` can record this training step."""
    from .layers import Dropout
    params = model.parameters()
    if not params or params[0].device != "cuda":
        where = params[0].device if params else "a model without parameters"
        raise ValueError(f"fit: cuda_graph=True needs the model on a CUDA device, got {where}")
    if not optimizer.capturable:
        raise ValueError(f"fit: cuda_graph=True needs a capturable optimizer, one that reads its "
                         f"step count and learning rate from device memory: "
                         f"minicnn.fused.FusedAdam or FusedAdamW, got {type(optimizer).__name__}")
    if scaler is not None:
        raise ValueError("fit: cuda_graph=True cannot record mixed precision: GradScaler decides "
                         "on the host whether to skip each step")
    if any(isinstance(m, Dropout) for _, m in model.named_modules()):
        raise ValueError("fit: cuda_graph=True cannot record Dropout: its masks come from the "
                         "host generator, and a graph would replay the same mask every step")


def evaluate(model, loader, loss_fn=None, progress=False, desc="eval"):
    """Run ``model`` in eval mode over ``loader``'s (x, y) batches.

    Returns {"loss": mean loss (only with ``loss_fn``), "accuracy": fraction correct,
    "images": count}. The model's train/eval mode is restored afterwards. A
    ``minicnn.distributed.DistributedDataParallel`` model sums loss, correct predictions and
    images over its processes (each evaluating its share of ``loader``): all get the same figures.
    """
    group = getattr(model, "process_group", None)
    progress = progress and (group is None or group.rank == 0)
    was_training = model.training
    model.eval()
    meter = _Meter()
    try:
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
            logits = model(x)
            meter.add(loss_fn(logits, y) if loss_fn is not None else None, logits, y)
            meter.count += y.shape[0]
    finally:
        model.train(was_training)
    loss, acc, images = meter.read(group)
    out = {"accuracy": acc, "images": images}
    if loss_fn is not None:
        out["loss"] = loss
    return out


def add_checkpoint_arguments(parser):
    """Add ``--checkpoint-dir DIR``, ``--checkpoint-every N`` and ``--resume`` to an argparse
    parser; ``checkpoint_options(parser, args)`` turns them into ``fit``'s keyword arguments."""
    parser.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                        help="write resumable checkpoints to DIR at every epoch's end "
                             "(the newest 2 kept)")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="also write one every N training steps (needs --checkpoint-dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --checkpoint-dir (fresh if "
                             "none); the result is the uninterrupted run's, bit for bit")


def checkpoint_options(parser, args):
    """``fit``'s checkpoint_dir, checkpoint_every and resume from ``add_checkpoint_arguments``'
    flags; exits through ``parser.error`` when --resume or --checkpoint-every come without
    --checkpoint-dir, or N is below 1."""
    if (args.resume or args.checkpoint_every is not None) and args.checkpoint_dir is None:
        parser.error("--resume and --checkpoint-every need --checkpoint-dir")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    return {"checkpoint_dir": args.checkpoint_dir, "checkpoint_every": args.checkpoint_every,
            "resume": args.resume}


def fit(model, loss_fn, optimizer, train_loader, epochs=1, val_loader=None, scheduler=None,
        scheduler_interval="epoch", progress=True, verbose=True, log_every=20, start_epoch=0,
        on_epoch_end=None, precision="fp32", scaler=None, cuda_graph=False, checkpoint_dir=None,
        checkpoint_every=None, keep_checkpoints=2, resume=False):
    """Train ``model`` for ``epochs`` passes over ``train_loader`` and return a ``History``.

    Each step: forward, loss, zero_grad, backward, optimizer step, on the model as given (fusing
    is the caller's: ``minicnn.fuse``). ``scheduler.step()`` runs after every epoch, or every
    batch with ``scheduler_interval="batch"``. Per-epoch rows hold train_loss, train_accuracy,
    seconds, images_per_s, elapsed, and with ``val_loader`` val_loss and val_accuracy; a progress
    bar refreshes every ``log_every`` steps; ``start_epoch`` numbers the epochs of a resumed run;
    ``on_epoch_end(row)`` runs after each epoch.

    ``precision="fp16"``: forward passes under ``autocast()``, the loss gradient scaled by
    ``scaler`` (a default ``GradScaler`` if None), steps with inf/NaN gradients skipped; rows
    also hold ``loss_scale``. ``cuda_graph=True`` (model on a GPU, fp32, a capturable optimizer
    such as ``minicnn.fused.FusedAdam``, no Dropout) records the step as a CUDA graph after a few
    eager steps and replays it for batches of the same shape (``minicnn.fused.graph``); its
    products run on minicnn's GEMM kernel, which CuPy can capture where it cannot capture cuBLAS.

    ``checkpoint_dir``: write a checkpoint there (atomically) every ``checkpoint_every`` steps
    and at every epoch's end, keeping the newest ``keep_checkpoints``; each holds the weights,
    optimizer, scheduler and scaler state, the epoch and step, the loader's order and the host
    generator's state. ``resume=True`` continues from the newest readable one (a bad one is
    skipped with a warning), or starts fresh, saying so, when there is none; the run then ends
    with the parameters an uninterrupted run of the same call ends with, bit for bit
    (docs/resuming.md). ``epochs`` counts from ``start_epoch`` either way.

    No step reads back from the device: loss and accuracy are summed there and read every
    ``log_every`` steps (for the progress bar, when ``progress``) and at the end of the epoch;
    a deferred target check runs at both (and raises there). Calls ``minicnn.tune_process()``
    first, which changes glibc's allocator for the whole process (``MINICNN_TUNE_PROCESS=0`` to
    opt out). docs/tutorial.md shows it at work.

    A ``minicnn.distributed.DistributedDataParallel`` model trains on every process of its group
    (docs/distributed.md): progress and messages come from rank 0 alone, loss, accuracy and
    images/s are summed over the processes (every one returns the same history), checkpoints are
    written by rank 0 and hold every process's generator and position, and the sampler of
    ``train_loader`` is told each epoch (``set_epoch``).
    """
    if scheduler_interval not in ("epoch", "batch"):
        raise ValueError(f"fit: scheduler_interval must be 'epoch' or 'batch', got {scheduler_interval!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"fit: precision must be 'fp32' or 'fp16', got {precision!r}")
    if scaler is not None and not isinstance(scaler, GradScaler):
        raise TypeError(f"fit: scaler must be a minicnn GradScaler or None, "
                        f"got {type(scaler).__name__}")
    if precision == "fp16" and scaler is None:
        scaler = GradScaler()
    group = getattr(model, "process_group", None)    # a DistributedDataParallel model's
    leader = group is None or group.rank == 0
    # the caller's flag, the same on every process: whether the log steps read the meter (an
    # all-reduce in a distributed run, so every process must take part or none)
    log_progress = bool(progress)
    progress, verbose = progress and leader, verbose and leader
    if cuda_graph and group is not None:
        raise ValueError("fit: cuda_graph=True cannot record the step of a "
                         "DistributedDataParallel model (its all-reduce is not recorded)")
    if cuda_graph:
        _check_graphable(model, optimizer, scaler)
    checkpoints = None
    if checkpoint_dir is not None:
        if not hasattr(train_loader, "iter_from"):
            raise TypeError(f"fit: checkpoint_dir needs a minicnn DataLoader (to resume within "
                            f"an epoch), got {type(train_loader).__name__}")
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or
                                             not isinstance(checkpoint_every, int)
                                             or checkpoint_every < 1):
            raise ValueError(f"fit: checkpoint_every must be a positive int or None, "
                             f"got {checkpoint_every!r}")
        if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) \
                or keep_checkpoints < 1:
            raise ValueError(f"fit: keep_checkpoints must be a positive int, "
                             f"got {keep_checkpoints!r}")
        if group is not None and not hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
            raise ValueError("fit: checkpoints of a distributed run need a training DataLoader "
                             "with a minicnn.distributed.DistributedSampler: a resumed process "
                             "draws its share of the epoch from it again")
        checkpoints = _Checkpoints(checkpoint_dir, keep_checkpoints)
    elif resume or checkpoint_every is not None:
        raise ValueError("fit: resume and checkpoint_every need checkpoint_dir")

    def forward_precision():
        return autocast() if precision == "fp16" else contextlib.nullcontext()

    _check_finite(train_loader)
    tune_process()
    history = History()
    meter = None
    last_epoch = start_epoch + epochs
    first_epoch, resumed = start_epoch + 1, None
    if resume:
        resumed, path = checkpoints.restore(model, optimizer, scheduler, scaler)
        if resumed is None:
            if verbose:
                tqdm.write(f"fit: no checkpoint in {checkpoints.directory!r}; starting fresh")
        else:
            _check_world(path, resumed, group)
            # this process's own generator, sums and order: a checkpoint of one process (no
            # "ranks") also resumes in a distributed run of world size 1
            own = resumed["ranks"][group.rank] if group is not None and "ranks" in resumed \
                else resumed
            set_rng_state(own["rng"])
            history.epochs = list(resumed["history"])
            first_epoch = resumed["epoch"] + (resumed["step"] >= len(train_loader))
            if verbose:
                tqdm.write(f"fit: resuming from {path!r}: epoch {resumed['epoch']}, "
                           f"step {resumed['step']}/{len(train_loader)}")
    global_step = 0 if resumed is None else resumed["global_step"]

    def training_state(epoch, step):
        meter_sums = meter.host_sums()
        state = {"epoch": epoch, "step": step, "global_step": global_step,
                 "rng": get_rng_state(), "meter": meter_sums + [meter.count],
                 "history": history.epochs}
        if train_loader.last_order is not None:
            state["order"] = np.asarray(train_loader.last_order)
        if group is not None:       # each process's own, on rank 0, which writes
            state["ranks"] = group.gather_object({"rng": state["rng"], "meter": state["meter"]})
        return state

    def train_step(x, y, graphed=False):
        """Forward, loss, backward and update, with nothing read back (graphed: ``prepare_step``
        already ran on the host)."""
        with forward_precision():
            logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad()
        if scaler is None:
            model.backward(loss_fn.backward(), input_grad=False)
            optimizer.apply_step() if graphed else optimizer.step()
        else:     # backward follows the forward's precision, recorded by each layer
            with np.errstate(over="ignore", invalid="ignore"):   # inf/NaN: a skipped step
                model.backward(scaler.scale(loss_fn.backward()), input_grad=False)
            scaler.step(optimizer)
            scaler.update()
        meter.add(loss, logits, y)

    def read_meter():
        if hasattr(loss_fn, "check"):
            loss_fn.check()
        return meter.read(group)

    graph = None
    if cuda_graph:
        from .fused.graph import GraphStep
        graph = GraphStep(lambda x, y: train_step(x, y, graphed=True), optimizer.prepare_step)
    first_step = time.perf_counter()
    for epoch in range(first_epoch, last_epoch + 1):
        model.train()
        _set_epoch(train_loader, epoch)
        start_step = 0
        if resumed is not None and resumed["epoch"] == epoch:     # within this epoch
            start_step = resumed["step"]
            meter = _Meter(own["meter"][:2], own["meter"][2])
            # the saved order is rank 0's; another process draws its own share from the sampler
            order = resumed["order"] if own is resumed else np.fromiter(
                train_loader.sampler, dtype=np.int64, count=len(train_loader.sampler))
            batches = train_loader.iter_from(order, start_step)
        elif meter is None or meter.sums is None or graph is None:
            meter = _Meter()
        else:       # the graph adds to the sums it was recorded with: zero them in place
            meter.sums[...] = 0
            meter.count = 0
        if start_step == 0:
            batches = iter(train_loader)
        t0 = time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch}/{last_epoch}", unit="batch", initial=start_step,
                   total=len(train_loader), disable=not progress, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar, start_step + 1):
            if graph is not None:
                graph(x, y)
            else:
                train_step(x, y)
            meter.count += y.shape[0]
            if scheduler is not None and scheduler_interval == "batch":
                scheduler.step()
            global_step += 1
            if checkpoints is not None and checkpoint_every is not None \
                    and global_step % checkpoint_every == 0 and step < len(train_loader):
                state = training_state(epoch, step)
                if leader:
                    checkpoints.write(global_step, model, optimizer, scheduler, scaler, state)
            if step % log_every == 0:
                if log_progress:        # summed over the processes for rank 0's bar
                    mean_loss, acc, images = read_meter()
                    bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{acc:.4f}",
                                    img_s=f"{images / (time.perf_counter() - t0):,.0f}")
                elif hasattr(loss_fn, "check"):     # no bar: only the deferred target check
                    loss_fn.check()
        train_loss, train_acc, images = read_meter()
        seconds = time.perf_counter() - t0
        bar.close()
        if scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
               "seconds": seconds, "images_per_s": images / seconds}
        if scaler is not None:
            row["loss_scale"] = scaler.get_scale()
        if val_loader is not None:
            with forward_precision():
                val = evaluate(model, val_loader, loss_fn, progress=progress, desc="test")
            row["val_loss"], row["val_accuracy"] = val["loss"], val["accuracy"]
        row["elapsed"] = time.perf_counter() - first_step
        history.append(row)
        if checkpoints is not None:
            state = training_state(epoch, len(train_loader))
            if leader:
                checkpoints.write(global_step, model, optimizer, scheduler, scaler, state)
        if verbose:
            msg = (f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f}, "
                   f"{row['images_per_s']:,.0f} images/s")
            if val_loader is not None:
                msg += f"; test loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
            tqdm.write(msg + f" ({row['elapsed']:.1f} s since the first step)")
        if on_epoch_end is not None:
            on_epoch_end(row)
    return history
