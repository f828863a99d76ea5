"""ONNX export (minicnn.onnx): onnxruntime computes what minicnn computes, and export behaves.

The models and the comparison are tools/onnx_table.py's, which writes the table of
docs/deploying.md: the same numbers are checked here. Tolerances: onnxruntime's float32 output
against minicnn's eval-mode float32 output, max |difference| <= 1e-5 * max |minicnn output|, and
the same bound against minicnn in float64 (measured: at most 8.4e-7 and 9.1e-7).
"""
import importlib.util
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

import minicnn
from minicnn import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Identity, Linear,
                     MaxPool2d, ReLU, Sequential, ShapeError)
from minicnn.errors import ExportError
from minicnn.models import lenet5, mnist_cnn, resnet18

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5          # max |onnxruntime - minicnn| / max |minicnn|

_spec = importlib.util.spec_from_file_location("onnx_table", ROOT / "tools" / "onnx_table.py")
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


@pytest.fixture
def onnx():
    return pytest.importorskip("onnx", reason='onnx is not installed (pip install "minicnn[onnx]")')


@pytest.fixture
def ort(onnx):
    return pytest.importorskip("onnxruntime",
                               reason='onnxruntime is not installed (pip install "minicnn[onnx]")')


def export(*args, **kwargs):
    from minicnn.onnx import export
    return export(*args, **kwargs)


def run(ort, path, x, input_name="input"):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: x})[0]


def inputs(shape, batch=3, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


# --- agreement --------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["plain", "fused"])
@pytest.mark.parametrize("name", list(table.CASES))
def test_onnxruntime_computes_what_minicnn_computes(name, form, tmp_path, onnx, ort):
    """One file with a dynamic batch, run at batch 1 and 7: the checker accepts it
    (full_check), and onnxruntime agrees with minicnn (eval, float32) and with float64."""
    model, shape = table.CASES[name]()
    reference = table.float64_copy(model)
    if form == "fused":
        model = minicnn.fuse(model)
    path = tmp_path / "model.onnx"
    rows = table.compare(model, shape, path, reference=reference)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    for row in rows:
        assert row["onnxruntime"].shape == row["minicnn"].shape
        assert row["minicnn"].shape[0] == row["batch"]
        assert row["onnx"] <= TOLERANCE, (name, form, row["batch"], row["onnx"])
        assert row["onnx_float64"] <= TOLERANCE, (name, form, row["batch"], row["onnx_float64"])
    assert [r["batch"] for r in rows] == [1, 7]


def test_the_random_stacks_hold_every_layer_and_fused_module():
    """What the random stacks exercise: rectangular kernels, strides, padding, padded average
    pools, every run minicnn.fuse rewrites and the layers it leaves alone."""
    from minicnn.fused.modules import FusedConv2d, FusedLinear, FusedMaxPool2d
    seen = set()
    for s in range(table.STACKS):
        model, _ = table.random_stack(s)
        for _, m in minicnn.fuse(model).named_modules():
            kind = type(m).__name__
            if isinstance(m, FusedConv2d):
                seen.add(f"FusedConv2d relu={m.relu} pool={type(m.pool).__name__}")
                seen.update({"rectangular kernel"} if m.kernel_size[0] != m.kernel_size[1] else ())
                seen.update({"stride"} if max(m.stride) > 1 else ())
                seen.update({"padding"} if max(m.padding) > 0 else ())
            elif isinstance(m, (FusedMaxPool2d, FusedLinear)):
                seen.add(f"{kind} relu={m.relu}")
            elif kind == "AdaptiveAvgPool2d":
                seen.add("global average pool" if m.output_size == (1, 1) else "adaptive pool")
            else:
                seen.add(kind)
            if kind == "AvgPool2d" and max(m.padding) > 0:
                seen.add("padded average pool")
    expected = {"FusedConv2d relu=True pool=MaxPool2d", "FusedConv2d relu=True pool=AvgPool2d",
                "FusedConv2d relu=False pool=AvgPool2d", "FusedConv2d relu=False pool=NoneType",
                "FusedConv2d relu=False pool=FusedMaxPool2d", "FusedMaxPool2d relu=True",
                "FusedLinear relu=True", "BatchNorm2d", "BatchNorm1d", "ReLU", "Dropout",
                "Identity", "Flatten", "Linear", "global average pool", "adaptive pool",
                "rectangular kernel", "stride", "padding", "padded average pool"}
    assert expected <= seen, expected - seen


def test_more_layer_settings_agree(tmp_path, ort):
    """BatchNorm without affine parameters (its scale and shift are constants), Flatten of the
    middle dimensions (a Reshape), a fixed batch, other names and opset 13."""
    minicnn.seed(3)
    model = Sequential(Conv2d(2, 4, 3, padding=1), BatchNorm2d(4, affine=False), ReLU(),
                       Flatten(start_dim=2), Flatten(), Linear(4 * 36, 3))
    table.randomize_batchnorm(model, seed=3)
    x = inputs((2, 6, 6), batch=5)
    proto = export(model, x, tmp_path / "m.onnx", opset=13, input_name="images",
                   output_name="logits", dynamic_batch=False)
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [5, 2, 6, 6]
    assert proto.opset_import[0].version == 13
    assert {"Reshape", "Flatten", "BatchNormalization"} <= {n.op_type for n in proto.graph.node}
    ours = table.eval_forward(model, x)
    assert table.relative(run(ort, tmp_path / "m.onnx", x, "images"), ours) <= TOLERANCE


def test_a_model_that_computes_nothing_is_one_identity_node(tmp_path, ort):
    proto = export(Sequential(Dropout(0.5), Identity()), inputs((3, 4, 4)), tmp_path / "m.onnx")
    assert [n.op_type for n in proto.graph.node] == ["Identity"]
    x = inputs((3, 4, 4), batch=2, seed=1)
    np.testing.assert_array_equal(run(ort, tmp_path / "m.onnx", x), x)


@pytest.mark.parametrize("dtype", [np.float32, "float32"])
def test_a_float64_model_exports_as_float32(dtype, tmp_path, ort, float64):
    """onnxruntime's CPU provider has no float64 convolution: dtype=float32 casts the weights."""
    model = mnist_cnn()
    x = inputs((1, 28, 28)).astype(np.float64)
    proto = export(model, x, tmp_path / "m.onnx", dtype=dtype)
    assert {t.data_type for t in proto.graph.initializer} == {1}          # FLOAT
    out = run(ort, tmp_path / "m.onnx", x.astype(np.float32))
    assert table.relative(out, table.eval_forward(model, x)) <= TOLERANCE


# --- the file ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
def test_initializers_are_the_state_dict(fused, tmp_path, onnx):
    """Named by the state_dict keys, in their order, with their values; BatchNorm's
    num_batches_tracked, a training counter that inference never reads, is left out (as
    torch.onnx.export does; onnxruntime would warn about an unused initializer)."""
    minicnn.seed(0)
    plain = table.randomize_batchnorm(resnet18())
    model = minicnn.fuse(plain) if fused else plain
    proto = export(model, inputs((3, 32, 32), batch=1), tmp_path / "r.onnx")
    state = model.state_dict()
    assert state.keys() == plain.state_dict().keys()
    names = [t.name for t in proto.graph.initializer]
    assert names == [k for k in state if not k.endswith("num_batches_tracked")]
    assert "layer3.1.conv2.weight" in names and "layer2.0.downsample.1.running_var" in names
    for t in proto.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), state[t.name])
    assert [i.name for i in proto.graph.input] == ["input"]       # initializers are not inputs
    assert [o.name for o in proto.graph.output] == ["output"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_the_file_names_minicnn_and_its_version(tmp_path, onnx):
    proto = export(lenet5(), inputs((1, 28, 28)), str(tmp_path / "l.onnx"))
    loaded = onnx.load(str(tmp_path / "l.onnx"))
    assert loaded == proto
    assert loaded.producer_name == "minicnn" and loaded.producer_version == minicnn.__version__
    props = {p.key: p.value for p in loaded.metadata_props}
    assert props == {"minicnn_version": minicnn.__version__, "minicnn_model": "Sequential"}
    assert loaded.opset_import[0].version == 17
    assert loaded.ir_version == onnx.helper.find_min_ir_version_for(list(loaded.opset_import))
    assert {n.op_type for n in loaded.graph.node} == {"Conv", "Relu", "AveragePool", "Flatten",
                                                       "Gemm"}
    pools = [n for n in loaded.graph.node if n.op_type == "AveragePool"]
    assert all(onnx.helper.get_node_attr_value(n, "count_include_pad") == 1 for n in pools)


# --- what export refuses ----------------------------------------------------------------------

class Swish(minicnn.Module):
    def forward(self, x):
        return x / (1 + np.exp(-x))


class ScaledConv(Conv2d):
    """A subclass with a forward of its own: it computes something else than Conv2d."""

    def forward(self, x):
        return 2 * super().forward(x)


class NamedConv(Conv2d):
    """A subclass that keeps Conv2d's forward: exported as a Conv2d."""


@pytest.mark.parametrize("layer", [Swish(), ScaledConv(256, 256, 3, padding=1, bias=False)])
def test_an_unsupported_layer_is_named_by_its_path_and_type(layer, tmp_path, onnx):
    model = resnet18()
    model.layer3[1].conv2 = layer
    with pytest.raises(ExportError) as info:
        export(model, inputs((3, 32, 32), batch=1), tmp_path / "r.onnx")
    message = str(info.value)
    assert f"'layer3.1.conv2' is a {type(layer).__name__}" in message
    assert "supported: Conv2d, Linear, ReLU" in message and "BasicBlock" in message
    assert list(tmp_path.iterdir()) == []            # nothing written, not even a temporary file


def test_a_subclass_that_keeps_the_forward_exports(tmp_path, ort):
    model = Sequential(NamedConv(1, 2, 3), ReLU(), Flatten(), Linear(2 * 4 * 4, 2))
    x = inputs((1, 6, 6))
    export(model, x, tmp_path / "m.onnx")
    ours = table.eval_forward(model, x)
    assert table.relative(run(ort, tmp_path / "m.onnx", x), ours) <= TOLERANCE


def test_a_failed_export_leaves_the_old_file_and_no_other(tmp_path, monkeypatch, onnx):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"the previous file")
    with pytest.raises(ExportError):
        export(Sequential(Conv2d(1, 2, 3), Swish()), inputs((1, 6, 6)), path)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):          # the write itself fails
        export(mnist_cnn(), inputs((1, 28, 28)), path)
    assert path.read_bytes() == b"the previous file" and list(tmp_path.iterdir()) == [path]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(mnist_cnn(), inputs((1, 28, 28)), tmp_path / "no" / "m.onnx")


@pytest.mark.parametrize("layer, shape, message", [
    (AdaptiveAvgPool2d(3), (2, 10, 9), "pools the 10x9 input to 3x3"),
    (BatchNorm2d(2, track_running_stats=False), (2, 4, 4), "has no running statistics"),
    (Flatten(start_dim=0), (2, 4, 4), "merges the batch dimension"),
])
def test_layers_without_an_onnx_equivalent_say_why(layer, shape, message, tmp_path, onnx):
    model = Sequential(ReLU(), Sequential(layer))
    with pytest.raises(ExportError, match=message) as info:
        export(model, inputs(shape), tmp_path / "m.onnx")
    assert f"'1.0' ({type(layer).__name__})" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_an_example_input_that_does_not_fit_names_the_layer(tmp_path, onnx):
    with pytest.raises(ShapeError, match=r"layer '0' \(Conv2d\).*expected 1 input channels"):
        export(mnist_cnn(), inputs((2, 28, 28)), tmp_path / "m.onnx")
    with pytest.raises(ShapeError, match=r"layer '7' \(Linear\)"):
        export(mnist_cnn(), inputs((1, 32, 32)), tmp_path / "m.onnx")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(opset=12), ValueError, "opset must be an int from 13"),
    (dict(input_name="0.weight"), ValueError, "not a state_dict key"),
    (dict(output_name="input"), ValueError, "must differ"),
    (dict(dtype=np.int32), ExportError, "int32 is not supported"),
])
def test_export_checks_its_arguments(kwargs, error, message, tmp_path, onnx):
    with pytest.raises(error, match=message):
        export(mnist_cnn(), inputs((1, 28, 28)), tmp_path / "m.onnx", **kwargs)
    with pytest.raises(TypeError, match="example_input must be an array"):
        export(mnist_cnn(), (1, 1, 28, 28), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="model must be a minicnn Module"):
        export(lambda x: x, inputs((1, 28, 28)), tmp_path / "m.onnx")


# --- the model stays as it was ----------------------------------------------------------------

def test_export_changes_nothing_of_the_model(tmp_path, onnx):
    """A training-mode model with a forward pending its backward: after export, the mode of
    every module, the caches and every value are as they were, and backward still runs."""
    minicnn.seed(0)
    model = table.randomize_batchnorm(
        Sequential(Conv2d(1, 4, 3), BatchNorm2d(4), ReLU(), MaxPool2d(2), Flatten(),
                   Linear(4 * 3 * 3, 3)))
    x = inputs((1, 8, 8), batch=4)
    model(x)
    caches = {name: id(m._cache) for name, m in model.named_modules()}
    state = model.state_dict()
    export(model, x, tmp_path / "m.onnx")
    assert all(m.training for _, m in model.named_modules())
    assert {name: id(m._cache) for name, m in model.named_modules()} == caches
    after = model.state_dict()
    assert all(np.array_equal(after[k], v) for k, v in state.items())
    model.backward(np.ones((4, 3), np.float32))
    model.eval()
    export(model, x, tmp_path / "m.onnx")
    assert not any(m.training for _, m in model.named_modules())


# --- without onnx ------------------------------------------------------------------------------

def test_without_onnx_the_error_says_what_to_install(monkeypatch):
    """minicnn.onnx imports without onnx; export then says which extra to install."""
    import minicnn.onnx as exporter
    monkeypatch.setitem(sys.modules, "onnx", None)          # import onnx -> ImportError
    with pytest.raises(ImportError, match=r'pip install "minicnn\[onnx\]"'):
        exporter.export(mnist_cnn(), inputs((1, 28, 28)), "never-written.onnx")
    assert 'pip install "minicnn[onnx]"' in exporter.unavailable_reason()
    assert not os.path.exists("never-written.onnx")


def test_importing_minicnn_does_not_import_onnx():
    import subprocess
    code = "import minicnn, minicnn.onnx, sys; print('onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --- the example and the table tool -------------------------------------------------------------

def test_the_mnist_example_exports_what_it_trained(tmp_path, monkeypatch, capsys, ort):
    """One epoch on the bundled sample (no MNIST on disk, no network), then --export-onnx:
    onnxruntime's accuracy on the sample's test images is the example's own."""
    monkeypatch.delenv("MINICNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(minicnn.MNIST, "mirrors", ["http://127.0.0.1:9/"])   # refused at once
    example = runpy.run_path(str(ROOT / "examples" / "mnist.py"))
    path = tmp_path / "mnist.onnx"
    history = example["main"](["--epochs", "1", "--batch-size", "256", "--no-progress",
                               "--data-dir", str(tmp_path), "--export-onnx", str(path)])
    assert f"ONNX model written to {path}" in capsys.readouterr().out
    test = minicnn.mnist_sample(train=False)
    predicted = run(ort, path, test.images).argmax(axis=1)
    accuracy = float((predicted == test.labels).mean())
    # argmax may flip on a near tie between two logits: one image in 1,000 either way
    assert abs(accuracy - history.epochs[-1]["val_accuracy"]) <= 0.001


def test_the_table_tool_rewrites_only_its_table(tmp_path, ort, capsys):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nbefore\n\n{table.BEGIN}\nold table\n{table.END}\n\nafter\n")
    table.main(["--models", "lenet5", "--docs", str(page)])
    text = page.read_text()
    assert text.startswith(f"# Title\n\nbefore\n\n{table.BEGIN}\n| model |")
    assert text.endswith(f"{table.END}\n\nafter\n") and "old table" not in text
    assert text.count("| lenet5 | 1x28x28 |") == 2 and "onnxruntime" in capsys.readouterr().out
