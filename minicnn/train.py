"""Training and evaluation loops with progress bars and a per-epoch history.

Loss and accuracy are summed on the model's device and read back once per ``log_every`` steps
and at the end of an epoch, so a GPU step never waits for the host (except for the one inf/NaN
flag a ``GradScaler`` reads per step in mixed precision).
"""
import contextlib
import time

import numpy as np
from tqdm.auto import tqdm

from .amp import GradScaler, autocast
from .backend import get_array_module, to_numpy, tune_process


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

    def __init__(self):
        self.sums = None        # [sum of loss * batch size, correct predictions], float64
        self.count = 0

    def add(self, loss, logits, targets):
        xp = get_array_module(logits)
        if self.sums is None:
            self.sums = xp.zeros(2, dtype=np.float64)
        loss_sum, correct = self.sums[:1], self.sums[1:]      # views: the adds write in place
        if loss is not None:
            xp.add(loss_sum, loss * targets.shape[0], out=loss_sum)
        xp.add(correct, (logits.argmax(axis=1) == targets).sum(), out=correct)

    def read(self):
        """(mean loss, accuracy) as Python floats: the one host sync."""
        n = max(self.count, 1)
        loss, correct = to_numpy(self.sums) if self.sums is not None else (0.0, 0.0)
        return float(loss) / n, float(correct) / n


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
    "images": count}. The model's train/eval mode is restored afterwards.
    """
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
    loss, acc = meter.read()
    out = {"accuracy": acc, "images": meter.count}
    if loss_fn is not None:
        out["loss"] = loss
    return out


def fit(model, loss_fn, optimizer, train_loader, epochs=1, val_loader=None, scheduler=None,
        scheduler_interval="epoch", progress=True, verbose=True, log_every=20, start_epoch=0,
        on_epoch_end=None, precision="fp32", scaler=None, cuda_graph=False):
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

    No step reads back from the device: loss and accuracy are summed there and read every
    ``log_every`` steps and at the end of the epoch (when a deferred target check raises). Calls
    ``minicnn.tune_process()`` first, which changes glibc's allocator for the whole process
    (``MINICNN_TUNE_PROCESS=0`` to opt out). docs/tutorial.md shows it at work.
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
    if cuda_graph:
        _check_graphable(model, optimizer, scaler)

    def forward_precision():
        return autocast() if precision == "fp16" else contextlib.nullcontext()

    _check_finite(train_loader)
    tune_process()
    history = History()
    meter = None

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
        return meter.read()

    graph = None
    if cuda_graph:
        from .fused.graph import GraphStep
        graph = GraphStep(lambda x, y: train_step(x, y, graphed=True), optimizer.prepare_step)
    first_step = time.perf_counter()
    for epoch in range(start_epoch + 1, start_epoch + epochs + 1):
        model.train()
        if meter is None or meter.sums is None or graph is None:
            meter = _Meter()
        else:       # the graph adds to the sums it was recorded with: zero them in place
            meter.sums[...] = 0
            meter.count = 0
        t0 = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{start_epoch + epochs}", unit="batch",
                   disable=not progress, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar, 1):
            if graph is not None:
                graph(x, y)
            else:
                train_step(x, y)
            meter.count += y.shape[0]
            if scheduler is not None and scheduler_interval == "batch":
                scheduler.step()
            if step % log_every == 0:
                mean_loss, acc = read_meter()
                bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{acc:.4f}",
                                img_s=f"{meter.count / (time.perf_counter() - t0):,.0f}")
        train_loss, train_acc = read_meter()
        seconds = time.perf_counter() - t0
        bar.close()
        if scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
               "seconds": seconds, "images_per_s": meter.count / seconds}
        if scaler is not None:
            row["loss_scale"] = scaler.get_scale()
        if val_loader is not None:
            with forward_precision():
                val = evaluate(model, val_loader, loss_fn, progress=progress, desc="test")
            row["val_loss"], row["val_accuracy"] = val["loss"], val["accuracy"]
        row["elapsed"] = time.perf_counter() - first_step
        history.append(row)
        if verbose:
            msg = (f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f}, "
                   f"{row['images_per_s']:,.0f} images/s")
            if val_loader is not None:
                msg += f"; test loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
            tqdm.write(msg + f" ({row['elapsed']:.1f} s since the first step)")
        if on_epoch_end is not None:
            on_epoch_end(row)
    return history
