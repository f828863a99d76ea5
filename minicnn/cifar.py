"""CIFAR-10: the official batch files (binary or Python version), read without running pickle.

Alex Krizhevsky publishes CIFAR-10 in two forms (https://www.cs.toronto.edu/~kriz/cifar.html):

``cifar-10-binary.tar.gz`` -> ``cifar-10-batches-bin/``
    ``data_batch_1.bin`` ... ``data_batch_5.bin``, ``test_batch.bin``: 10,000 records each of
    1 label byte (0..9) and 3,072 pixel bytes (the red plane, then green, then blue, each 32 x 32
    row-major). No pickle at all: this is the format looked for first.
``cifar-10-python.tar.gz`` -> ``cifar-10-batches-py/``
    ``data_batch_1`` ... ``data_batch_5``, ``test_batch``: Python 2 pickles of a dict with
    ``b"data"`` (a NumPy uint8 array of 10,000 x 3,072, same layout), ``b"labels"`` (a list of
    ints), ``b"batch_label"`` and ``b"filenames"``.

``pickle.load`` on a downloaded file can run any code the file names. These pickles are read by
an unpickler whose ``find_class`` refuses every global except the handful that spell out a uint8
array and a bytes object, and even those are never resolved to the real functions: each is
replaced by a stand-in here that can only build a uint8 array or a bytes object (see
``_SAFE_GLOBALS``). A pickle naming anything else (``os.system``, a class, ``eval``) is rejected
with ``CIFARFormatError`` before anything of it runs.
"""
import gzip
import io
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from .backend import get_default_dtype
from .data import ArrayDataset, DatasetUnavailable, _download, _user_cache
from .errors import CIFARFormatError

# Per-channel (R, G, B) mean and standard deviation of the 50,000 CIFAR-10 training images scaled
# to [0, 1], each over all 50,000 x 32 x 32 pixels of its channel: the population std of the
# training set. (The often-quoted (0.2023, 0.1994, 0.2010) is the mean of per-image stds, a
# different and smaller quantity.)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_PIXELS = 3 * 32 * 32          # bytes of one image: R plane, G plane, B plane
_RECORD = 1 + _PIXELS          # one record of the binary version: label byte + pixels
_FOLDERS = {"binary": "cifar-10-batches-bin", "python": "cifar-10-batches-py"}
_ARCHIVES = {"binary": "cifar-10-binary.tar.gz", "python": "cifar-10-python.tar.gz"}


# --- the binary version ------------------------------------------------------------------------

def _read_binary(path, records):
    """uint8 images (N, 3, 32, 32) and labels (N,) of one ``*.bin`` batch file."""
    size = path.stat().st_size
    if size % _RECORD:
        raise CIFARFormatError(
            f"read_cifar_batch: {path}: expected records of {_RECORD} bytes (1 label byte + "
            f"{_PIXELS} pixel bytes), got a file of {size} bytes, {size % _RECORD} bytes past "
            f"the last whole record (truncated, or not a CIFAR-10 binary batch)")
    n = size // _RECORD
    if records is not None and n != records:
        raise CIFARFormatError(f"read_cifar_batch: {path}: expected {records} records of "
                               f"{_RECORD} bytes, got {n} (truncated or overlong file)")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size != size:  # the file changed under us
        raise CIFARFormatError(f"read_cifar_batch: {path}: expected {size} bytes, "
                               f"read {data.size}")
    data = data.reshape(n, _RECORD)
    return data[:, 1:].reshape(n, 3, 32, 32), data[:, 0].copy()


# --- the Python version, without running pickle -----------------------------------------------

class _Refused(pickle.UnpicklingError):
    """A pickle asking for something the safe reader does not do."""


class _StandIn:
    """A callable that a pickle may name in place of a real global; it can do nothing else.

    No ``__dict__`` and no settable attributes, so a BUILD opcode aimed at it fails instead of
    changing this module's objects for later loads.
    """

    __slots__ = ("_fn", "_name")

    def __init__(self, fn, name):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args):
        return self._fn(*args)

    def __setattr__(self, key, value):
        raise _Refused(f"refused to set {key!r} on {self._name}")

    def __repr__(self):
        return f"<stand-in for {self._name}>"


class _DType:
    """What the ``numpy.dtype`` stand-in makes: a uint8 dtype, the only one accepted."""

    __slots__ = ()

    def __setstate__(self, state):
        pass  # (version, byte order, ...): meaningless for single bytes


class _Array:
    """What ``_reconstruct`` makes; the BUILD opcode that follows fills ``self.array``."""

    __slots__ = ("array",)

    def __init__(self, array=None):
        self.array = array

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused(f"expected an ndarray state (version, shape, dtype, fortran, data), "
                           f"got {type(state).__name__}")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _uint8_array(raw, dtype, shape, "F" if fortran else "C")


def _uint8_array(raw, dtype, shape, order):
    if not isinstance(dtype, _DType):
        raise _Refused(f"expected a uint8 dtype, got {type(dtype).__name__}")
    if isinstance(raw, str):
        raw = raw.encode("latin1")  # raw data unpickled as text
    if not isinstance(raw, (bytes, bytearray)):
        raise _Refused(f"expected array data as bytes, got {type(raw).__name__}")
    if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
        raise _Refused(f"expected an array shape of non-negative ints, got {shape!r}")
    if len(raw) != math.prod(shape):
        raise _Refused(f"expected {math.prod(shape)} bytes of uint8 data for shape {shape}, "
                       f"got {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape, order=order)


def _ndarray(*args):
    raise _Refused("refused to call numpy.ndarray (only _reconstruct may name it)")


def _dtype(name, align=False, copy=True):
    if isinstance(name, bytes):
        name = name.decode("latin1")
    if name not in ("u1", "|u1", "uint8", "B"):
        raise _Refused(f"refused numpy.dtype({name!r}): expected uint8 ('u1'), the only array "
                       f"dtype of a CIFAR-10 batch")
    return _DType()


def _reconstruct(cls, shape, typecode):
    if cls is not _SAFE_GLOBALS["numpy", "ndarray"]:
        raise _Refused("refused numpy.core.multiarray._reconstruct of anything but an ndarray")
    return _Array()


def _frombuffer(buf, dtype, shape, order):
    """Stands in for ``numpy._core.numeric._frombuffer`` (arrays in protocol-5 pickles)."""
    if not isinstance(order, str) or order not in ("C", "F"):
        raise _Refused(f"expected array order 'C' or 'F', got {order!r}")
    return _Array(_uint8_array(buf, dtype, shape, order))


def _encode(text, encoding="utf-8"):
    """Stands in for ``_codecs.encode``: how Python 3 writes bytes into a protocol-2 pickle."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"refused _codecs.encode of {type(text).__name__} with "
                       f"{encoding!r}: expected str and 'latin1'")
    return text.encode("latin1")


def _bytes(*args):
    """Stands in for ``bytes``: how Python 3 writes b'' into a protocol-2 pickle."""
    if args:
        raise _Refused("refused bytes(...) with arguments: only bytes() (b'') is expected")
    return b""


# The only globals a pickle may name, each mapped to a stand-in above (never to the real object).
_SAFE_GLOBALS = {key: _StandIn(fn, ".".join(key)) for key, fn in {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    ("__builtin__", "bytes"): _bytes,
    ("builtins", "bytes"): _bytes,
}.items()}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[module, name]
        except KeyError:
            raise _Refused(f"refused to load the global {module}.{name}: a CIFAR-10 batch holds "
                           f"only a dict of bytes, ints and a uint8 array, and a pickle naming "
                           f"other globals could run code") from None

    def persistent_load(self, pid):
        raise _Refused("refused a persistent id: a CIFAR-10 batch has none")


def _get(d, key):
    return d[key.encode()] if key.encode() in d else d.get(key)


def _read_python(path, records):
    """uint8 images (N, 3, 32, 32) and labels (N,) of one pickled batch, read safely."""
    def fail(problem):
        return CIFARFormatError(f"read_cifar_batch: {path}: {problem}")

    # From memory (a batch is ~31 MB): a corrupt length field then fails at the end of the bytes
    # instead of making the file reader allocate what it claims.
    f = io.BytesIO(path.read_bytes())
    try:
        batch = _SafeUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise fail(f"not loaded: {e}") from None
    # A truncated or corrupt pickle fails in many ways (UnpicklingError, EOFError, KeyError for a
    # bad memo index, ValueError, TypeError, ...): each means the same thing here.
    except Exception as e:
        raise fail(f"expected a complete pickled CIFAR-10 batch, got a truncated or corrupt one "
                   f"({type(e).__name__}: {e})") from None
    if f.read(1):
        raise fail("expected the file to end after the pickle, got more data")
    if not isinstance(batch, dict):
        raise fail(f"expected a pickled dict, got {type(batch).__name__}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        raise fail(f"expected a dict with b'data' and b'labels', "
                   f"got keys {sorted(map(repr, batch))}")
    if isinstance(data, _Array):
        data = data.array
    elif isinstance(data, (bytes, bytearray)) and len(data) % _PIXELS == 0:
        data = np.frombuffer(data, dtype=np.uint8).reshape(-1, _PIXELS)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != _PIXELS:
        got = f"shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise fail(f"expected b'data' a uint8 array of shape (N, {_PIXELS}), got {got}")
    n = len(data)
    if records is not None and n != records:
        raise fail(f"expected {records} records, got {n}")
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise fail("expected b'labels' a list of ints")
    if len(labels) != n:
        raise fail(f"expected {n} labels (one per image), got {len(labels)}")
    if labels and not 0 <= min(labels) <= max(labels) <= 9:
        raise fail(f"expected labels in 0..9, got values from {min(labels)} to {max(labels)}")
    return data.reshape(n, 3, 32, 32), np.asarray(labels, dtype=np.uint8).reshape(n)


def read_cifar_batch(path, records=None):
    """Read one CIFAR-10 batch file: uint8 images (N, 3, 32, 32) (R, G, B planes) and labels (N,).

    The format is told by content: a binary batch (``*.bin``) starts with a label byte 0..9, a
    pickled one (Python version) with a pickle opcode. Pickles are read with a restricted
    unpickler that runs no code (see the module docstring). With ``records``, the file must hold
    exactly that many images. Returns new writeable C-contiguous arrays. Raises ``CIFARFormatError`` naming the file for a truncated,
    overlong or corrupt file, a record size that is not 3,073 bytes, labels outside 0..9, or a
    pickle naming a global that a CIFAR-10 batch does not use.
    """
    path = Path(path)
    with open(path, "rb") as f:
        first = f.read(1)
    if not first:
        raise CIFARFormatError(f"read_cifar_batch: {path}: expected a CIFAR-10 batch, "
                               f"got an empty file")
    if first[0] > 9:
        images, labels = _read_python(path, records)
        return np.array(images, order="C"), labels
    images, labels = _read_binary(path, records)
    if labels.size and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise CIFARFormatError(f"read_cifar_batch: {path}: expected label bytes in 0..9, got "
                               f"{labels[bad]} in record {bad} (a CIFAR-100 file, or corrupt)")
    return np.array(images, order="C"), labels


# --- archives ----------------------------------------------------------------------------------

def _member_problem(m):
    """Why tar member ``m`` must not be unpacked, or None."""
    name = m.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "a '..' component"
    if m.issym() or m.islnk():
        return f"a link (to {m.linkname!r})"
    if not (m.isfile() or m.isdir()):
        return "a device, fifo or other special file"
    return None


def extract_cifar_archive(archive, dest, top):
    """Unpack the regular files in folder ``top`` of the .tar.gz ``archive`` into ``dest/top``.

    Every member is checked first: an absolute path, a '..' component, a link or a special
    file rejects the whole archive. Only files directly in ``top/`` are written, and only
    under the fixed folder ``dest/top``. Files are unpacked into a temporary folder in ``dest``
    and moved into place at the end, so a corrupt or truncated archive leaves nothing behind.
    Returns ``dest/top``. Raises ``CIFARFormatError`` naming the archive.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{top}.", suffix=".part"))
    try:
        try:
            # Stream mode: one pass over the compressed data, each member checked before it is read.
            with tarfile.open(archive, "r|*") as tar:
                for m in tar:
                    problem = _member_problem(m)
                    if problem is not None:
                        raise CIFARFormatError(
                            f"extract: {archive}: refused member {m.name!r}: {problem} could "
                            f"write outside the destination (not an official CIFAR-10 archive)")
                    parts = PurePosixPath(m.name).parts
                    if m.isfile() and len(parts) == 2 and parts[0] == top:
                        with tar.extractfile(m) as src, open(tmp / parts[1], "wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
                        os.chmod(tmp / parts[1], 0o644)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CIFARFormatError(
                f"extract: {archive}: expected a complete .tar.gz archive, got a truncated or "
                f"corrupt one ({type(e).__name__}: {e})") from None
        final = dest / top
        os.chmod(tmp, 0o755)  # mkdtemp makes folders private; a data folder is often shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # A folder with some of the files (a partial copy, or another process unpacking the
            # same archive): complete it file by file, each file replaced whole.
            for f in tmp.iterdir():
                os.replace(f, final / f.name)
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# --- the dataset -------------------------------------------------------------------------------

def _to_float(images, normalize):
    """uint8 (N, 3, 32, 32) -> the default dtype, scaled to [0, 1], standardised per channel."""
    dtype = get_default_dtype()
    # float16 arithmetic would round the standardised values twice; compute in at least float32.
    work = np.promote_types(dtype, np.float32)
    x = images.astype(work)
    x /= 255
    if normalize:
        x -= np.asarray(CIFAR10_MEAN, dtype=work).reshape(1, 3, 1, 1)
        x /= np.asarray(CIFAR10_STD, dtype=work).reshape(1, 3, 1, 1)
    return x.astype(dtype, copy=False)


class CIFAR10(ArrayDataset):
    """CIFAR-10: ``images`` (N, 3, 32, 32) in R, G, B order, ``labels`` (N,) int64 in 0..9.

    N is 50,000 with ``train=True`` (data_batch_1 ... 5, in that order), else 10,000 (test_batch).
    Pixels are scaled to [0, 1] and, with ``normalize``, standardised per channel by the training
    set's mean and population std (``CIFAR10_MEAN``, ``CIFAR10_STD``). Images are in
    ``minicnn.get_default_dtype()``; ``classes`` names the labels.

    Looked for, in this order, in ``root`` (itself or its ``cifar-10/``), ``$MINICNN_DATA``
    (itself or its ``cifar-10/``) and the user cache's ``cifar-10/`` (``$XDG_CACHE_HOME/minicnn``
    or ``~/.cache/minicnn``); in each folder, the first of: ``cifar-10-batches-bin/``,
    ``cifar-10-batches-py/``, the batch files themselves, ``cifar-10-binary.tar.gz``,
    ``cifar-10-python.tar.gz``. A found archive is unpacked next to itself (or into the cache when
    that folder is read-only). If nothing is found and ``download`` is true, the binary archive
    (else the Python one) is downloaded into ``<root or cache>/cifar-10/`` from ``mirrors``,
    checked against ``checksums`` (archive name -> ``"md5:<hex>"`` or ``"sha256:<hex>"``),
    unpacked and kept; else ``DatasetUnavailable``. The Python version is read without running
    pickle. ``format`` says which version was read ("binary" or "python"), ``folder`` where.
    Each batch file must hold ``records_per_file`` (10,000) images, else ``CIFARFormatError``.
    """

    subdir = "cifar-10"
    # Records in each official batch file; a file with another count is truncated or foreign.
    records_per_file = 10000
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
    mirrors = ["https://www.cs.toronto.edu/~kriz/"]
    # The MD5 sums published on https://www.cs.toronto.edu/~kriz/cifar.html.
    checksums = {
        "cifar-10-binary.tar.gz": "md5:c32a1d4ab5d03f1284b67883e8d87530",
        "cifar-10-python.tar.gz": "md5:c58f30108f718f92721af3b95e74349a",
    }

    def __init__(self, root=None, train=True, download=True, normalize=True, mirrors=None,
                 checksums=None):
        self.train = train
        self.format, self.folder = self._locate(
            root, download, self.mirrors if mirrors is None else mirrors,
            self.checksums if checksums is None else checksums)
        parts = [read_cifar_batch(self.folder / name, self.records_per_file)
                 for name in self._names(self.format)]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
        del parts
        super().__init__(_to_float(images, normalize), labels)

    def _names(self, fmt):
        names = [f"data_batch_{i}" for i in range(1, 6)] if self.train else ["test_batch"]
        return [n + ".bin" for n in names] if fmt == "binary" else names

    def _has_files(self, folder, fmt):
        return all((folder / n).is_file() for n in self._names(fmt))

    def _search_dirs(self, root):
        dirs = [] if root is None else [Path(root), Path(root) / self.subdir]
        if os.environ.get("MINICNN_DATA"):
            shared = Path(os.environ["MINICNN_DATA"])
            dirs += [shared, shared / self.subdir]
        return dirs + [_user_cache() / self.subdir]

    def _locate(self, root, download, mirrors, checksums):
        """(format, folder holding the split's batch files), unpacking or downloading if need be."""
        dirs = self._search_dirs(root)
        target = (Path(root) if root is not None else _user_cache()) / self.subdir
        for d in dirs:
            for fmt in ("binary", "python"):
                if self._has_files(d / _FOLDERS[fmt], fmt):
                    return fmt, d / _FOLDERS[fmt]
            for fmt in ("binary", "python"):
                if self._has_files(d, fmt):
                    return fmt, d
            for fmt in ("binary", "python"):
                if (d / _ARCHIVES[fmt]).is_file():
                    return fmt, self._unpack(d / _ARCHIVES[fmt], fmt)
        errors = []
        if download:
            names = [_ARCHIVES[f] for f in ("binary", "python") if _ARCHIVES[f] in checksums]
            if not names:
                raise ValueError(f"{type(self).__name__}: expected checksums to have an entry for "
                                 f"{_ARCHIVES['binary']} or {_ARCHIVES['python']}, "
                                 f"got keys {sorted(checksums)}")
            for name in names:
                failed = _download(name, target, mirrors, checksums[name])
                if not failed:
                    fmt = "binary" if name == _ARCHIVES["binary"] else "python"
                    return fmt, self._unpack(target / name, fmt)
                errors += failed
        looked = "\n".join(f"  {d}" for d in dirs)
        tried = ("\nand every download failed:\n" + "\n".join(f"  {e}" for e in errors)
                 if download else "\n(download=False, so nothing was downloaded)")
        url = self.mirrors[0].rstrip("/") + "/" + _ARCHIVES["binary"]
        raise DatasetUnavailable(
            f"{type(self).__name__}: none of {_FOLDERS['binary']}/, {_FOLDERS['python']}/, "
            f"{_ARCHIVES['binary']} or {_ARCHIVES['python']} (with the "
            f"{'training' if self.train else 'test'} batches) was found in any of:"
            f"\n{looked}{tried}\n"
            f"Fix: pass root= a folder holding one of them, set MINICNN_DATA to one, connect to "
            f"the internet and use download=True to fetch {url} into {target}, or download that "
            f"file by hand and put it there.")

    def _unpack(self, archive, fmt):
        """Unpack ``archive`` next to itself (into the cache if read-only); the batch folder."""
        dest = archive.parent if os.access(archive.parent, os.W_OK) else _user_cache() / self.subdir
        folder = extract_cifar_archive(archive, dest, _FOLDERS[fmt])
        if not self._has_files(folder, fmt):
            missing = [n for n in self._names(fmt) if not (folder / n).is_file()]
            raise CIFARFormatError(f"{type(self).__name__}: {archive}: expected members "
                                   f"{', '.join(f'{_FOLDERS[fmt]}/{n}' for n in missing)}, "
                                   f"not in the archive")
        return folder
