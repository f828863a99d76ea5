"""Datasets and batching: the IDX reader, MNIST / Fashion-MNIST, the bundled sample, DataLoader.

A dataset here is two arrays, ``images`` (N, C, H, W) float and ``labels`` (N,) int64, so a
``DataLoader`` can move both to the GPU once and gather every batch there: no per-step copy of
images from the host, which at MNIST sizes would cost more than the step itself.
"""
import gzip
import hashlib
import math
import os
import tempfile
import urllib.request
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from .backend import device_of, get_array_module, get_default_dtype, rng, to_device
from .errors import DatasetUnavailable, IDXError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Pixel mean and standard deviation of the 60,000 Fashion-MNIST training images scaled to [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


# --- IDX files ---------------------------------------------------------------------------------

# IDX stores every multi-byte value big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def read_idx(path):
    """Read an IDX file, raw or gzip-compressed (told apart by the gzip magic bytes).

    Returns a writeable NumPy array in native byte order with the file's shape and dtype, e.g.
    uint8 (60000, 28, 28) for MNIST training images. Raises ``IDXError`` naming the file, what was
    expected and what came, for a bad magic number, an unknown dtype code, or a payload shorter or
    longer than the product of the dimensions (including a truncated or corrupt .gz).
    """
    path = Path(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        try:
            return _read_idx_stream(f, path)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise IDXError(f"read_idx: {path}: expected a complete gzip stream, got a truncated "
                           f"or corrupt one ({type(e).__name__}: {e})") from e


def _read_upto(f, n):
    """Up to ``n`` bytes from ``f`` in a bytearray (shorter only at end of file)."""
    # Grown as data arrives, so a corrupt header claiming a huge shape fails at the end of the
    # file instead of allocating that shape up front.
    buf = bytearray()
    while len(buf) < n and (chunk := f.read(min(_CHUNK, n - len(buf)))):
        buf += chunk
    return buf


def _read_idx_stream(f, path):
    """The array in the open (decompressed) IDX stream ``f``; ``path`` names it in errors."""
    head = _read_upto(f, 4)
    if len(head) < 4:
        raise IDXError(f"read_idx: {path}: expected a 4-byte IDX magic number, "
                       f"got a file of {len(head)} bytes")
    if head[0] != 0 or head[1] != 0:
        raise IDXError(f"read_idx: {path}: expected an IDX magic number starting with 0x00 0x00, "
                       f"got 0x{head[0]:02x} 0x{head[1]:02x} (not an IDX file)")
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise IDXError(f"read_idx: {path}: expected an IDX dtype code in ({known}), "
                       f"got 0x{code:02x}")
    if ndim == 0:
        raise IDXError(f"read_idx: {path}: expected at least 1 dimension, got 0")
    dims_raw = _read_upto(f, 4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise IDXError(f"read_idx: {path}: expected {ndim} dimension sizes ({4 * ndim} bytes) "
                       f"after the magic number, got {len(dims_raw)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
    dtype = _IDX_DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize
    payload = _read_upto(f, nbytes)
    if len(payload) < nbytes:
        raise IDXError(f"read_idx: {path}: expected {nbytes} bytes of {dtype.name} data for shape "
                       f"{shape}, got {len(payload)} (file truncated)")
    extra = 0
    while chunk := f.read(_CHUNK):
        extra += len(chunk)
    if extra:
        raise IDXError(f"read_idx: {path}: expected {nbytes} bytes of {dtype.name} data for shape "
                       f"{shape}, got {extra} bytes more than that")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="),
                                                                     copy=False)


# --- datasets ----------------------------------------------------------------------------------

class ArrayDataset:
    """``images`` (N, C, H, W) floating array and ``labels`` (N,) int64, on the CPU or the GPU.

    ``ds[i]`` gives ``(images[i], labels[i])``; ``i`` may be an int, a slice or an index array.
    Integer labels of any width are stored as int64.
    """

    def __init__(self, images, labels):
        images = images if hasattr(images, "ndim") else np.asarray(images)
        labels = labels if hasattr(labels, "ndim") else np.asarray(labels)
        if images.ndim != 4:
            raise ValueError(f"ArrayDataset: expected images of shape (N, C, H, W), "
                             f"got shape {tuple(images.shape)}")
        if images.dtype.kind != "f":
            raise TypeError(f"ArrayDataset: expected floating images, got dtype {images.dtype}")
        if labels.ndim != 1:
            raise ValueError(f"ArrayDataset: expected labels of shape (N,), "
                             f"got shape {tuple(labels.shape)}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"ArrayDataset: expected integer labels, got dtype {labels.dtype}")
        if len(images) != len(labels):
            raise ValueError(f"ArrayDataset: expected as many labels as images ({len(images)}), "
                             f"got {len(labels)}")
        if device_of(images) != device_of(labels):
            raise ValueError(f"ArrayDataset: expected labels on the images' device "
                             f"({device_of(images)}), got {device_of(labels)}")
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __repr__(self):
        return (f"{type(self).__name__}(n={len(self)}, image_shape={tuple(self.images.shape[1:])}, "
                f"dtype={self.images.dtype})")


def _from_uint8(images, labels, mean, std, normalize, source):
    """uint8 images (N, H, W) and labels (N,) -> images (N, 1, H, W) in the default dtype, labels.

    Pixels are scaled to [0, 1] and, with ``normalize``, standardised by ``mean`` and ``std``
    (the training set's pixel statistics). The one code path behind MNIST, Fashion-MNIST and the
    bundled sample, so all three give identical inputs for identical pixels.
    """
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{source}: expected uint8 images of shape (N, H, W), "
                         f"got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != np.uint8 or labels.shape != (len(images),):
        raise ValueError(f"{source}: expected uint8 labels of shape ({len(images)},), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{source}: expected labels in 0..9, got a maximum of {labels.max()}")
    dtype = get_default_dtype()
    # float16 arithmetic would round the standardised values twice; compute in at least float32.
    work = np.promote_types(dtype, np.float32)
    x = images[:, None].astype(work)
    x /= 255
    if normalize:
        x -= mean
        x /= std
    return x.astype(dtype, copy=False), labels.astype(np.int64)


def _user_cache():
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minicnn"


def _find(folder, name):
    """The path of IDX file ``name`` in ``folder``, raw or .gz, or None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download(name, folder, mirrors, checksum):
    """Download ``name`` from the first mirror that serves it intact into ``folder``.

    The file streams into a temporary name in ``folder`` and is renamed only once its checksum
    (``"sha256:<hex>"`` or ``"md5:<hex>"`` of the served bytes) matches, so a failed or
    interrupted download leaves nothing behind. Returns ``[]`` once a mirror succeeded, else
    one line per mirror: its URL and why it failed.
    """
    from tqdm import tqdm  # only downloads need it

    algo, _, expected = checksum.partition(":")
    if algo not in ("sha256", "md5") or not expected:
        raise ValueError(f"checksum of {name}: expected 'sha256:<hex>' or 'md5:<hex>', "
                         f"got {checksum!r}")
    expected = expected.lower()
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
        try:
            digest = hashlib.new(algo, usedforsecurity=False)
            got = 0
            # Some mirrors answer 403 to urllib's default User-Agent.
            request = urllib.request.Request(url, headers={"User-Agent": "minicnn"})
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=30) as resp:
                total = resp.length
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=name) as bar:
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
            if total is not None and got != total:
                raise OSError(f"expected {total} bytes, got {got} (connection cut)")
            if digest.hexdigest() != expected:
                raise ValueError(f"expected {algo} {expected}, got {digest.hexdigest()} "
                                 f"({got} bytes; corrupt or different file)")
            os.chmod(tmp, 0o644)  # mkstemp makes files private; a data folder is often shared
            os.replace(tmp, folder / name)
            return []
        # Networks fail in many ways (URLError, HTTPException, timeouts, TLS): each means the
        # next mirror.
        except Exception as e:
            errors.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return errors or ["no mirror to download from (mirrors is empty)"]


class MNIST(ArrayDataset):
    """The MNIST handwritten digits: ``images`` (N, 1, 28, 28), ``labels`` (N,) int64 in 0..9.

    N is 60,000 with ``train=True``, else 10,000. Pixels are scaled to [0, 1] and, with
    ``normalize``, standardised by the training set's mean and std (``MNIST_MEAN, MNIST_STD``).
    Images are in ``minicnn.get_default_dtype()``.

    The IDX files (raw or .gz) are looked for in ``root``, then ``$MINICNN_DATA``, then the user
    cache (``$XDG_CACHE_HOME/minicnn`` or ``~/.cache/minicnn``), each folder itself or its
    ``mnist/`` subfolder. If absent and ``download`` is true they are downloaded into
    ``<root or cache>/mnist/`` from ``mirrors`` (default: the class's ``mirrors``), each file
    checked against ``checksums`` (file name -> ``"sha256:<hex>"``); else ``DatasetUnavailable``.
    """

    subdir = "mnist"
    # Both datasets use the same file names, so a folder named by $MINICNN_DATA or the cache
    # itself (not a dataset subfolder) is taken to hold MNIST; Fashion-MNIST looks there only
    # in its own subfolder and never mistakes digits for clothes.
    shared_dirs_hold_files = True
    system_dirs = ()
    mean, std = MNIST_MEAN, MNIST_STD
    classes = [str(d) for d in range(10)]
    mirrors = [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ]
    checksums = {
        "train-images-idx3-ubyte.gz":
            "sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    }

    def __init__(self, root=None, train=True, download=True, normalize=True, mirrors=None,
                 checksums=None):
        self.train = train
        split = "train" if train else "t10k"
        names = (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte")
        self.folder = self._locate(root, names, download,
                                   self.mirrors if mirrors is None else mirrors,
                                   self.checksums if checksums is None else checksums)
        images, labels = (read_idx(_find(self.folder, n)) for n in names)
        source = f"{type(self).__name__}({self.folder})"
        super().__init__(*_from_uint8(images, labels, self.mean, self.std, normalize, source))

    def _search_dirs(self, root):
        dirs = []
        if root is not None:
            dirs += [Path(root), Path(root) / self.subdir]
        shared = [Path(os.environ["MINICNN_DATA"])] if os.environ.get("MINICNN_DATA") else []
        for place in shared + [_user_cache()]:
            dirs += ([place] if self.shared_dirs_hold_files else []) + [place / self.subdir]
        return dirs + [Path(d) for d in self.system_dirs]

    def _locate(self, root, names, download, mirrors, checksums):
        """The folder holding both files ``names``, downloading them there if need be."""
        dirs = self._search_dirs(root)
        for d in dirs:
            if all(_find(d, n) for n in names):
                return d
        target = (Path(root) if root is not None else _user_cache()) / self.subdir
        errors = []
        if download:
            for n in (n for n in names if _find(target, n) is None):
                if f"{n}.gz" not in checksums:
                    raise ValueError(f"{type(self).__name__}: expected checksums to have an entry "
                                     f"for {n}.gz, got keys {sorted(checksums)}")
                # Stop at the first file no mirror gives: offline, the rest would fail the same way.
                errors = _download(f"{n}.gz", target, mirrors, checksums[f"{n}.gz"])
                if errors:
                    break
            else:
                return target
        looked = "\n".join(f"  {d}" for d in dirs)
        tried = ("\nand every mirror failed:\n" + "\n".join(f"  {e}" for e in errors)
                 if download else "\n(download=False, so nothing was downloaded)")
        raise DatasetUnavailable(
            f"{type(self).__name__}: {names[0]}[.gz] and {names[1]}[.gz] were not found in any of:"
            f"\n{looked}{tried}\n"
            f"Fix: pass root= a folder holding the files, set MINICNN_DATA to one, or connect to "
            f"the internet and use download=True to fetch them into {target}.")


class FashionMNIST(MNIST):
    """Zalando's Fashion-MNIST: ``images`` (N, 1, 28, 28), ``labels`` (N,) int64 in 0..9.

    Same file names, shapes and arguments as ``MNIST``; standardised by ``FASHION_MNIST_MEAN``
    and ``FASHION_MNIST_STD``; downloads are checked against MD5 sums.
    Looked for in ``root`` (itself or ``fashion-mnist/``), ``$MINICNN_DATA/fashion-mnist``,
    the user cache's ``fashion-mnist/``, then /usr/share/datasets/fashion-mnist (Debian's
    ``dataset-fashion-mnist`` package).
    """

    subdir = "fashion-mnist"
    shared_dirs_hold_files = False
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
    mirrors = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]
    # Zalando publishes MD5 sums only (github.com/zalandoresearch/fashion-mnist, also the ones
    # torchvision checks); they guard against truncated and corrupt downloads.
    checksums = {
        "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
    }


def mnist_sample(train=True, normalize=True):
    """A real slice of MNIST bundled with minicnn, for tests and offline demos.

    The first 5,000 training images (``train=True``) or the first 1,000 test images, built exactly
    as ``MNIST`` builds them: ``ArrayDataset`` with images (N, 1, 28, 28), labels (N,) int64.
    """
    split = "train" if train else "test"
    ref = resources.files(__package__).joinpath("_sample", "mnist_sample.npz")
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
        images, labels = z[f"{split}_images"], z[f"{split}_labels"]
    return ArrayDataset(*_from_uint8(images, labels, MNIST_MEAN, MNIST_STD, normalize,
                                     "mnist_sample"))


# --- batching ----------------------------------------------------------------------------------

class DataLoader:
    """Iterate ``(x, y)`` batches of an ``ArrayDataset``: x (B, C, H, W), y (B,) int64.

    With ``shuffle`` every iteration draws a new permutation from ``minicnn.rng()`` (so
    ``minicnn.seed`` fixes the batch order, identically on CPU and GPU). With ``device``
    ("cpu", "cuda" or a ``Device``) the dataset's arrays are moved there once, here, and each
    batch is gathered on that device. ``len()`` is the number of batches; the last one is
    smaller unless ``drop_last``. With ``sampler`` (an iterable of sample indices with a
    ``len()``, such as ``minicnn.distributed.DistributedSampler``) every pass takes the samples
    it yields, in its order, instead of the whole dataset; ``shuffle`` must then be False.
    """

    def __init__(self, dataset, batch_size=64, shuffle=False, drop_last=False, device=None,
                 sampler=None):
        if not (hasattr(dataset, "images") and hasattr(dataset, "labels")):
            raise TypeError(f"DataLoader: expected an ArrayDataset (with images and labels "
                            f"arrays), got {type(dataset).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"DataLoader: expected batch_size an integer >= 1, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if sampler is not None and (self.shuffle or not hasattr(sampler, "__len__")):
            raise ValueError(f"DataLoader: expected a sampler with a len() and shuffle=False (the "
                             f"sampler sets the order), got {type(sampler).__name__} with "
                             f"shuffle={self.shuffle}")
        self.sampler = sampler
        images, labels = dataset.images, dataset.labels
        if device is not None:
            images, labels = to_device(images, device), to_device(labels, device)
        self.images, self.labels = images, labels
        self.xp = get_array_module(images)
        self.last_order = None

    @property
    def device(self):
        """The ``Device`` batches are made on."""
        return device_of(self.images)

    def __len__(self):
        n = len(self.labels) if self.sampler is None else len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        if self.sampler is not None:
            order = self._sampled()
        else:
            order = rng().permutation(n) if self.shuffle else np.arange(n)
        # Drawn now, not at the first next(), so the order depends only on when iter() was called.
        self.last_order = order
        return self._batches(self.xp.asarray(order))

    def iter_from(self, order, start=0):
        """The batches of a pass in ``order`` (a permutation of the sample indices, such as
        ``last_order``, the one the latest ``iter()`` drew), from batch ``start`` on; draws
        nothing from the generator. ``fit`` resumes a pass with it."""
        order = np.asarray(order)
        n = len(self.labels)
        if self.sampler is not None:
            m = len(self.sampler)
            if order.shape != (m,) or (m and not (order.dtype.kind in "iu" and 0 <= order.min()
                                                  and order.max() < n)):
                raise ValueError(f"DataLoader.iter_from: expected {m} sample indices in [0, {n}) "
                                 f"(the sampler's length), got an array of shape {order.shape}")
        elif order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
            raise ValueError(f"DataLoader.iter_from: expected a permutation of {n} indices, got "
                             f"an array of shape {order.shape} that is not one")
        if not 0 <= start <= len(self):
            raise ValueError(f"DataLoader.iter_from: expected start in [0, {len(self)}], "
                             f"got {start!r}")
        self.last_order = order
        return self._batches(self.xp.asarray(order), start)

    def _sampled(self):
        """The sampler's indices for this pass as int64, checked against the dataset's size."""
        order = np.fromiter(self.sampler, dtype=np.int64, count=len(self.sampler))
        n = len(self.labels)
        if order.size and not (0 <= order.min() and order.max() < n):
            raise ValueError(f"DataLoader: the sampler gave indices outside [0, {n}): "
                             f"{order[(order < 0) | (order >= n)][:5].tolist()}")
        return order

    def _batches(self, order, start=0):
        bs = self.batch_size
        for b in range(start, len(self)):
            idx = order[b * bs:(b + 1) * bs]
            yield (self.xp.take(self.images, idx, axis=0),
                   self.xp.take(self.labels, idx, axis=0))

    def __repr__(self):
        sampler = "" if self.sampler is None else f", sampler={self.sampler!r}"
        return (f"DataLoader(n={len(self.labels)}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, drop_last={self.drop_last}, device={self.device}"
                f"{sampler})")
