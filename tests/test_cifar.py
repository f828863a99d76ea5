"""minicnn.cifar and minicnn.augment: CIFAR-10 reading (binary and Python versions), archives,
downloads, the pickle-free reader's refusals, batch augmentation.

No network: small synthetic batches (4 images each) are written here in the official layouts,
and downloads are served by a local HTTP server on 127.0.0.1. The real files are checked only
when $MINICNN_DATA holds them.
"""
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest

import minicnn
from minicnn import augment, backend, cifar
from minicnn.cifar import (CIFAR10, CIFAR10_MEAN, CIFAR10_STD, CIFARFormatError,
                           extract_cifar_archive, read_cifar_batch)
from minicnn.data import ArrayDataset, DataLoader, DatasetUnavailable

from conftest import mirror_server

REAL_DATA = os.environ.get("MINICNN_DATA")
N = 4  # images per synthetic batch file
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
ALL = TRAIN + ["test_batch"]
BIN, PY = "cifar-10-batches-bin", "cifar-10-batches-py"
BIN_TGZ, PY_TGZ = "cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"


# --- writing the official formats --------------------------------------------------------------

def split(name):
    """uint8 images (N, 3, 32, 32) and labels (N,) of one synthetic batch, distinct per batch."""
    k = ALL.index(name)
    images = np.random.default_rng(k).integers(0, 256, (N, 3, 32, 32), dtype=np.uint8)
    return images, ((np.arange(N) * 3 + k) % 10).astype(np.uint8)


def expected(names):
    parts = [split(n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def bin_bytes(images, labels):
    """The binary version: per image, the label byte then 3072 bytes (R plane, G plane, B plane)."""
    return b"".join(bytes([int(y)]) + x[0].tobytes() + x[1].tobytes() + x[2].tobytes()
                    for x, y in zip(images, labels))


def py3_pickle(images, labels, protocol=2, name="batch"):
    """What Python 3's pickle writes for a batch dict like the official one."""
    return pickle.dumps({b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
                         b"data": images.reshape(len(images), -1),
                         b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]},
                        protocol=protocol)


def py2_pickle(images, labels, name="batch"):
    """What Python 2's cPickle (protocol 2) wrote for the official files, assembled by opcode:
    str keys (SHORT_BINSTRING), numpy.core.multiarray._reconstruct, raw data as BINSTRING."""
    def s(b):
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def i(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    n = len(images)
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b")
             + b"\x87R(" + i(1) + i(n) + i(3072) + b"\x86cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1)
             + b"\x87R(" + i(3) + s(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + i(0) + b"tb\x89"
             + s(images.tobytes()) + b"tb")
    return (b"\x80\x02}(" + s(b"data") + array
            + s(b"labels") + b"](" + b"".join(i(int(v)) for v in labels) + b"e"
            + s(b"batch_label") + s(name.encode())
            + s(b"filenames") + b"](" + b"".join(s(b"img_%d.png" % j) for j in range(n)) + b"e"
            + b"u.")


def batch_files(fmt, writer=py3_pickle):
    """File name -> bytes of a whole synthetic dataset in format "binary" or "python"."""
    if fmt == "binary":
        files = {f"{n}.bin": bin_bytes(*split(n)) for n in ALL}
        files["batches.meta.txt"] = "\n".join(CIFAR10.classes).encode() + b"\n"
    else:
        files = {n: writer(*split(n), name=n) for n in ALL}
        names = [c.encode() for c in CIFAR10.classes]
        files["batches.meta"] = pickle.dumps({b"label_names": names}, protocol=2)
    return files


def write_folder(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def tar_gz(files, top, extra=()):
    """A .tar.gz holding ``top/`` with ``files`` (name -> bytes), then ``extra`` TarInfos."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(top)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def all_files(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Batches of N records, no $MINICNN_DATA, a private user cache: only what a test makes."""
    monkeypatch.setattr(CIFAR10, "records_per_file", N)
    monkeypatch.delenv("MINICNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def normalised(images):
    mean = np.array(CIFAR10_MEAN).reshape(1, 3, 1, 1)
    std = np.array(CIFAR10_STD).reshape(1, 3, 1, 1)
    return (images / 255.0 - mean) / std


# --- reading folders ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, top", [("binary", BIN), ("python", PY)])
@pytest.mark.parametrize("train", [True, False])
def test_folder_reads_back(isolated, fmt, top, train):
    write_folder(isolated / top, batch_files(fmt))
    ds = CIFAR10(isolated, train=train, download=False)
    names = TRAIN if train else ["test_batch"]
    images, labels = expected(names)
    assert isinstance(ds, ArrayDataset) and ds.format == fmt and ds.folder == isolated / top
    assert ds.images.shape == (N * len(names), 3, 32, 32) and ds.images.dtype == np.float32
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.labels, labels)  # batch 1 first, each batch in file order
    np.testing.assert_allclose(ds.images, normalised(images), rtol=1e-6, atol=1e-6)
    raw = CIFAR10(isolated, train=train, download=False, normalize=False).images
    np.testing.assert_allclose(raw, images / 255.0, rtol=1e-7, atol=1e-7)
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck" and len(ds.classes) == 10


def test_known_pixels_channel_order_and_normalisation(isolated):
    # One record written byte by byte: label 7, the red plane, the green plane, the blue plane.
    r, g, b = bytearray([255] * 1024), bytearray([0] * 1024), bytearray([51] * 1024)
    r[1 * 32 + 2], g[31 * 32 + 0], b[0 * 32 + 31] = 3, 200, 17
    record = bytes([7]) + bytes(r) + bytes(g) + bytes(b)
    files = batch_files("binary")
    files["test_batch.bin"] = record + files["test_batch.bin"][len(record):]
    write_folder(isolated / BIN, files)
    raw = CIFAR10(isolated, train=False, download=False, normalize=False)
    assert raw.labels[0] == 7
    x = raw.images[0]
    assert x[0, 0, 0] == 1 and x[1, 0, 0] == 0 and x[2, 0, 0] == np.float32(51 / 255)
    assert x[0, 1, 2] == np.float32(3 / 255)       # R plane, row 1, column 2
    assert x[1, 31, 0] == np.float32(200 / 255)    # G plane, row 31, column 0
    assert x[2, 0, 31] == np.float32(17 / 255)     # B plane, row 0, column 31
    x = CIFAR10(isolated, train=False, download=False).images[0]
    np.testing.assert_allclose(x[:, 5, 5], [(1 - 0.4914) / 0.2470, (0 - 0.4822) / 0.2435,
                                            (0.2 - 0.4465) / 0.2616], rtol=1e-6)
    np.testing.assert_allclose(x[0, 1, 2], (3 / 255 - 0.4914) / 0.2470, rtol=1e-6)


@pytest.mark.parametrize("writer", [py3_pickle, py2_pickle, partial(py3_pickle, protocol=4),
                                    partial(py3_pickle, protocol=5)],
                         ids=["py3-protocol2", "py2-cpickle", "protocol4", "protocol5"])
def test_python_and_binary_versions_give_identical_arrays(isolated, writer):
    write_folder(isolated / "a" / BIN, batch_files("binary"))
    write_folder(isolated / "b" / PY, batch_files("python", writer))
    for train in (True, False):
        a = CIFAR10(isolated / "a", train=train, download=False)
        b = CIFAR10(isolated / "b", train=train, download=False)
        assert (a.format, b.format) == ("binary", "python")
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_py2_pickle_helper_is_a_real_numpy_pickle():
    # The hand-assembled bytes are what pickle (and numpy) itself reads as the official dict.
    images, labels = split("data_batch_1")
    d = pickle.loads(py2_pickle(images, labels), encoding="bytes")
    assert sorted(d) == [b"batch_label", b"data", b"filenames", b"labels"]
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (N, 3072)
    np.testing.assert_array_equal(d[b"data"], images.reshape(N, -1))
    assert d[b"labels"] == labels.tolist()


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_follows_default_dtype(isolated, dtype):
    write_folder(isolated / BIN, batch_files("binary"))
    minicnn.set_default_dtype(dtype)
    ds = CIFAR10(isolated, train=False, download=False)
    assert ds.images.dtype == dtype
    np.testing.assert_allclose(ds.images, normalised(expected(["test_batch"])[0]),
                               rtol=1e-12 if dtype == np.float64 else 2e-3, atol=1e-3)


def test_read_cifar_batch_tells_formats_by_content(tmp_path):
    images, labels = split("test_batch")
    for name, data in (("x.bin", py2_pickle(images, labels)), ("y", bin_bytes(images, labels))):
        (tmp_path / name).write_bytes(data)
        got_images, got_labels = read_cifar_batch(tmp_path / name, records=N)
        assert got_images.dtype == np.uint8 and got_images.flags.writeable
        assert got_images.flags.c_contiguous
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)


# --- where the files are looked for ------------------------------------------------------------

def test_binary_preferred_over_python_in_one_folder(isolated):
    write_folder(isolated / PY, batch_files("python"))
    write_folder(isolated / BIN, batch_files("binary"))
    assert CIFAR10(isolated, download=False).format == "binary"


def test_search_order_root_then_env_then_cache(isolated, monkeypatch):
    write_folder(isolated / "root" / "cifar-10" / PY, batch_files("python"))
    write_folder(isolated / "env" / BIN, batch_files("binary"))
    write_folder(isolated / "env2" / "cifar-10" / PY, batch_files("python"))
    write_folder(isolated / "cache" / "minicnn" / "cifar-10" / BIN, batch_files("binary"))
    monkeypatch.setenv("MINICNN_DATA", str(isolated / "env"))
    assert CIFAR10(isolated / "root", download=False).folder == isolated / "root" / "cifar-10" / PY
    assert CIFAR10(download=False).folder == isolated / "env" / BIN
    monkeypatch.setenv("MINICNN_DATA", str(isolated / "env2"))
    assert CIFAR10(download=False).folder == isolated / "env2" / "cifar-10" / PY
    monkeypatch.delenv("MINICNN_DATA")
    assert CIFAR10(download=False).folder == isolated / "cache" / "minicnn" / "cifar-10" / BIN


def test_root_may_be_the_batch_folder_itself(isolated):
    folder = write_folder(isolated / "my-batches", batch_files("python"))
    ds = CIFAR10(folder, train=False, download=False)
    assert ds.folder == folder and ds.format == "python" and len(ds) == N


def test_folder_missing_the_split_is_skipped(isolated):
    files = batch_files("binary")
    del files["data_batch_3.bin"]
    write_folder(isolated / BIN, files)
    assert len(CIFAR10(isolated, train=False, download=False)) == N
    with pytest.raises(DatasetUnavailable, match="download=False"):
        CIFAR10(isolated, train=True, download=False)


def test_not_found_without_download_says_where_and_how(isolated):
    with pytest.raises(DatasetUnavailable) as e:
        CIFAR10(isolated / "nowhere", download=False)
    msg = str(e.value)
    for part in (BIN, PY, BIN_TGZ, PY_TGZ, str(isolated / "nowhere"),
                 str(isolated / "cache" / "minicnn" / "cifar-10"), "download=False",
                 "MINICNN_DATA", "root=", f"https://www.cs.toronto.edu/~kriz/{BIN_TGZ}"):
        assert part in msg, part


# --- archives ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, top, archive", [("binary", BIN, BIN_TGZ), ("python", PY, PY_TGZ)])
def test_archive_is_unpacked_next_to_itself(isolated, fmt, top, archive):
    (isolated / archive).write_bytes(tar_gz(batch_files(fmt), top))
    ds = CIFAR10(isolated, download=False)
    assert ds.format == fmt and ds.folder == isolated / top
    assert sorted(p.name for p in (isolated / top).iterdir()) == sorted(batch_files(fmt))
    assert [p.name for p in isolated.iterdir() if p.name.endswith(".part")] == []
    images, labels = expected(TRAIN)
    np.testing.assert_allclose(ds.images, normalised(images), rtol=1e-6, atol=1e-6)
    (isolated / archive).unlink()  # the unpacked folder is found next time
    np.testing.assert_array_equal(CIFAR10(isolated, download=False).labels, labels)


def test_read_only_archive_folder_unpacks_into_cache(isolated, monkeypatch):
    shared = isolated / "shared"
    shared.mkdir()
    (shared / BIN_TGZ).write_bytes(tar_gz(batch_files("binary"), BIN))
    # As if ``shared`` were read-only (chmod does not stop root, who may run these tests).
    real_access = os.access
    monkeypatch.setattr(cifar.os, "access",
                        lambda p, mode: False if Path(p) == shared else real_access(p, mode))
    ds = CIFAR10(shared, train=False, download=False)
    assert ds.folder == isolated / "cache" / "minicnn" / "cifar-10" / BIN
    assert all_files(shared) == [BIN_TGZ]
    monkeypatch.undo()
    monkeypatch.setattr(CIFAR10, "records_per_file", N)
    monkeypatch.setenv("XDG_CACHE_HOME", str(isolated / "cache"))
    assert CIFAR10(download=False).folder == ds.folder  # found in the cache next time


def test_partial_folder_is_completed_from_the_archive(isolated):
    files = batch_files("binary")
    write_folder(isolated / BIN, {"data_batch_1.bin": files["data_batch_1.bin"]})
    (isolated / BIN_TGZ).write_bytes(tar_gz(files, BIN))
    ds = CIFAR10(isolated, download=False)
    np.testing.assert_array_equal(ds.labels, expected(TRAIN)[1])


def _info(name, type=tarfile.REGTYPE, size=0, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = type, size, linkname
    return info


@pytest.mark.parametrize("member, match", [
    (_info("../evil.bin", size=3), "'..' component"),
    (_info(f"{BIN}/../../evil.bin", size=3), "'..' component"),
    (_info("/tmp/minicnn-evil.bin", size=3), "absolute path"),
    (_info(f"{BIN}/evil", tarfile.SYMTYPE, linkname="/etc/passwd"), "a link"),
    (_info(f"{BIN}/evil", tarfile.LNKTYPE, linkname="../../x"), "a link"),
    (_info(f"{BIN}/evil", tarfile.CHRTYPE), "special file"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_archive_members_reject_the_archive(isolated, member, match):
    data = b"bad" if member.isfile() else None
    (isolated / BIN_TGZ).write_bytes(tar_gz(batch_files("binary"), BIN, [(member, data)]))
    with pytest.raises(CIFARFormatError, match=match) as e:
        CIFAR10(isolated, download=False)
    assert str(isolated / BIN_TGZ) in str(e.value)
    assert all_files(isolated) == [BIN_TGZ]  # nothing unpacked, no temporary folder left
    assert not (isolated.parent / "evil.bin").exists()
    assert not Path("/tmp/minicnn-evil.bin").exists()


GOOD_TGZ = tar_gz(batch_files("binary"), BIN)


@pytest.mark.parametrize("data", [
    GOOD_TGZ[:len(GOOD_TGZ) // 2],
    GOOD_TGZ[:100] + bytes(b ^ 0x5A for b in GOOD_TGZ[100:300]) + GOOD_TGZ[300:],
    b"this is not an archive at all" * 10,
    b"",
], ids=["truncated", "corrupt", "not-an-archive", "empty"])
def test_corrupt_archive_raises_and_leaves_nothing(isolated, data):
    (isolated / BIN_TGZ).write_bytes(data)
    with pytest.raises(CIFARFormatError, match="truncated or corrupt") as e:
        CIFAR10(isolated, download=False)
    assert str(isolated / BIN_TGZ) in str(e.value) and isinstance(e.value, ValueError)
    assert all_files(isolated) == [BIN_TGZ]
    assert sorted(p.name for p in isolated.iterdir()) == [BIN_TGZ]


def test_archive_without_the_batches_raises(isolated):
    files = batch_files("binary")
    del files["data_batch_4.bin"]
    (isolated / BIN_TGZ).write_bytes(tar_gz(files, BIN))
    with pytest.raises(CIFARFormatError, match=f"{BIN}/data_batch_4.bin"):
        CIFAR10(isolated, download=False)


def test_extract_writes_only_the_top_folders_files(tmp_path):
    extra = [(_info("elsewhere/x.bin", size=1), b"x"), (_info(f"{BIN}/sub/y.bin", size=1), b"y")]
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({"data_batch_1.bin": b"z"}, BIN, extra))
    folder = extract_cifar_archive(archive, tmp_path / "out", BIN)
    assert folder == tmp_path / "out" / BIN
    assert all_files(tmp_path / "out") == [f"{BIN}/data_batch_1.bin"]


# --- bad batch files ---------------------------------------------------------------------------

IMAGES, LABELS = split("test_batch")
GOOD_BIN = bin_bytes(IMAGES, LABELS)
GOOD_PKL = py3_pickle(IMAGES, LABELS)


def _pickle_of(**changes):
    d = {b"data": IMAGES.reshape(N, -1), b"labels": LABELS.tolist(), b"batch_label": b"x"}
    d.update({k.encode(): v for k, v in changes.items()})
    return pickle.dumps(d, protocol=2)


@pytest.mark.parametrize("content, match", [
    (GOOD_BIN[:-1], "records of 3073 bytes.*3072 bytes past the last whole record"),
    (GOOD_BIN[:-3073], "expected 4 records of 3073 bytes, got 3"),
    (GOOD_BIN + GOOD_BIN[:3073], "expected 4 records of 3073 bytes, got 5"),
    (bytes([2]) * (3074 * 4), "records of 3073 bytes"),  # CIFAR-100 records: 2 label bytes
    (GOOD_BIN[:3073] + bytes([10]) + GOOD_BIN[3074:], "label bytes in 0..9, got 10 in record 1"),
    (b"", "empty file"),
    (GOOD_PKL[:-1], "truncated or corrupt"),
    (GOOD_PKL[:len(GOOD_PKL) // 2], "truncated or corrupt"),
    (GOOD_PKL + b"\x00", "end after the pickle"),
    (pickle.dumps([1, 2, 3], protocol=2), "expected a pickled dict, got list"),
    (pickle.dumps({b"labels": [1]}, protocol=2), "b'data' and b'labels'"),
    (_pickle_of(data=IMAGES.reshape(N, -1)[:, :3000]), r"shape \(N, 3072\), got shape \(4, 3000\)"),
    (_pickle_of(data=IMAGES.reshape(N, -1)[:3]), "expected 4 records, got 3"),
    (_pickle_of(labels=LABELS.tolist()[:3]), "expected 4 labels"),
    (_pickle_of(labels=[0, 1, 2, 12]), "labels in 0..9"),
    (_pickle_of(labels=[0, 1, 2, "3"]), "list of ints"),
    (_pickle_of(data=IMAGES.reshape(N, -1).astype(np.float32)), "uint8"),
    (_pickle_of(data=IMAGES.reshape(N, -1).astype(np.int64)), "uint8"),
], ids=["bin-truncated-byte", "bin-truncated-record", "bin-overlong", "bin-cifar100",
        "bin-label", "empty", "pkl-truncated-stop", "pkl-truncated-half", "pkl-trailing",
        "pkl-list", "pkl-no-data", "pkl-record-size", "pkl-count", "pkl-label-count",
        "pkl-label-range", "pkl-label-type", "pkl-float-data", "pkl-int64-data"])
def test_bad_batch_files_raise_naming_the_file(isolated, content, match):
    path = isolated / "test_batch"
    path.write_bytes(content)
    with pytest.raises(CIFARFormatError, match=match) as e:
        read_cifar_batch(path, records=N)
    assert str(path) in str(e.value) and isinstance(e.value, ValueError)


def test_bad_file_in_a_folder_fails_the_dataset(isolated):
    files = batch_files("binary")
    files["data_batch_2.bin"] = files["data_batch_2.bin"][:-5]
    write_folder(isolated / BIN, files)
    with pytest.raises(CIFARFormatError, match="data_batch_2.bin"):
        CIFAR10(isolated, download=False)


def test_real_record_count_is_required_by_default(tmp_path):
    write_folder(tmp_path / BIN, batch_files("binary"))  # 4 records, not 10000
    with pytest.raises(CIFARFormatError, match="expected 10000 records"):
        CIFAR10(tmp_path, train=False, download=False)


# --- the restricted unpickler refuses to run anything ------------------------------------------

class Evil:
    """An object whose unpickling runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Plain:
    """An ordinary object: unpickling it needs its class, a global."""

    def __init__(self):
        self.data = 1


@pytest.mark.parametrize("make, named", [
    (lambda m: {b"data": Evil(m), b"labels": []}, "system"),
    (lambda m: {b"data": Plain(), b"labels": []}, r"copy_?reg\._reconstructor|test_cifar\.Plain"),
    (lambda m: {b"data": IMAGES.reshape(N, -1), b"labels": LABELS.tolist(), b"x": Plain},
     "test_cifar.Plain"),
    (lambda m: {b"labels": eval}, r"(__builtin__|builtins)\.eval"),
], ids=["os-system", "object", "class", "builtin"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_with_globals_is_rejected_and_nothing_runs(tmp_path, make, named, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(make(marker), protocol=protocol))
    with pytest.raises(CIFARFormatError, match="refused to load the global") as e:
        read_cifar_batch(path)
    assert re.search(named, str(e.value)) and str(path) in str(e.value)
    assert not marker.exists()
    # The same bytes would indeed have run the command under pickle.load.
    if named == "system" and os.name == "posix":
        pickle.loads(path.read_bytes())
        assert marker.exists()


@pytest.mark.parametrize("content, match", [
    # the stand-ins for allowed globals accept only what a uint8 array or b'' needs
    (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-8\x86R.", "'utf-8'"),
    (b"\x80\x02cbuiltins\nbytes\nJ\x00\x00\x00\x40\x85R.", "bytes"),
    (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8K\x00K\x01\x87R.", "'O8'"),
    (b"\x80\x02cnumpy\nndarray\nK\x01\x85R.", "numpy.ndarray"),
    # BUILD with slot state cannot rebind a stand-in's function for later loads
    (b"\x80\x02cnumpy\ndtype\nN}X\x03\x00\x00\x00_fncnumpy\nndarray\ns\x86b.",
     "refused to set '_fn'"),
    (b"\x80\x02cnumpy\ndtype\n}X\x03\x00\x00\x00_fnK\x01sb.", "truncated or corrupt"),
    (b"\x80\x02X\x01\x00\x00\x00aQ.", "persistent id"),
], ids=["encode-utf8", "bytes-size", "dtype-object", "ndarray-call", "build-slots",
        "build-dict", "persid"])
def test_allowed_globals_do_nothing_else(tmp_path, content, match):
    path = tmp_path / "batch"
    path.write_bytes(content)
    with pytest.raises(CIFARFormatError, match=match):
        read_cifar_batch(path)
    path.write_bytes(GOOD_PKL)  # and the reader still works afterwards
    np.testing.assert_array_equal(read_cifar_batch(path)[0], IMAGES)


# --- download from a local HTTP server ---------------------------------------------------------

ARCHIVES = {BIN_TGZ: tar_gz(batch_files("binary"), BIN),
            PY_TGZ: tar_gz(batch_files("python", py2_pickle), PY)}
MD5 = {k: "md5:" + hashlib.md5(v).hexdigest() for k, v in ARCHIVES.items()}


@pytest.fixture(scope="module")
def server():
    """Mirrors /good/, /trunc/, /corrupt/, /cut/, /missing/ (404) and /pyonly/ (no binary)."""
    with mirror_server(ARCHIVES, {f"/pyonly/{PY_TGZ}": ARCHIVES[PY_TGZ]}) as url:
        yield url


BAD_MIRRORS = ["http://127.0.0.1:1/", "missing", "trunc", "corrupt", "cut"]


def bad_mirrors(server):
    return [m if m.startswith("http") else f"{server}/{m}/" for m in BAD_MIRRORS]


def test_download_verifies_unpacks_and_keeps_the_archive(server, isolated):
    root = isolated / "root"
    ds = CIFAR10(root, mirrors=[f"{server}/good/"], checksums=MD5)
    assert ds.format == "binary" and ds.folder == root / "cifar-10" / BIN
    assert all_files(root) == sorted([f"cifar-10/{BIN_TGZ}"] +
                                     [f"cifar-10/{BIN}/{n}" for n in batch_files("binary")])
    assert (root / "cifar-10" / BIN_TGZ).read_bytes() == ARCHIVES[BIN_TGZ]
    images, labels = expected(TRAIN)
    np.testing.assert_allclose(ds.images, normalised(images), rtol=1e-6, atol=1e-6)
    test = CIFAR10(root, train=False, mirrors=[], checksums=MD5)  # found, no download
    np.testing.assert_array_equal(test.labels, expected(["test_batch"])[1])


def test_download_skips_bad_mirrors_into_the_cache(server, isolated):
    ds = CIFAR10(train=False, mirrors=bad_mirrors(server) + [f"{server}/good/"], checksums=MD5)
    cache = isolated / "cache" / "minicnn" / "cifar-10"
    assert ds.folder == cache / BIN
    assert BIN_TGZ in all_files(cache) and not any(".part" in f for f in all_files(isolated))
    np.testing.assert_array_equal(ds.labels, expected(["test_batch"])[1])


def test_download_falls_back_to_the_python_version(server, isolated):
    ds = CIFAR10(isolated, mirrors=[f"{server}/missing/", f"{server}/pyonly/"], checksums=MD5)
    assert ds.format == "python" and ds.folder == isolated / "cifar-10" / PY
    np.testing.assert_array_equal(ds.labels, expected(TRAIN)[1])
    assert not (isolated / "cifar-10" / BIN_TGZ).exists()


def test_download_all_mirrors_bad_raises_and_leaves_nothing(server, isolated):
    root = isolated / "root"
    mirrors = bad_mirrors(server)
    with pytest.raises(DatasetUnavailable) as e:
        CIFAR10(root, mirrors=mirrors, checksums=MD5)
    msg = str(e.value)
    for m in mirrors:
        assert m + BIN_TGZ in msg and m + PY_TGZ in msg
    for reason in ("404", "expected md5", "connection cut", "Connection refused", "MINICNN_DATA",
                   "root=", str(root), str(root / "cifar-10")):
        assert reason in msg, reason
    assert isinstance(e.value, RuntimeError)
    assert all_files(isolated) == []


def test_download_with_only_a_python_checksum_tries_only_that(server, isolated):
    ds = CIFAR10(isolated, train=False, mirrors=[f"{server}/good/"],
                 checksums={PY_TGZ: MD5[PY_TGZ]})
    assert ds.format == "python"


def test_checksum_table_must_name_an_archive(server, isolated):
    with pytest.raises(ValueError, match=BIN_TGZ):
        CIFAR10(isolated, mirrors=[f"{server}/good/"], checksums={"other.tar.gz": "md5:00"})


def test_default_source_is_the_official_archive():
    assert CIFAR10.mirrors == ["https://www.cs.toronto.edu/~kriz/"]
    assert CIFAR10.checksums == {BIN_TGZ: "md5:c32a1d4ab5d03f1284b67883e8d87530",
                                 PY_TGZ: "md5:c58f30108f718f92721af3b95e74349a"}


# --- the real files ----------------------------------------------------------------------------

def real_cifar(train):
    if not REAL_DATA:
        pytest.skip("MINICNN_DATA is not set: no real CIFAR-10 files to check")
    try:
        return CIFAR10(train=train, download=False)
    except DatasetUnavailable:
        pytest.skip("no CIFAR-10 under $MINICNN_DATA")


@pytest.mark.parametrize("train, n", [(True, 50000), (False, 10000)])
def test_real_cifar10_loads(train, n):
    ds = real_cifar(train)
    assert ds.images.shape == (n, 3, 32, 32) and ds.labels.shape == (n,)
    assert np.bincount(ds.labels).tolist() == [n // 10] * 10
    if train:  # the constants are the training set's per-channel mean and population std
        x = ds.images.astype(np.float64)
        np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0, atol=1e-3)
        np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1, atol=1e-3)


# --- augment -----------------------------------------------------------------------------------

def batch(b=6, c=3, h=8, w=7, dtype=np.float32, seed=0):
    """Unique values, so every crop and flip is identifiable."""
    return np.random.default_rng(seed).permutation(b * c * h * w).reshape(b, c, h, w).astype(dtype)


def crop_reference(x, size, padding, top, left):
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    h, w = size
    return np.stack([padded[i, :, top[i]:top[i] + h, left[i]:left[i] + w] for i in range(len(x))])


@pytest.mark.parametrize("shape", [(6, 3, 8, 7), (1, 3, 32, 32), (5, 1, 4, 4)])
def test_random_crop_with_no_padding_and_full_size_is_identity(shape):
    x = batch(*shape)
    out = augment.random_crop(x, size=shape[2:], padding=0)
    np.testing.assert_array_equal(out, x)
    assert out is not x and not np.shares_memory(out, x)
    if shape[2] == shape[3]:
        np.testing.assert_array_equal(augment.random_crop(x, size=shape[2], padding=0), x)


@pytest.mark.parametrize("b, size, padding", [(6, (8, 7), 2), (9, (5, 3), 1), (1, (8, 7), 4),
                                              (4, (2, 2), 0), (3, (12, 11), 2)])
def test_random_crop_lands_at_the_drawn_offsets(b, size, padding):
    x = batch(b)
    before = x.copy()
    minicnn.seed(3)
    out = augment.random_crop(x, size=size, padding=padding)
    minicnn.seed(3)
    g = backend.rng()
    top = g.integers(0, 8 + 2 * padding - size[0] + 1, size=b)
    left = g.integers(0, 7 + 2 * padding - size[1] + 1, size=b)
    assert out.shape == (b, 3) + size and out.dtype == x.dtype and out.flags.c_contiguous
    np.testing.assert_array_equal(out, crop_reference(x, size, padding, top, left))
    np.testing.assert_array_equal(x, before)


def test_random_crop_offsets_vary_and_pad_with_fill():
    x = batch(64, 1, 4, 4) + 1  # no zeros in the image: zeros are padding
    out = augment.random_crop(x, size=4, padding=2)
    zeros_per_sample = (out == 0).reshape(64, -1).sum(axis=1)
    assert len(np.unique(zeros_per_sample)) > 3 and zeros_per_sample.min() == 0
    assert zeros_per_sample.max() > 0
    out = augment.random_crop(x, size=4, padding=2, fill=-5.0)
    assert (out == 0).sum() == 0 and (out == -5).sum() > 0


def test_random_flip_flips_exactly_the_drawn_samples():
    x = batch(50)
    before = x.copy()
    minicnn.seed(11)
    out = augment.random_flip(x, p=0.3)
    minicnn.seed(11)
    flags = backend.rng().random(50) < 0.3
    assert 0 < flags.sum() < 50
    for i in range(50):
        np.testing.assert_array_equal(out[i], x[i, :, :, ::-1] if flags[i] else x[i])
    np.testing.assert_array_equal(x, before)
    assert out.flags.c_contiguous and not np.shares_memory(out, x)
    np.testing.assert_array_equal(augment.random_flip(x, p=0), x)
    np.testing.assert_array_equal(augment.random_flip(x, p=1), x[..., ::-1])


@pytest.mark.parametrize("transform", [augment.random_crop, augment.random_flip])
def test_augment_reproducible_under_seed_and_works_for_one_sample(transform):
    x = batch(8, 3, 32, 32, dtype=np.float64)
    minicnn.seed(5)
    a = transform(x)
    minicnn.seed(5)
    b = transform(x)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float64
    minicnn.seed(6)
    assert not np.array_equal(transform(x), a)
    one = transform(x[:1])
    assert one.shape[0] == 1 and one.shape[1] == 3


@pytest.mark.parametrize("call, match", [
    (lambda x: augment.random_crop(x[0]), r"\(B, C, H, W\)"),
    (lambda x: augment.random_flip(x[0]), r"\(B, C, H, W\)"),
    (lambda x: augment.random_crop(x, size=13, padding=2), "at most the padded image"),
    (lambda x: augment.random_crop(x, size=0), "size an integer >= 1"),
    (lambda x: augment.random_crop(x, size=4, padding=-1), "padding an integer >= 0"),
    (lambda x: augment.random_crop(x, size=4, padding=1.5), "padding an integer >= 0"),
    (lambda x: augment.random_flip(x, p=1.5), r"p a probability in \[0, 1\]"),
    (lambda x: augment.random_flip(x, p="0.5"), r"p a probability in \[0, 1\]"),
])
def test_augment_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(batch(2, 3, 8, 8))


def test_batches_applies_transforms_in_order_each_epoch():
    n = 10
    ds = ArrayDataset(batch(n, 1, 4, 4), np.arange(n))
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    calls = []

    def record(x):
        calls.append(len(x))
        return x + 1000

    aug = augment.batches(loader, record, augment.random_flip, lambda x: x * 2)
    assert len(aug) == len(loader) == 3 and aug.dataset is ds and aug.device == "cpu"
    for epoch in range(2):
        minicnn.seed(epoch)
        got = list(aug)
        minicnn.seed(epoch)
        order = backend.rng().permutation(n)
        assert [len(y) for _, y in got] == [4, 4, 2]
        ys = np.concatenate([y for _, y in got])
        np.testing.assert_array_equal(ys, order)
        for (x, y), start in zip(got, (0, 4, 8)):
            flags = backend.rng().random(len(y)) < 0.5
            src = (ds.images[y] + 1000)
            ref = np.where(flags[:, None, None, None], src[..., ::-1], src) * 2
            np.testing.assert_array_equal(x, ref)
    assert calls == [4, 4, 2, 4, 4, 2]
    with pytest.raises(TypeError, match="callables"):
        augment.batches(loader, "flip")


def test_batches_trains_with_fit():
    n = 16
    ds = ArrayDataset(batch(n, 3, 8, 8) / 1000, np.arange(n) % 2)
    model = minicnn.Sequential(minicnn.Flatten(), minicnn.Linear(3 * 6 * 6, 2))
    loader = augment.batches(DataLoader(ds, batch_size=8, shuffle=True),
                             partial(augment.random_crop, size=6, padding=0), augment.random_flip)
    optimizer = minicnn.SGD(model.parameters(), lr=0.1)
    history = minicnn.fit(model, minicnn.CrossEntropyLoss(), optimizer, loader, epochs=2,
                          progress=False, verbose=False)
    assert len(history) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("transform", [augment.random_crop, augment.random_flip])
def test_augment_on_gpu_matches_cpu(transform):
    reason = backend.cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    x = batch(16, 3, 32, 32)
    xg = backend.to_device(x, "cuda")
    minicnn.seed(9)
    cpu = transform(x)
    minicnn.seed(9)
    gpu = transform(xg)
    assert backend.device_of(gpu) == "cuda" and gpu.dtype == cpu.dtype
    np.testing.assert_array_equal(backend.to_numpy(gpu), cpu)
    np.testing.assert_array_equal(backend.to_numpy(xg), x)
