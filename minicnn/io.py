"""Checkpoints: one ``.npz`` file, readable without pickle, written atomically.

Entries of the file (an uncompressed zip written by ``numpy.savez``)::

    model/<name>      each parameter's values, e.g. "model/0.weight"
    optim/<i>.<buf>   the optimizer's state buffers, e.g. "optim/0.exp_avg" (when saved)
    train/<key>       arrays of the training position, e.g. "train/order" (when saved)
    __meta__          uint8 array of UTF-8 JSON: format and minicnn versions, the model's class and
                      parameter names/shapes/dtypes, the optimizer's type/hyper-parameters/step and
                      buffer names, the scheduler's and GradScaler's state, the training position
                      (``training=``: epoch, step, generator state, ...), the user's metadata

Format version 2 added the GradScaler's state and the training position. A version 1 file still
loads (weights, optimizer, scheduler); resuming training from it raises ``CheckpointError``.

``load`` checks the whole file against the model (and optimizer, scheduler) before changing
anything, and turns every problem into a ``CheckpointError`` that names the file.

Weights saved by PyTorch (.safetensors or .npz) load with ``load_torch_weights``, kept in
``minicnn/weights.py`` and re-exported here.
"""
import contextlib
import copy
import json
import os
import struct
import sys
import tempfile
import zipfile

import numpy as np

from .amp import GradScaler
from .errors import CheckpointError
from .lr_scheduler import LRScheduler
from .module import Module
from .optim import Optimizer
from .weights import WeightsError, load_torch_weights  # noqa: F401  (public here too)

FORMAT = "minicnn-checkpoint"
FORMAT_VERSION = 2
TRAINING_FORMAT_VERSION = 2       # the first version that holds the training position

# what a truncated, corrupt or foreign file can raise inside numpy.load and zipfile; RuntimeError
# covers a flipped bit read as "encrypted" or (NotImplementedError) as an unknown compression
_READ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError, struct.error,
                RuntimeError, OverflowError)


def save(model, path, optimizer=None, scheduler=None, metadata=None, scaler=None, training=None):
    """Write ``model``'s parameters to ``path``, with the optimizer's, scheduler's and
    GradScaler's state and a JSON-able ``metadata`` dict when given.

    ``training`` (used by ``fit`` to resume) is a dict of JSON-able values and NumPy arrays;
    ``read_training`` returns it.

    ``path`` is used exactly as given (no ".npz" is appended). The write is atomic: a crash or
    an error leaves the previous file at ``path`` (if any) untouched and no temporary file.
    """
    _check_arg("model", model, Module)
    _check_arg("optimizer", optimizer, Optimizer, optional=True)
    _check_arg("scheduler", scheduler, LRScheduler, optional=True)
    _check_arg("scaler", scaler, GradScaler, optional=True)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"save: metadata must be a dict, got {type(metadata).__name__}")
    if training is not None and not isinstance(training, dict):
        raise TypeError(f"save: training must be a dict, got {type(training).__name__}")
    path = os.fspath(path)

    state = model.state_dict()
    arrays = {f"model/{name}": value for name, value in state.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "minicnn_version": getattr(sys.modules[__package__], "__version__", "unknown"),
        "model": {"class": type(model).__name__,
                  "parameters": [{"name": name, "shape": list(value.shape),
                                  "dtype": str(value.dtype)} for name, value in state.items()]},
        "optimizer": None,
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "training": None,
        "metadata": metadata or {},
    }
    if training is not None:
        values = {k: v for k, v in training.items() if not isinstance(v, np.ndarray)}
        train_arrays = {k: v for k, v in training.items() if isinstance(v, np.ndarray)}
        arrays.update((f"train/{key}", value) for key, value in train_arrays.items())
        meta["training"] = {"values": values, "arrays": list(train_arrays)}
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        buffers = opt_state.pop("buffers")
        arrays.update((f"optim/{key}", value) for key, value in buffers.items())
        meta["optimizer"] = dict(opt_state, buffers=list(buffers))
    try:
        text = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save: metadata must be JSON-serializable (dict, list, str, number, "
                        f"bool, None): {e}") from None
    arrays["__meta__"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    # a file object, not a name: np.savez would append ".npz" to a name
    write_atomic(path, lambda f: np.savez(f, **arrays))


def load(model, path, optimizer=None, scheduler=None, scaler=None):
    """Load a checkpoint written by ``save`` into ``model`` (and ``optimizer``, ``scheduler``,
    ``scaler`` when given); returns the user metadata dict.

    Strict: parameter names and shapes must match the model exactly, and an optimizer or
    scheduler asked for must have its state in the file. Any problem, including a truncated or
    corrupt file, raises ``CheckpointError`` before anything is modified. Values keep each
    parameter's device and dtype.
    """
    _check_arg("model", model, Module)
    _check_arg("optimizer", optimizer, Optimizer, optional=True)
    _check_arg("scheduler", scheduler, LRScheduler, optional=True)
    _check_arg("scaler", scaler, GradScaler, optional=True)
    path = os.fspath(path)
    meta, arrays = _read(path)

    def fail(problem):
        return CheckpointError(f"load: checkpoint {path!r} {problem}")

    # the header and the arrays must agree, or the file was not written by save
    try:
        params = {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in meta["model"]["parameters"]}
        saved_class = meta["model"]["class"]
        opt_meta, sched_state, user = meta["optimizer"], meta["scheduler"], meta["metadata"]
        buffer_keys = [] if opt_meta is None else list(opt_meta["buffers"])
        scaler_state = meta.get("scaler")
        train_keys = list((meta.get("training") or {"arrays": []})["arrays"])
    except (KeyError, TypeError) as e:
        raise fail(f"has a malformed header ({type(e).__name__}: {e})") from None
    expected = ({f"model/{n}" for n in params} | {f"optim/{k}" for k in buffer_keys}
                | {f"train/{k}" for k in train_keys})
    if set(arrays) != expected:
        raise fail(f"is inconsistent: entries missing {sorted(expected - set(arrays))}, "
                   f"unexpected {sorted(set(arrays) - expected)}")
    for name, (shape, dtype) in params.items():
        value = arrays[f"model/{name}"]
        if value.shape != shape or str(value.dtype) != dtype:
            raise fail(f"is inconsistent: '{name}' is {value.dtype}{list(value.shape)}, "
                       f"its header says {dtype}{list(shape)}")

    own = dict(model._named_state())          # parameters and buffers, as state_dict() has them
    missing = [n for n in own if n not in params]
    unexpected = [n for n in params if n not in own]
    if missing or unexpected:
        raise fail(f"does not fit {type(model).__name__} (it was saved from {saved_class}): "
                   f"missing entries {missing}, unexpected entries {unexpected}")
    for name, p in own.items():
        if params[name][0] != tuple(p.shape):
            raise fail(f"does not fit {type(model).__name__} (it was saved from {saved_class}): "
                       f"'{name}' has shape {params[name][0]} in the checkpoint, "
                       f"{tuple(p.shape)} in the model")

    if optimizer is not None:
        if opt_meta is None:
            raise fail("holds no optimizer state (it was saved without optimizer=); "
                       "load it without optimizer= or save one with it")
        opt_state = dict(opt_meta, buffers={k: arrays[f"optim/{k}"] for k in buffer_keys})
        _check_state(fail, "optimizer", optimizer, opt_state)
    if scheduler is not None:
        if sched_state is None:
            raise fail("holds no scheduler state (it was saved without scheduler=); "
                       "load it without scheduler= or save one with it")
        _check_state(fail, "scheduler", scheduler, sched_state)
    if scaler is not None:
        if scaler_state is None:
            raise fail(f"holds no GradScaler state (format version {meta['format_version']}; "
                       f"version {TRAINING_FORMAT_VERSION} saves it when save has scaler=)")
        probe = copy.deepcopy(scaler)      # GradScaler has no check_state_dict: try it on a copy
        try:
            probe.load_state_dict(scaler_state)
        except (TypeError, ValueError, RuntimeError) as e:
            raise fail(f"has GradScaler state that does not fit: {e}") from None

    model.load_state_dict({name: arrays[f"model/{name}"] for name in params})
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    if scaler is not None:
        scaler.load_state_dict(scaler_state)
    return user


def read_training(path):
    """The ``training=`` dict that ``save`` wrote to ``path`` (arrays as NumPy arrays).

    Raises ``CheckpointError`` when the file is unreadable, of a format version without a
    training position (1), or saved without ``training=``.
    """
    path = os.fspath(path)
    meta, arrays = _read(path)
    version = meta["format_version"]
    if version < TRAINING_FORMAT_VERSION:
        raise CheckpointError(f"load: checkpoint {path!r} has format version {version}, which "
                              f"holds no training position; resuming needs version "
                              f"{TRAINING_FORMAT_VERSION} (its weights still load with load())")
    training = meta.get("training")
    try:
        if training is None:
            raise CheckpointError(f"load: checkpoint {path!r} holds no training position (it was "
                                  "saved without training=, not by fit's checkpoint_dir)")
        out = dict(training["values"])
        out.update((k, arrays[f"train/{k}"]) for k in training["arrays"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"load: checkpoint {path!r} has a malformed training header "
                              f"({type(e).__name__}: {e})") from None
    return out


# --- helpers -------------------------------------------------------------------------------------

def _check_arg(name, value, cls, optional=False):
    if not (isinstance(value, cls) or (optional and value is None)):
        raise TypeError(f"{name} must be a minicnn {cls.__name__}"
                        f"{' or None' if optional else ''}, got {type(value).__name__}")


def _check_state(fail, what, obj, state):
    try:
        obj.check_state_dict(state)
    except (TypeError, ValueError) as e:
        raise fail(f"has {what} state that does not fit {type(obj).__name__}: {e}") from None


def write_atomic(path, data):
    """Write ``data`` to ``path`` through a temporary file beside it, fsync, then a rename over
    ``path``: a reader or a crash sees the old file or the new one, never part of one.

    ``data``: bytes, a str (written as UTF-8), or a function that writes to the binary file
    object it is given. The file gets the mode ``open()`` would give it.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist")
    tmp = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{os.path.basename(path)}.",
                                      suffix=".tmp", delete=False)
    try:
        with tmp:
            if callable(data):
                data(tmp)
            else:
                tmp.write(data.encode("utf-8") if isinstance(data, str) else data)
            tmp.flush()
            os.fsync(tmp.fileno())
        # temporary files are made private (0600); give the file the mode open() would
        os.chmod(tmp.name, 0o666 & ~_umask())
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp.name)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read(path):
    """(header dict, name -> array) of the checkpoint at ``path``; CheckpointError if unreadable."""
    # opened here so that a missing file is a FileNotFoundError, not a corrupt checkpoint
    with open(path, "rb") as f:
        try:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise CheckpointError(f"load: {path!r} is a single .npy array, not a minicnn "
                                      "checkpoint (.npz archive)")
            with npz:
                arrays = {key: npz[key] for key in npz.files}
            raw = arrays.pop("__meta__", None)
            if raw is None:
                raise CheckpointError(f"load: {path!r} has no '__meta__' entry: it is an .npz "
                                      "archive but not a minicnn checkpoint")
            meta = json.loads(raw.tobytes().decode("utf-8"))
        except CheckpointError:
            raise
        except _READ_ERRORS as e:
            raise CheckpointError(f"load: {path!r} is not a readable minicnn checkpoint "
                                  f"(truncated or corrupt?): {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"load: {path!r} is an .npz archive but not a minicnn checkpoint "
                              f"(its header's format is not {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"load: {path!r} has checkpoint format version {version!r}; this "
                              f"minicnn reads versions up to {FORMAT_VERSION} (upgrade minicnn)")
    return meta, arrays
