"""load_torch_weights: .safetensors (bytes written here by hand, following the format's
specification) and .npz round trips, dtype decoding, name mapping, and every kind of bad file
rejected with a WeightsError that names the file, before the model is touched."""
import json
import struct

import numpy as np
import pytest

from minicnn import Conv2d, Flatten, Linear, ReLU, Sequential
from minicnn.normalization import BatchNorm1d, BatchNorm2d
from minicnn.weights import IncompatibleKeys, WeightsError, load_torch_weights, read_weights

DTYPE_NAMES = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
               np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("u1"): "U8"}


def safetensors_bytes(tensors, metadata=None, dtypes=None, pad=0):
    """The bytes of a .safetensors file: 8-byte little-endian header length, JSON header with
    dtype/shape/data_offsets, then the raw little-endian data, tensors back to back."""
    header, chunks, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        dtype = (dtypes or {}).get(name) or DTYPE_NAMES[array.dtype.newbyteorder("<")]
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode("utf-8") + b" " * pad     # the format allows space padding
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def small_net():
    """Conv, BatchNorm (with buffers), Linear: every kind of state a CNN has."""
    return Sequential(Conv2d(2, 3, 3), BatchNorm2d(3), ReLU(), Flatten(), Linear(12, 4),
                      BatchNorm1d(4))


def trained_state(seed=0):
    """A state_dict with values unlike any fresh model's (PyTorch's names, float32 and int64)."""
    rng = np.random.default_rng(seed)
    state = {k: (rng.standard_normal(v.shape).astype(np.float32) if v.dtype.kind == "f"
                 else np.array(7 + seed, dtype=np.int64))
             for k, v in small_net().state_dict().items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = np.abs(state[k]) + 0.5
    return state


def assert_state(model, state):
    own = model.state_dict()
    assert list(own) == list(state)
    for k, v in state.items():
        np.testing.assert_array_equal(own[k], v, err_msg=k)
        assert own[k].dtype == small_net().state_dict()[k].dtype     # model's dtype kept


@pytest.fixture
def model():
    return small_net()


def snapshot(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


# --- round trips ----------------------------------------------------------------------------------

def test_safetensors_round_trip(tmp_path, model):
    state = trained_state()
    path = tmp_path / "net.safetensors"
    path.write_bytes(safetensors_bytes(state, metadata={"format": "pt"}, pad=5))
    result = load_torch_weights(model, path)
    assert result == IncompatibleKeys([], []) and isinstance(result, tuple)
    assert_state(model, state)
    assert int(model[1].num_batches_tracked) == 7
    x = np.random.default_rng(1).standard_normal((2, 2, 4, 4)).astype(np.float32)
    assert model.eval()(x).shape == (2, 4)


def test_npz_round_trip_and_float64_values(tmp_path, model):
    state = {k: v.astype(np.float64) if v.dtype.kind == "f" else v
             for k, v in trained_state(1).items()}
    path = tmp_path / "net.npz"
    np.savez(path, **state)
    load_torch_weights(model, path)
    assert_state(model, {k: v.astype(np.float32) if v.dtype.kind == "f" else v
                         for k, v in state.items()})


def test_safetensors_file_without_extension_and_npz_detected_by_content(tmp_path, model):
    state = trained_state(2)
    a, b = tmp_path / "weights_a", tmp_path / "weights_b"
    a.write_bytes(safetensors_bytes(state))
    with open(b, "wb") as f:
        np.savez(f, **state)
    for path in (a, b):
        fresh = small_net()
        load_torch_weights(fresh, path)
        assert_state(fresh, state)


# --- dtypes ---------------------------------------------------------------------------------------

def test_dtypes_are_decoded(tmp_path):
    values = np.array([[1.5, -2.0, 3.140625], [0.0, 4096.0, -0.25]])
    f16 = values.astype("<f2")
    bf16 = (values.astype("<f4").view("<u4") >> 16).astype("<u2")    # exact: 8 mantissa bits
    tensors = {"f64": values.astype("<f8"), "f32": values.astype("<f4"), "f16": f16,
               "bf16": bf16, "i64": np.array([-3, 2**40], dtype="<i8"),
               "i32": np.array([5, -6], dtype="<i4"), "u8": np.array([0, 255], dtype="u1"),
               "scalar": np.array(42, dtype="<i8")}
    path = tmp_path / "dtypes.safetensors"
    path.write_bytes(safetensors_bytes(tensors, dtypes={"bf16": "BF16"}))
    got = read_weights(path)
    assert list(got) == list(tensors)
    for name in ("f64", "f32", "f16", "bf16"):
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    assert got["f16"].dtype == np.float16 and got["bf16"].dtype == np.float32
    assert got["f64"].dtype == np.float64 and got["f32"].dtype == np.float32
    np.testing.assert_array_equal(got["i64"], [-3, 2**40])
    assert got["i64"].dtype == np.int64 and got["u8"].dtype == np.uint8
    assert got["scalar"].shape == () and int(got["scalar"]) == 42


def test_bfloat16_matches_pytorch(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: the bfloat16 check "
                                                "needs it")
    values = torch.tensor(np.random.default_rng(3).standard_normal(50) * 100).to(torch.bfloat16)
    raw = values.view(torch.int16).numpy().view("<u2")
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(safetensors_bytes({"w": raw}, dtypes={"w": "BF16"}))
    np.testing.assert_array_equal(read_weights(path)["w"], values.float().numpy())


# --- names ----------------------------------------------------------------------------------------

def test_rename_maps_and_drops_names(tmp_path, model):
    state = trained_state(3)
    stored = {f"module.{k}": v for k, v in state.items()}      # a DataParallel checkpoint
    stored["module.aux_head.weight"] = np.ones((2, 2), dtype=np.float32)
    path = tmp_path / "dp.safetensors"
    path.write_bytes(safetensors_bytes(stored))
    snap = snapshot(model)
    with pytest.raises(WeightsError, match=r"missing keys \['0.weight'.*unexpected keys "
                                           r"\['module.0.weight'.*pass rename="):
        load_torch_weights(model, path)
    assert_state(model, snap)

    def rename(name):
        return None if "aux_head" in name else name.removeprefix("module.")
    load_torch_weights(model, path, rename=rename)
    assert_state(model, state)
    with pytest.raises(WeightsError, match=r"two entries are named 'x' after rename"):
        load_torch_weights(small_net(), path, rename=lambda k: "x")
    with pytest.raises(TypeError, match=r"rename must be a callable"):
        load_torch_weights(small_net(), path, rename="module.")


def test_num_batches_tracked_is_forgiven_both_ways(tmp_path, model):
    state = trained_state(4)
    older = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.safetensors"
    path.write_bytes(safetensors_bytes(older))
    load_torch_weights(model, path)
    assert int(model[1].num_batches_tracked) == 0                  # the model's own count kept
    assert_state(model, {**state, "1.num_batches_tracked": np.array(0),
                         "5.num_batches_tracked": np.array(0)})
    # a model without running statistics ignores the file's counters (and nothing else)
    plain = Sequential(Conv2d(2, 3, 3), BatchNorm2d(3, track_running_stats=False))
    tensors = {"0.weight": state["0.weight"], "0.bias": state["0.bias"],
               "1.weight": state["1.weight"], "1.bias": state["1.bias"],
               "1.num_batches_tracked": np.array([5], dtype=np.int64)}
    path2 = tmp_path / "counter.npz"
    np.savez(path2, **tensors)
    assert load_torch_weights(plain, path2) == IncompatibleKeys([], [])
    # a counter saved with shape (1,) (older PyTorch) loads into the () buffer
    tracked = Sequential(Conv2d(2, 3, 3), BatchNorm2d(3))
    np.savez(path2, **tensors, **{"1.running_mean": state["1.running_mean"],
                                  "1.running_var": state["1.running_var"]})
    load_torch_weights(tracked, path2)
    assert int(tracked[1].num_batches_tracked) == 5


def test_strict_false_returns_what_was_left_out(tmp_path, model):
    state = trained_state(5)
    partial = {k: v for k, v in state.items() if not k.startswith("4.")}
    partial["head.weight"] = np.ones(3, dtype=np.float32)
    path = tmp_path / "partial.safetensors"
    path.write_bytes(safetensors_bytes(partial))
    snap = snapshot(model)
    result = load_torch_weights(model, path, strict=False)
    assert result.missing_keys == ["4.weight", "4.bias"]
    assert result.unexpected_keys == ["head.weight"]
    own = model.state_dict()
    np.testing.assert_array_equal(own["0.weight"], state["0.weight"])
    np.testing.assert_array_equal(own["4.weight"], snap["4.weight"])   # untouched


# --- bad files ------------------------------------------------------------------------------------

def _bad_header(state, **changes):
    """A valid file, then the header entry of "0.weight" edited."""
    data = safetensors_bytes(state)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["0.weight"].update(changes)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


BAD_FILES = [  # name, bytes from a good file's bytes, message
    ("empty", lambda good, s: b"", r"fewer than the 8 of the header length"),
    ("short header", lambda good, s: good[:20], r"only 12 follow \(truncated\?\)"),
    ("truncated data", lambda good, s: good[:-10],
     r"'5.running_var' ends at byte 556 of the data but the data has only 554 bytes \(truncated"),
    ("huge header length", lambda good, s: struct.pack("<Q", 2**62) + good[8:], r"implausible"),
    ("not json", lambda good, s: struct.pack("<Q", 4) + b"{no}" + good[8:], r"not JSON"),
    ("json list", lambda good, s: struct.pack("<Q", 2) + b"[]", r"a JSON list, not an object"),
    ("unknown dtype", lambda good, s: _bad_header(s, dtype="F8_E4M3"),
     r"'0.weight' has dtype 'F8_E4M3', which is not supported"),
    ("offsets disagree with shape", lambda good, s: _bad_header(s, shape=[3, 2, 3, 2]),
     r"'0.weight' is F32\[3, 2, 3, 2\] \(144 bytes\) but its data_offsets span 216 bytes"),
    ("bad shape", lambda good, s: _bad_header(s, shape=[-1]), r"shape \[-1\]"),
    ("no offsets", lambda good, s: _bad_header(s, data_offsets=None), r"lacks dtype, shape"),
    ("a pickle", lambda good, s: b"\x80\x02}q\x00(X\x05" + good[8:], r"a PyTorch pickle\?"),
]


@pytest.mark.parametrize("name,make,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_safetensors_files_raise_and_change_nothing(tmp_path, model, name, make, message):
    state = trained_state(6)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(safetensors_bytes(state), state))
    snap = snapshot(model)
    with pytest.raises(WeightsError, match=message) as info:
        load_torch_weights(model, path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)
    assert_state(model, snap)


def test_mismatched_weights_raise_and_change_nothing(tmp_path, model):
    state = trained_state(7)
    snap = snapshot(model)
    cases = [
        ({k: v for k, v in state.items() if k != "4.bias"}, r"missing keys \['4.bias'\]"),
        ({**state, "extra.weight": np.ones(2, dtype=np.float32)},
         r"unexpected keys \['extra.weight'\]"),
        ({**state, "5.running_var": np.ones(5, dtype=np.float32)},    # the last one written
         r"'5.running_var' has shape \(5,\) in the file, \(4,\) in the model"),
    ]
    for i, (tensors, message) in enumerate(cases):
        path = tmp_path / f"mismatch{i}.safetensors"
        path.write_bytes(safetensors_bytes(tensors))
        with pytest.raises(WeightsError, match=message) as info:
            load_torch_weights(model, path)
        assert str(path) in str(info.value) and "does not fit Sequential" in str(info.value)
        assert_state(model, snap)
    # the same checks for an .npz
    path = tmp_path / "mismatch.npz"
    np.savez(path, **{**state, "0.weight": np.ones((3, 2, 2, 2), dtype=np.float32)})
    with pytest.raises(WeightsError, match=r"'0.weight' has shape \(3, 2, 2, 2\)"):
        load_torch_weights(model, path)
    assert_state(model, snap)


def test_bad_npz_files_raise(tmp_path, model):
    state = trained_state(8)
    good = tmp_path / "good.npz"
    np.savez(good, **state)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    objects = tmp_path / "objects.npz"
    np.savez(objects, **{**state, "0.weight": np.array([{"a": 1}], dtype=object)})
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:            # a file object: np.save adds no ".npy"
        np.save(f, state["0.weight"])
    snap = snapshot(model)
    for path, message in [(truncated, r"not a readable .npz archive"),
                          (objects, r"not a readable .npz archive .*Python objects"),
                          (single, r"a single .npy array")]:
        with pytest.raises(WeightsError, match=message) as info:
            load_torch_weights(model, path)
        assert str(path) in str(info.value)
        assert_state(model, snap)


def test_pickles_are_refused(tmp_path, model):
    path = tmp_path / "resnet.pth"
    path.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(WeightsError, match=r"PyTorch pickle .* not read .*safetensors"):
        load_torch_weights(model, path)
    with pytest.raises(FileNotFoundError):
        load_torch_weights(model, tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match=r"model must be a minicnn Module"):
        load_torch_weights(object(), path)


def test_torch_zip_checkpoint_is_refused(tmp_path, model):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: needs torch.save")
    path = tmp_path / "weights.bin"             # a zip archive whose extension says nothing
    torch.save({"0.weight": torch.ones(2)}, path)
    with pytest.raises(WeightsError, match=r"PyTorch pickle"):
        load_torch_weights(model, path)
