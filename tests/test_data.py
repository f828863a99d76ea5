"""minicnn.data: IDX reading, dataset lookup and download, the bundled sample, DataLoader.

No network: downloads are served by a local HTTP server on 127.0.0.1. The real MNIST files are
checked only when $MINICNN_DATA points at them.
"""
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from minicnn import backend
from minicnn.data import (
    FASHION_MNIST_MEAN, FASHION_MNIST_STD, MNIST_MEAN, MNIST_STD, ArrayDataset, DataLoader,
    DatasetUnavailable, FashionMNIST, IDXError, MNIST, mnist_sample, read_idx,
)

from conftest import mirror_server

REAL_DATA = os.environ.get("MINICNN_DATA")

# From /work/shared/data/README.md: SHA-256 of the uncompressed MNIST files.
MNIST_IDX_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array):
    """The IDX file of ``array``: magic, big-endian dims, big-endian payload."""
    a = np.asarray(array)
    code = CODES[a.dtype.kind + str(a.dtype.itemsize)]
    header = bytes([0, 0, code, a.ndim]) + np.array(a.shape, dtype=">u4").tobytes()
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


# --- IDX ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
@pytest.mark.parametrize("compressed", [False, True])
def test_idx_round_trip(tmp_path, dtype, compressed):
    a = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == "u1":
        a = a.astype(np.uint8) + 200
    data = idx_bytes(a)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(data) if compressed else data)
    b = read_idx(path)
    assert b.shape == a.shape and b.dtype == a.dtype and b.dtype.isnative
    assert b.flags.writeable
    np.testing.assert_array_equal(b, a)


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "plain.gz").write_bytes(idx_bytes(a))
    (tmp_path / "packed").write_bytes(gzip.compress(idx_bytes(a)))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed"), a)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("content, match", [
    (GOOD[:-1], "expected 24 bytes.*got 23.*truncated"),
    (GOOD + b"\x00\x01", "got 2 bytes more"),
    (b"\x01\x00" + GOOD[2:], "magic number starting with 0x00 0x00"),
    (GOOD[:2] + b"\x07" + GOOD[3:], "dtype code.*got 0x07"),
    (GOOD[:2], "4-byte IDX magic number"),
    (GOOD[:10], "3 dimension sizes"),
    (b"", "got a file of 0 bytes"),
    (gzip.compress(GOOD)[:-12], "truncated or corrupt"),
    (gzip.compress(GOOD)[:10] + b"\x07" + gzip.compress(GOOD)[11:], "truncated or corrupt"),
    (gzip.compress(GOOD)[:-8] + b"\x00" * 8, "truncated or corrupt"),  # bad CRC
], ids=["truncated", "overlong", "magic", "dtype-code", "short-magic", "short-dims", "empty",
        "gz-truncated", "gz-corrupt", "gz-crc"])
def test_idx_bad_files_raise_clear_error(tmp_path, content, match):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(IDXError, match=match) as e:
        read_idx(path)
    assert isinstance(e.value, ValueError) and str(path) in str(e.value)


# --- the real MNIST files ----------------------------------------------------------------------

@pytest.mark.skipif(not REAL_DATA, reason="MINICNN_DATA is not set: no real MNIST files to check")
@pytest.mark.parametrize("name", sorted(MNIST_IDX_SHA256))
def test_real_mnist_files_match_published_sha256(name):
    folders = [Path(REAL_DATA), Path(REAL_DATA) / "mnist"]
    path = next((f / n for f in folders for n in (name, f"{name}.gz") if (f / n).is_file()), None)
    assert path is not None, f"{name}[.gz] not in {folders}"
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    assert hashlib.sha256(data).hexdigest() == MNIST_IDX_SHA256[name]


@pytest.mark.skipif(not REAL_DATA, reason="MINICNN_DATA is not set: no real MNIST files to check")
@pytest.mark.parametrize("train, n", [(True, 60000), (False, 10000)])
def test_real_mnist_loads(train, n):
    ds = MNIST(train=train, download=False)
    assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == backend.get_default_dtype()
    assert ds.labels.shape == (n,) and ds.labels.dtype == np.int64
    assert set(np.unique(ds.labels)) == set(range(10))
    if train:  # the published constants are the training set's statistics
        assert abs(float(ds.images.mean())) < 1e-3 and abs(float(ds.images.std()) - 1) < 1e-3
        np.testing.assert_array_equal(ds.images[:5000], mnist_sample(train=True).images)


# --- download from a local HTTP server ---------------------------------------------------------

NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def synthetic_split(n, seed):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def synthetic_gz(n_train=20, n_test=10, seed=0):
    """File name -> .gz bytes of a small MNIST-shaped dataset."""
    files = {}
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = synthetic_split(n, s)
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(images), mtime=0)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(labels), mtime=0)
    return files


FILES = synthetic_gz()
SHA256 = {k: "sha256:" + hashlib.sha256(v).hexdigest() for k, v in FILES.items()}
MD5 = {k: "md5:" + hashlib.md5(v).hexdigest() for k, v in FILES.items()}


@pytest.fixture(scope="module")
def server():
    """Base URL of a server with mirrors /good/, /trunc/, /corrupt/, /cut/ and /missing/ (404)."""
    with mirror_server(FILES) as url:
        yield url


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $MINICNN_DATA, a private user cache, and no system folders: only what a test makes."""
    monkeypatch.delenv("MINICNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(FashionMNIST, "system_dirs", ())
    return tmp_path


def all_files(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if p.is_file())


def check_synthetic(ds, train=True):
    images, labels = synthetic_split(20, 0) if train else synthetic_split(10, 1)
    expected = (images[:, None].astype(np.float32) / 255 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(ds.images, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ds.labels, labels)


def test_download_verifies_and_lands_in_place(server, isolated):
    root = isolated / "root"
    ds = MNIST(root, mirrors=[f"{server}/good/"], checksums=SHA256)
    assert ds.folder == root / "mnist"
    assert all_files(root) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    for name in all_files(root):
        assert (root / "mnist" / name).read_bytes() == FILES[name]
    check_synthetic(ds)
    check_synthetic(MNIST(root, train=False, mirrors=[f"{server}/good"], checksums=SHA256), False)
    assert len(all_files(root)) == 4


def test_download_skips_bad_mirrors(server, isolated):
    bad = ["http://127.0.0.1:1/"] + [f"{server}/{m}/" for m in
                                      ("missing", "trunc", "corrupt", "cut")]
    ds = MNIST(mirrors=bad + [f"{server}/good/"], checksums=SHA256)
    cache = isolated / "cache" / "minicnn" / "mnist"
    assert ds.folder == cache
    assert all_files(isolated / "cache") == ["train-images-idx3-ubyte.gz",
                                             "train-labels-idx1-ubyte.gz"]
    check_synthetic(ds)
    # Found in the cache next time: no mirror needed.
    check_synthetic(MNIST(mirrors=[], checksums=SHA256))


def test_download_all_mirrors_bad_raises_and_leaves_nothing(server, isolated):
    mirrors = ["http://127.0.0.1:1/"] + [f"{server}/{m}/" for m in
                                         ("missing", "trunc", "corrupt", "cut")]
    root = isolated / "root"
    with pytest.raises(DatasetUnavailable) as e:
        MNIST(root, mirrors=mirrors, checksums=SHA256)
    msg = str(e.value)
    for m in mirrors:
        assert m in msg
    for reason in ("404", "expected sha256", "connection cut", "Connection refused",
                   "MINICNN_DATA", "root=", str(root), str(root / "mnist")):
        assert reason in msg, reason
    assert isinstance(e.value, RuntimeError)
    assert all_files(isolated) == []


def test_not_found_without_download_raises(isolated):
    with pytest.raises(DatasetUnavailable, match="download=False"):
        MNIST(isolated / "nowhere", download=False)


def test_checksum_table_must_cover_the_file(server, isolated):
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        MNIST(isolated, mirrors=[f"{server}/good/"], checksums={})


def test_fashion_mnist_downloads_with_md5_and_own_statistics(server, isolated):
    ds = FashionMNIST(isolated, mirrors=[f"{server}/good/"], checksums=MD5, normalize=True)
    assert ds.folder == isolated / "fashion-mnist"
    images, _ = synthetic_split(20, 0)
    expected = (images[:, None].astype(np.float32) / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    np.testing.assert_allclose(ds.images, expected, rtol=1e-6, atol=1e-6)


def write_dataset(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = synthetic_split(n, 0)
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))


def test_search_order_root_then_env_then_cache(isolated, monkeypatch):
    write_dataset(isolated / "root", 3)
    write_dataset(isolated / "env" / "mnist", 4)
    write_dataset(isolated / "cache" / "minicnn", 5)
    monkeypatch.setenv("MINICNN_DATA", str(isolated / "env"))
    assert len(MNIST(isolated / "root", download=False)) == 3
    assert len(MNIST(download=False)) == 4
    monkeypatch.delenv("MINICNN_DATA")
    assert len(MNIST(download=False)) == 5


def test_fashion_mnist_never_takes_bare_shared_folders(isolated, monkeypatch):
    write_dataset(isolated / "env", 3)  # MNIST files directly in $MINICNN_DATA
    monkeypatch.setenv("MINICNN_DATA", str(isolated / "env"))
    with pytest.raises(DatasetUnavailable):
        FashionMNIST(download=False)
    write_dataset(isolated / "env" / "fashion-mnist", 4)
    assert len(FashionMNIST(download=False)) == 4
    assert len(FashionMNIST(isolated / "env", download=False)) == 3  # an explicit root may


def test_fashion_mnist_looks_in_debian_folder(isolated, monkeypatch):
    write_dataset(isolated / "usr-share", 6)
    monkeypatch.setattr(FashionMNIST, "system_dirs", (str(isolated / "usr-share"),))
    assert len(FashionMNIST(download=False)) == 6


def test_bad_labels_in_dataset_files_raise(isolated):
    folder = isolated / "root"
    write_dataset(folder, 3)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.array([1, 2, 12], np.uint8))))
    with pytest.raises(ValueError, match="labels in 0..9, got a maximum of 12"):
        MNIST(folder, download=False)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.array([1, 2], np.uint8))))
    with pytest.raises(ValueError, match=r"labels of shape \(3,\)"):
        MNIST(folder, download=False)


# --- bundled sample ----------------------------------------------------------------------------

@pytest.mark.parametrize("train, n", [(True, 5000), (False, 1000)])
def test_mnist_sample(train, n):
    ds = mnist_sample(train=train)
    assert isinstance(ds, ArrayDataset) and len(ds) == n
    assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == backend.get_default_dtype()
    assert ds.labels.dtype == np.int64 and ds.labels.min() == 0 and ds.labels.max() == 9
    assert len(np.unique(ds.labels)) == 10
    raw = mnist_sample(train=train, normalize=False).images
    assert raw.min() == 0 and raw.max() == 1
    np.testing.assert_allclose(ds.images, (raw - MNIST_MEAN) / MNIST_STD, rtol=1e-5, atol=1e-5)


def test_mnist_sample_follows_default_dtype():
    old = backend.get_default_dtype()
    backend.set_default_dtype(np.float64)
    try:
        assert mnist_sample(train=False).images.dtype == np.float64
    finally:
        backend.set_default_dtype(old)


# --- ArrayDataset ------------------------------------------------------------------------------

def toy(n=10):
    """Images whose every pixel is the sample's index, labels = index: batches check themselves."""
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 1, 2, 2))
    return ArrayDataset(np.ascontiguousarray(images), np.arange(n, dtype=np.int32))


def test_array_dataset_indexing():
    ds = toy()
    assert len(ds) == 10 and ds.labels.dtype == np.int64
    x, y = ds[3]
    assert x.shape == (1, 2, 2) and y == 3
    x, y = ds[np.array([4, 1])]
    assert x.shape == (2, 1, 2, 2) and list(y) == [4, 1] and x[0, 0, 0, 0] == 4


@pytest.mark.parametrize("images, labels, err, match", [
    (np.zeros((3, 1, 2, 2), np.float32), np.zeros(4, np.int64), ValueError, "as many labels"),
    (np.zeros((3, 2, 2), np.float32), np.zeros(3, np.int64), ValueError, r"\(N, C, H, W\)"),
    (np.zeros((3, 1, 2, 2), np.uint8), np.zeros(3, np.int64), TypeError, "floating images"),
    (np.zeros((3, 1, 2, 2), np.float32), np.zeros(3, np.float32), TypeError, "integer labels"),
    (np.zeros((3, 1, 2, 2), np.float32), np.zeros((3, 1), np.int64), ValueError, r"\(N,\)"),
])
def test_array_dataset_rejects_bad_inputs(images, labels, err, match):
    with pytest.raises(err, match=match):
        ArrayDataset(images, labels)


# --- DataLoader --------------------------------------------------------------------------------

@pytest.mark.parametrize("drop_last, sizes", [(False, [3, 3, 3, 1]), (True, [3, 3, 3])])
def test_loader_batch_counts(drop_last, sizes):
    loader = DataLoader(toy(10), batch_size=3, drop_last=drop_last)
    assert len(loader) == len(sizes)
    batches = list(loader)
    assert [len(y) for _, y in batches] == sizes
    assert np.concatenate([y for _, y in batches]).tolist() == list(range(sum(sizes)))


def test_loader_batches_are_contiguous_and_consistent():
    backend.seed(1)
    for x, y in DataLoader(toy(10), batch_size=4, shuffle=True, device="cpu"):
        assert x.flags.c_contiguous and y.flags.c_contiguous
        assert x.dtype == np.float32 and y.dtype == np.int64
        np.testing.assert_array_equal(x[:, 0, 0, 0], y)


def epoch_orders(loader, epochs=2):
    return [np.concatenate([y for _, y in loader]).tolist() for _ in range(epochs)]


def test_loader_shuffle_reproducible_and_new_each_epoch():
    loader = DataLoader(toy(50), batch_size=7, shuffle=True)
    backend.seed(123)
    first = epoch_orders(loader)
    backend.seed(123)
    assert epoch_orders(loader) == first
    assert first[0] != first[1]
    assert first[0] != list(range(50))
    for order in first:  # every sample exactly once per epoch
        assert sorted(order) == list(range(50))


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "8"])
def test_loader_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(toy(), batch_size=batch_size)


def test_loader_rejects_non_dataset():
    with pytest.raises(TypeError, match="ArrayDataset"):
        DataLoader([(1, 2)])


@pytest.mark.gpu
def test_loader_on_gpu_matches_cpu():
    reason = backend.cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    ds = toy(50)
    backend.seed(5)
    cpu = list(DataLoader(ds, batch_size=8, shuffle=True))
    backend.seed(5)
    gpu = DataLoader(ds, batch_size=8, shuffle=True, device="cuda")
    assert gpu.device == "cuda" and backend.device_of(gpu.images) == "cuda"
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert backend.device_of(xg) == "cuda" and xg.flags.c_contiguous
        np.testing.assert_array_equal(backend.to_numpy(xg), xc)
        np.testing.assert_array_equal(backend.to_numpy(yg), yc)
