"""Load weights saved from PyTorch (a ``state_dict``) into a minicnn model, without pickle.

Two formats are read:

- ``.safetensors`` (read here, no library needed)::

      8 bytes     N, the header's length, unsigned little-endian
      N bytes     JSON: {"<name>": {"dtype": "F32", "shape": [64, 3, 7, 7],
                                    "data_offsets": [begin, end]}, ..., "__metadata__": {...}}
      the rest    the byte buffer; each tensor's values lie row-major and little-endian in
                  buffer[begin:end]

  Written in PyTorch by ``safetensors.torch.save_file(model.state_dict(), "model.safetensors")``.
  dtypes F64, F32, F16 and BF16 (widened to float32), and I64, I32, I16, I8, U8, BOOL are read.
- ``.npz`` (``numpy.load(allow_pickle=False)``), one entry per state_dict name, written by
  ``numpy.savez("model.npz", **{k: v.numpy() for k, v in model.state_dict().items()})``.

PyTorch's ``.pt``/``.pth`` files are pickles, which can run code when loaded: they are refused.
"""
import io
import json
import math
import os
import struct
import zipfile
from collections import namedtuple

import numpy as np

from .errors import WeightsError
from .module import Module

__all__ = ["WeightsError", "IncompatibleKeys", "load_torch_weights", "read_weights"]

# safetensors dtype -> (NumPy dtype of the stored bytes, little-endian)
_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}
_MAX_HEADER = 100_000_000          # the safetensors format's own limit on the JSON header

# what numpy.load and zipfile raise on a truncated, corrupt or foreign .npz
_NPZ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError, struct.error,
               RuntimeError, OverflowError, NotImplementedError)

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
IncompatibleKeys.__doc__ = ("What ``load_torch_weights(strict=False)`` left out: the model's "
                            "names the file lacks, and the file's names the model lacks.")


_PICKLE_HINT = ("{path!r} looks like a PyTorch pickle (torch.save), which is not read "
                "(unpickling can run code); save the state_dict as .safetensors "
                "(safetensors.torch.save_file(model.state_dict(), path)) or as .npz")


def read_weights(path):
    """The arrays of a ``.safetensors`` or ``.npz`` file: a dict name -> NumPy array, in the
    file's order. BF16 is widened to float32. Raises ``WeightsError`` naming the file."""
    path = os.fspath(path)
    with open(path, "rb") as f:          # a missing file is a FileNotFoundError
        data = f.read()
    if path.endswith((".pt", ".pth", ".pkl", ".ckpt")):
        raise WeightsError(_PICKLE_HINT.format(path=path))
    if data[:4] == b"PK\x03\x04" or path.endswith(".npz"):
        return _read_npz(path, data)
    return _read_safetensors(path, data)


def _read_npz(path, data):
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise WeightsError(f"{path!r} is a single .npy array, not an .npz archive of named "
                               "arrays")
        with npz:
            if any(key.endswith("data.pkl") for key in npz.files):
                raise WeightsError(_PICKLE_HINT.format(path=path))
            arrays = {key: npz[key] for key in npz.files}
        for key, value in arrays.items():
            if not isinstance(value, np.ndarray):
                raise WeightsError(f"{path!r} is a zip archive but its entry {key!r} is not a "
                                   ".npy array: not an .npz of named arrays")
        return arrays
    except WeightsError:
        raise
    except _NPZ_ERRORS as e:
        raise WeightsError(f"{path!r} is not a readable .npz archive (truncated or corrupt, or "
                           f"it holds Python objects): {type(e).__name__}: {e}") from None


def _read_safetensors(path, data):
    def fail(problem):
        return WeightsError(f"{path!r} is not a valid .safetensors file: {problem}")

    if len(data) < 8:
        raise fail(f"it has {len(data)} bytes, fewer than the 8 of the header length (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER:
        raise fail(f"its header length {n} is implausible (corrupt, or not a safetensors file"
                   + ("; a PyTorch pickle?)" if data[:1] == b"\x80" else ")"))
    if 8 + n > len(data):
        raise fail(f"its header says {n} bytes but only {len(data) - 8} follow (truncated?)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(f"its header is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise fail(f"its header is a JSON {type(header).__name__}, not an object")
    buffer = memoryview(data)[8 + n:]
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise fail(f"the header entry of '{name}' lacks dtype, shape or a pair of "
                       f"data_offsets: {entry!r}") from None
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise fail(f"'{name}' has dtype {dtype_name!r}, which is not supported (supported: "
                       f"{', '.join(_SAFETENSORS_DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise fail(f"'{name}' has shape {shape!r}, not a list of non-negative ints")
        if not all(isinstance(o, int) for o in (begin, end)) or not 0 <= begin <= end:
            raise fail(f"'{name}' has data_offsets {[begin, end]!r}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise fail(f"'{name}' is {dtype_name}{shape} ({nbytes} bytes) but its data_offsets "
                       f"span {end - begin} bytes")
        if end > len(buffer):
            raise fail(f"'{name}' ends at byte {end} of the data but the data has only "
                       f"{len(buffer)} bytes (truncated?)")
        value = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape)
        if dtype_name == "BF16":      # bfloat16 is the top half of a float32
            value = (value.astype(np.uint32) << 16).view(np.float32)
        arrays[name] = value.astype(value.dtype.newbyteorder("="), copy=False)
    return arrays


def load_torch_weights(model, path, strict=True, rename=None):
    """Load a PyTorch state_dict saved as ``.safetensors`` or ``.npz`` into ``model``, by name.

    ``rename``: a callable applied to every name in the file (for instance
    ``lambda k: k.removeprefix("module.")`` for a DataParallel checkpoint); returning None drops
    that entry. Names must then equal the model's ``state_dict`` names and shapes must match.
    ``num_batches_tracked`` entries are forgiven both ways: one missing from the file keeps the
    model's value, one the model has no place for (no running statistics) is ignored.

    With ``strict=True`` (the default) any other missing or unexpected name raises; with
    ``strict=False`` they are skipped and returned. Everything is checked before the model is
    touched: on any error, ``WeightsError`` (a ValueError naming the file) is raised and the model
    is unchanged. Values are converted to each parameter's dtype and device.

    Returns ``IncompatibleKeys(missing_keys, unexpected_keys)``, as PyTorch's load_state_dict.
    """
    if not isinstance(model, Module):
        raise TypeError(f"load_torch_weights: model must be a minicnn Module, got "
                        f"{type(model).__name__}")
    if rename is not None and not callable(rename):
        raise TypeError(f"load_torch_weights: rename must be a callable or None, got "
                        f"{type(rename).__name__}")
    path = os.fspath(path)
    arrays = read_weights(path)

    def fail(problem):
        return WeightsError(f"load_torch_weights: {path!r} does not fit {type(model).__name__}: "
                            f"{problem}")

    state = {}
    for name, value in arrays.items():
        new = name if rename is None else rename(name)
        if new is None:
            continue
        if not isinstance(new, str):
            raise TypeError(f"load_torch_weights: rename({name!r}) returned "
                            f"{type(new).__name__}, expected a str or None")
        if new in state:
            raise fail(f"two entries are named {new!r} after rename")
        state[new] = value

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    for k in [k for k in missing if _is_counter(k)]:
        missing.remove(k)
        state[k] = own[k]                 # keep the model's count
    for k in [k for k in unexpected if _is_counter(k)]:
        unexpected.remove(k)
        del state[k]
    if strict and (missing or unexpected):
        raise fail(f"missing keys {missing}, unexpected keys {unexpected}"
                   + ("" if rename is not None else " (pass rename= to map the file's names)"))
    for k in unexpected:
        del state[k]
    for name, value in state.items():
        if _is_counter(name) and value.size == 1:
            value = state[name] = value.reshape(own[name].shape)   # older PyTorch: shape (1,)
        if tuple(value.shape) != tuple(own[name].shape):
            raise fail(f"'{name}' has shape {tuple(value.shape)} in the file, "
                       f"{tuple(own[name].shape)} in the model")
        if value.dtype.kind not in "fiu":
            raise fail(f"'{name}' has dtype {value.dtype}, not a number")
    model.load_state_dict(state, strict=False)
    return IncompatibleKeys(missing, unexpected)


def _is_counter(name):
    return name == "num_batches_tracked" or name.endswith(".num_batches_tracked")
