"""ONNX export: ``export(model, example_input, path)`` writes a minicnn model as an ONNX file that
onnxruntime, TensorRT and other ONNX runtimes run, called as ``torch.onnx.export(model, args, f)``.

The graph computes what the model's eval-mode forward computes, one ONNX operator (or a few) per
layer::

    Conv2d                 Conv
    Linear                 Gemm (transB=1)
    ReLU                   Relu
    MaxPool2d              MaxPool (padding never wins, in minicnn as in ONNX)
    AvgPool2d              AveragePool, count_include_pad=1 (minicnn counts padded zeros)
    AdaptiveAvgPool2d      GlobalAveragePool for 1x1; AveragePool when the output divides the input
    BatchNorm1d/2d         BatchNormalization with the running statistics
    Flatten                Flatten (Reshape unless start_dim=1 and end_dim=-1)
    Dropout, Identity      nothing
    BasicBlock             its layers, then Add and Relu
    ResNet                 its layers, Flatten, Gemm
    Sequential (and VGG)   its layers in order
    FusedConv2d, FusedLinear, FusedMaxPool2d (minicnn.fuse)   the layers they were made from

Every initializer is named by its ``state_dict`` key ("0.weight", "bn1.running_var"), so a file
and a checkpoint of one model speak of the same tensors. The ``onnx`` package (``pip install
"minicnn[onnx]"``) is imported when ``export`` runs, never by ``import minicnn``.
"""
import math
import os
import sys

import numpy as np

from .backend import to_numpy
from .blocks import BasicBlock
from .errors import ExportError, ShapeError
from .io import write_atomic
from .fused.modules import FusedConv2d, FusedLinear, FusedMaxPool2d
from .layers import (AdaptiveAvgPool2d, AvgPool2d, Conv2d, Dropout, Flatten, Identity, Linear,
                     MaxPool2d, ReLU)
from .models import ResNet
from .module import Module, Parameter, Sequential
from .normalization import BatchNorm1d, BatchNorm2d

DEFAULT_OPSET = 17
MIN_OPSET = 13          # every operator and attribute used here has its present meaning from 13 on
BATCH = "batch"         # the name of the dynamic first dimension of the input and the output


def unavailable_reason():
    """None when the ``onnx`` package imports, else why it does not and what to install."""
    try:
        _import_onnx()
    except ImportError as e:
        return str(e)
    return None


def _import_onnx():
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
        import onnx.shape_inference
    except ImportError as e:
        raise ImportError(f"minicnn.onnx needs the onnx package, which does not import here "
                          f"({e}); install it with: pip install \"minicnn[onnx]\"") from e
    return onnx


def export(model, example_input, path, opset=DEFAULT_OPSET, input_name="input",
           output_name="output", dynamic_batch=True, dtype=None):
    """Write ``model`` to ``path`` (str or path-like) as an ONNX model; returns the ModelProto.

    ``example_input`` is an array (B, ...) the model takes, e.g. (1, 1, 28, 28) for mnist_cnn:
    only its shape is read, which fixes every input dimension but the first. With
    ``dynamic_batch`` the first dimension of the input and of the output is named "batch" and
    any batch size runs; without it the file takes the example's batch alone. The graph has the
    eval-mode semantics (BatchNorm's running statistics, no dropout) whatever ``model.training``
    is. It computes in ``dtype``, the parameters' own when None (float32 unless set otherwise);
    onnxruntime's CPU provider runs convolutions in float32 alone, so a float64 model is exported
    for it with ``dtype=numpy.float32``.

    Nothing of the model changes: no forward runs, so mode, caches and statistics stay as they
    are. The model is checked (``onnx.checker.check_model(full_check=True)``) before anything is
    written, and the file is written to a temporary name beside ``path`` and renamed, so a
    failed export leaves no file and never half of one.

    Raises ``ExportError`` naming the layer (its path in the model, e.g. "layer3.1.conv2") and
    its type for a layer with no ONNX counterpart, and ``ShapeError`` when the example input
    does not fit the model. Needs ``pip install "minicnn[onnx]"``.
    """
    onnx = _import_onnx()
    if not isinstance(model, Module):
        raise TypeError(f"export: model must be a minicnn Module, got {type(model).__name__}")
    if not (hasattr(example_input, "shape") and hasattr(example_input, "dtype")):
        raise TypeError(f"export: example_input must be an array the model takes, e.g. of shape "
                        f"(1, 1, 28, 28), got {type(example_input).__name__}")
    if np.dtype(example_input.dtype).kind != "f" or len(example_input.shape) < 1:
        raise ValueError(f"export: example_input must be a floating array (B, ...), got dtype "
                         f"{example_input.dtype} and shape {tuple(example_input.shape)}")
    newest = onnx.defs.onnx_opset_version()
    if not (isinstance(opset, int) and MIN_OPSET <= opset <= newest):
        raise ValueError(f"export: opset must be an int from {MIN_OPSET} to {newest} (the newest "
                         f"this onnx {onnx.__version__} knows), got {opset!r}")
    keys = [name for name, _ in model._named_state()]
    for arg, name in (("input_name", input_name), ("output_name", output_name)):
        if not isinstance(name, str) or not name or name in keys:
            raise ValueError(f"export: {arg} must be a non-empty string that is not a state_dict "
                             f"key of the model, got {name!r}")
    if input_name == output_name:
        raise ValueError(f"export: input_name and output_name must differ, both are {input_name!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"export: directory {directory!r} does not exist")

    dtype = _dtype(model, example_input) if dtype is None else _float_dtype(dtype)
    graph = _Graph(onnx, dtype, {input_name, output_name, *keys}, dynamic_batch)
    in_shape = tuple(int(n) for n in example_input.shape)
    y, out_shape = graph.emit(model, "", input_name, in_shape)
    expected = tuple(model.output_shape(in_shape))
    if out_shape != expected:     # the graph's shapes must be the model's own
        raise ExportError(f"export: the exported graph gives shape {out_shape} for input "
                          f"{in_shape}, but {type(model).__name__}.output_shape says {expected}")
    graph.output(y, output_name)

    helper, version = onnx.helper, _version()
    order = {name: i for i, name in enumerate(keys)}
    stray = sorted(set(graph.initializers) - set(order))
    if stray:
        raise ExportError(f"export: initializers {stray} are not state_dict keys of the model")
    initializers = sorted(graph.initializers.values(), key=lambda t: order[t.name])
    elem = helper.np_dtype_to_tensor_dtype(graph.dtype)
    batch = BATCH if dynamic_batch else in_shape[0]
    proto_graph = helper.make_graph(
        graph.nodes, type(model).__name__,
        [helper.make_tensor_value_info(input_name, elem, [batch, *in_shape[1:]])],
        [helper.make_tensor_value_info(output_name, elem, [batch, *out_shape[1:]])],
        initializer=initializers)
    opsets = [helper.make_opsetid("", opset)]
    # the oldest IR version that holds this opset: the file loads in the oldest runtimes that can
    # run it, not only in those as new as the onnx package installed here
    proto = helper.make_model(proto_graph, opset_imports=opsets, producer_name="minicnn",
                              producer_version=version,
                              ir_version=helper.find_min_ir_version_for(opsets),
                              doc_string=f"{type(model).__name__} exported by minicnn {version}")
    helper.set_model_props(proto, {"minicnn_version": version,
                                   "minicnn_model": type(model).__name__})
    data = proto.SerializeToString()
    if len(data) >= 2 ** 31:
        raise ExportError(f"export: the model is {len(data) / 2 ** 30:.1f} GiB, more than the "
                          "2 GiB a single ONNX (protobuf) file holds")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"export: the ONNX checker refuses the graph made of "
                          f"{type(model).__name__}: {e}") from e
    write_atomic(path, data)
    return proto


def _version():
    return getattr(sys.modules[__package__], "__version__", "unknown")


def _dtype(model, example_input):
    """The one floating dtype of the graph: the parameters' (the layers compute in it)."""
    dtypes = {np.dtype(p.dtype) for p in model.parameters()}
    if len(dtypes) > 1:
        raise ExportError(f"export: the parameters of {type(model).__name__} have several dtypes "
                          f"({', '.join(sorted(map(str, dtypes)))}); an ONNX graph computes in "
                          "one: convert them to one first")
    return _float_dtype(dtypes.pop() if dtypes else example_input.dtype)


def _float_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32, np.float64):
        raise ExportError(f"export: a graph computing in {dtype} is not supported; export with "
                          "dtype=numpy.float32 (or float64, float16)")
    return dtype


def _join(path, name):
    return f"{path}.{name}" if path else name


def _where(path):
    return f"'{path}'" if path else "the model itself"


class _Graph:
    """The nodes and initializers of the graph being built, and ``emit``, which adds a module's."""

    def __init__(self, onnx, dtype, reserved, dynamic_batch):
        self.helper, self.numpy_helper = onnx.helper, onnx.numpy_helper
        self.dtype = np.dtype(dtype)
        self.dynamic_batch = dynamic_batch
        self.nodes = []
        self.initializers = {}          # state_dict key -> TensorProto
        self._taken = set(reserved)     # tensor names in use (the state_dict keys among them)

    def _fresh(self, name):
        candidate, k = name, 1
        while candidate in self._taken:
            candidate, k = f"{name}_{k}", k + 1
        self._taken.add(candidate)
        return candidate

    def node(self, op, inputs, path, **attributes):
        """Append an ``op`` node of the layer at ``path``; returns the name of its output."""
        out = self._fresh(f"{path or 'model'}/{op}")
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attributes))
        return out

    def param(self, path, attribute, value):
        """The initializer of state_dict entry ``path.attribute`` (a Parameter or buffer)."""
        name = _join(path, attribute)
        if name not in self.initializers:
            data = value.data if isinstance(value, Parameter) else value
            array = np.ascontiguousarray(to_numpy(data), dtype=self.dtype)
            self.initializers[name] = self.numpy_helper.from_array(array, name)
        return name

    def constant(self, path, array):
        """A Constant node (not an initializer: those are the state_dict's alone)."""
        out = self._fresh(f"{path or 'model'}/Constant")
        self.nodes.append(self.helper.make_node(
            "Constant", [], [out], name=out, value=self.numpy_helper.from_array(array, out)))
        return out

    def output(self, y, name):
        """Rename tensor ``y``, the last one, to the graph's output ``name``."""
        if not any(y in node.output for node in self.nodes):      # the model computes nothing
            self.nodes.append(self.helper.make_node("Identity", [y], [name], name="model/Identity"))
            return
        for node in self.nodes:
            for seq in (node.input, node.output):
                for i, t in enumerate(seq):
                    if t == y:
                        seq[i] = name

    def emit(self, module, path, x, shape):
        """Add the nodes of ``module`` (at ``path`` in the model) applied to tensor ``x`` of
        ``shape`` (the example's); returns (output tensor, output shape)."""
        emitter = _emitter(module)
        if emitter is None:
            raise ExportError(
                f"export: layer {_where(path)} is a {type(module).__name__}, which has no ONNX "
                f"export; supported: {', '.join(_SUPPORTED)} (a subclass of one of them when it "
                "keeps that class's forward). Replace the layer or export the model without it")
        return emitter(self, module, path, x, shape)


def _out_shape(module, path, shape, output_shape=None):
    """The layer's own shape check, its message prefixed with where in the model it is."""
    try:
        return tuple((output_shape or module.output_shape)(shape))
    except ShapeError as e:
        raise ShapeError(f"export: the example input does not fit layer {_where(path)} "
                         f"({type(module).__name__}): {e}") from None


def _window(layer):
    """Conv/pool attributes of ONNX from a minicnn layer's kernel_size, stride and padding."""
    (ph, pw) = layer.padding
    return dict(kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                pads=[ph, pw, ph, pw])


# --- one function per supported module: (graph, module, path, x, shape) -> (y, shape) ---------

def _conv(g, conv, path, x, shape):
    out = _out_shape(conv, path, shape, lambda s: Conv2d.output_shape(conv, s))
    inputs = [x, g.param(path, "weight", conv.weight)]
    if conv.bias is not None:
        inputs.append(g.param(path, "bias", conv.bias))
    return g.node("Conv", inputs, path, dilations=[1, 1], group=1, **_window(conv)), out


def _linear(g, linear, path, x, shape):
    out = _out_shape(linear, path, shape)
    inputs = [x, g.param(path, "weight", linear.weight)]
    if linear.bias is not None:
        inputs.append(g.param(path, "bias", linear.bias))
    return g.node("Gemm", inputs, path, transB=1), out


def _relu(g, relu, path, x, shape):
    return g.node("Relu", [x], path), shape


def _nothing(g, module, path, x, shape):      # Dropout and Identity in eval mode
    return x, _out_shape(module, path, shape)


def _maxpool(g, pool, path, x, shape):
    out = _out_shape(pool, path, shape)
    return g.node("MaxPool", [x], path, ceil_mode=0, **_window(pool)), out


def _avgpool(g, pool, path, x, shape):
    out = _out_shape(pool, path, shape)
    # minicnn averages over the whole window, padded zeros included: count_include_pad=1
    return g.node("AveragePool", [x], path, ceil_mode=0, count_include_pad=1,
                  **_window(pool)), out


def _adaptive_avgpool(g, pool, path, x, shape):
    out = _out_shape(pool, path, shape)
    (H, W), (OH, OW) = shape[2:], out[2:]
    if (OH, OW) == (1, 1):
        return g.node("GlobalAveragePool", [x], path), out
    if H % OH or W % OW:
        raise ExportError(
            f"export: layer {_where(path)} (AdaptiveAvgPool2d) pools the {H}x{W} input to "
            f"{OH}x{OW}, with windows of unequal length (PyTorch's adaptive windows), which no "
            f"ONNX pooling operator computes; supported: an output of 1x1, or one whose size "
            f"divides the input's in each dimension (an input of a multiple of {OH}x{OW})")
    if (OH, OW) == (H, W):
        return x, out
    k = [H // OH, W // OW]
    return g.node("AveragePool", [x], path, kernel_shape=k, strides=k, pads=[0, 0, 0, 0]), out


def _batchnorm(g, bn, path, x, shape):
    out = _out_shape(bn, path, shape)
    if bn.running_mean is None:
        raise ExportError(
            f"export: layer {_where(path)} ({type(bn).__name__}) has no running statistics "
            "(track_running_stats=False), so even in eval mode it normalises with each batch's "
            "statistics; supported: BatchNorm with running statistics")
    C = bn.num_features
    if bn.affine:
        scale, shift = g.param(path, "weight", bn.weight), g.param(path, "bias", bn.bias)
    else:
        scale = g.constant(path, np.ones(C, dtype=g.dtype))
        shift = g.constant(path, np.zeros(C, dtype=g.dtype))
    inputs = [x, scale, shift, g.param(path, "running_mean", bn.running_mean),
              g.param(path, "running_var", bn.running_var)]
    return g.node("BatchNormalization", inputs, path, epsilon=bn.eps), out


def _flatten(g, flat, path, x, shape):
    out = _out_shape(flat, path, shape)
    n = len(shape)
    start, end = flat.start_dim % n, flat.end_dim % n
    if start == 1 and end == n - 1:
        return g.node("Flatten", [x], path, axis=1), out
    if start == 0 and g.dynamic_batch:
        raise ExportError(
            f"export: layer {_where(path)} (Flatten) merges the batch dimension into others "
            f"(start_dim={flat.start_dim}), which a dynamic batch cannot; supported: "
            "start_dim >= 1, or export(..., dynamic_batch=False)")
    target = [0 if start > 0 and i == 0 else d for i, d in enumerate(out)]   # 0: keep the batch
    target = g.constant(path, np.asarray(target, dtype=np.int64))
    return g.node("Reshape", [x, target], path), out


def _sequential(g, seq, path, x, shape):
    for name, layer in seq.named_children():
        x, shape = g.emit(layer, _join(path, name), x, shape)
    return x, shape


def _basic_block(g, block, path, x, shape):
    y, s = x, shape
    for name in ("conv1", "bn1", "relu", "conv2", "bn2"):
        y, s = g.emit(getattr(block, name), _join(path, name), y, s)
    short, short_shape = x, shape
    if block.downsample is not None:
        short, short_shape = g.emit(block.downsample, _join(path, "downsample"), x, shape)
    if short_shape != s:
        raise ShapeError(f"export: in {_where(path)} (BasicBlock) the shortcut gives shape "
                         f"{short_shape} but the residual branch {s} for input {shape}")
    y = g.node("Add", [y, short], path)
    return g.emit(block.relu_out, _join(path, "relu_out"), y, s)


def _resnet(g, net, path, x, shape):
    names = {id(m): name for name, m in net.named_children()}
    for layer in net._body():
        x, shape = g.emit(layer, _join(path, names[id(layer)]), x, shape)
    x = g.node("Flatten", [x], path, axis=1)              # forward's x.reshape(B, -1)
    return g.emit(net.fc, _join(path, "fc"), x, (shape[0], math.prod(shape[1:])))


# The fast path is not imported here (the import graph keeps it above the plain tier): its modules
# are known by their qualified names and read through their documented attributes, which are
# those of the layers they were made from.

def _fused_conv(g, fused, path, x, shape):
    y, shape = _conv(g, fused, path, x, shape)
    if fused.relu:
        y = g.node("Relu", [y], path)
    if fused.pool is not None:
        y, shape = g.emit(fused.pool, _join(path, "pool"), y, shape)
    return y, shape


def _fused_linear(g, fused, path, x, shape):
    y, shape = _linear(g, fused, path, x, shape)
    return (g.node("Relu", [y], path) if fused.relu else y), shape


def _fused_maxpool(g, fused, path, x, shape):
    y, shape = _maxpool(g, fused, path, x, shape)
    return (g.node("Relu", [y], path) if fused.relu else y), shape


_EMITTERS = {
    Conv2d: _conv, Linear: _linear, ReLU: _relu, MaxPool2d: _maxpool, AvgPool2d: _avgpool,
    AdaptiveAvgPool2d: _adaptive_avgpool, BatchNorm1d: _batchnorm, BatchNorm2d: _batchnorm,
    Flatten: _flatten, Dropout: _nothing, Identity: _nothing, Sequential: _sequential,
    BasicBlock: _basic_block, ResNet: _resnet, FusedConv2d: _fused_conv,
    FusedLinear: _fused_linear, FusedMaxPool2d: _fused_maxpool,
}
_SUPPORTED = [cls.__name__ for cls in _EMITTERS]


def _emitter(module):
    """The emitter of the nearest class of ``module`` that has one, if ``module`` runs that
    class's forward (a subclass with a forward of its own computes something else)."""
    for cls in type(module).__mro__:
        emit = _EMITTERS.get(cls)
        if emit is not None:
            return emit if type(module).forward is cls.forward else None
    return None
