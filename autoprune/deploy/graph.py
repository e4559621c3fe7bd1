"""The exported graph made plain: BatchNorm folded into the layer before it, Identity nodes gone, biases placed
where onnxruntime keeps them exact, unused initializers dropped.

- **BatchNorm folding.** PyTorch's compressed model evaluates ``BN(layer(x))`` with the layer's weights on their
  grid and the BN in float; the fold keeps that arithmetic and its integer levels: per output channel
  ``s = gamma / sqrt(var + eps)`` multiplies the weight's *scale* (the DequantizeLinear becomes per-axis; the
  levels are the same integers, negated where ``s < 0`` so that scales stay positive, unless a channel holds
  the lowest mid-tread level, whose negation is off the grid: that channel keeps a negative scale) and the
  bias becomes ``(b - mean) s + beta``. What changes is only where the float products round, as with any reordering of
  the sum. A float (32-bit) layer gets ``W s`` itself. A BN whose producer is not a Conv / Gemm layer of the
  model, or whose producer feeds anything else, stays and is named in ``GraphCleanup.unfolded``.
- **Identity nodes** (the exporter's trace of removed quantizers, of ``nn.Identity`` shortcuts) are removed,
  their readers wired to what the Identity read.
- **Biases.** onnxruntime rewrites a float bias of a Conv fed by DequantizeLinear nodes into an int32 bias at
  scale ``s_x s_w`` (its bias quantization, also when no integer kernel follows). At a few bits that scale is
  coarse and the rounding moves outputs by whole steps of the next quantizer (top-1 agreement fell to 85 % on a
  3-bit model). A Conv that can run on an integer kernel at 8 bits (8-bit activations, 8-bit int8 weights)
  keeps its bias, which QLinearConv needs; every other layer reading a DequantizeLinear adds its bias with an ``Add`` after
  the layer, in float as PyTorch does (a Gemm too: onnxruntime fuses a QGemm only without a float bias).
- **Flatten** becomes the equal ``Reshape(0, -1)``, across which onnxruntime moves a QuantizeLinear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from autoprune.deps import require

LAYER_OPS = ("Conv", "Gemm")


@dataclass(frozen=True)
class GraphCleanup:
    folded: dict[str, str]
    """BatchNormalization node name -> the layer it was folded into."""
    unfolded: tuple[str, ...]
    identities_removed: int
    biases_split: tuple[str, ...]


def clean_graph(
    graph: Any, *, layers: Iterable[str], quantized: dict[str, tuple[int, int]], dequantized_input: set[str], conv_kernels: set[str]
) -> GraphCleanup:
    """Fold BNs, remove Identities, split biases, flatten by Reshape, drop unused initializers, in place.

    ``quantized``: layers with integer weights, and their grid's lowest and highest level;
    ``dequantized_input``: layers reading a DequantizeLinear (weights or input), whose bias onnxruntime would
    quantize; ``conv_kernels``: those of them that may run on an integer convolution, which keeps its bias (a
    QGemm runs without one, its bias then added after it).
    """
    layers = list(layers)
    # identities first: the exporter reads shared initializers (equal BN parameters) through Identity nodes
    removed = _remove_identities(graph)
    folded, unfolded = _fold_batchnorms(graph, layers, quantized)
    split = _split_biases(graph, [n for n in layers if n in dequantized_input], keep=conv_kernels)
    _flatten_by_reshape(graph)
    _drop_unused_initializers(graph)
    return GraphCleanup(folded=folded, unfolded=unfolded, identities_removed=removed, biases_split=split)


def _initializers(graph: Any) -> dict[str, Any]:
    return {init.name: init for init in graph.initializer}


def _consumers(graph: Any, value: str) -> list[Any]:
    return [n for n in graph.node if value in n.input]


def _layer_node(graph: Any, name: str) -> Any | None:
    return next((n for n in graph.node if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] == f"{name}.weight"), None)


def _replace(graph: Any, init: Any, array: np.ndarray) -> None:
    numpy_helper = require("onnx").numpy_helper
    name = init.name
    graph.initializer.remove(init)
    graph.initializer.append(numpy_helper.from_array(array, name))


def _fold_batchnorms(graph: Any, layers: list[str], quantized: dict[str, tuple[int, int]]) -> tuple[dict[str, str], tuple[str, ...]]:
    numpy_helper = require("onnx").numpy_helper
    folded: dict[str, str] = {}
    by_output = {n.output[0]: name for name in layers if (n := _layer_node(graph, name)) is not None}
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        name = by_output.get(bn.input[0])
        if name is None or len(_consumers(graph, bn.input[0])) != 1 or not all(i in _initializers(graph) for i in bn.input[1:5]):
            continue
        inits = _initializers(graph)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        s = gamma / np.sqrt(var + eps)
        layer = _layer_node(graph, name)
        if name in quantized:
            _fold_into_scale(graph, name, s, quantized[name])
        else:
            weight = numpy_helper.to_array(inits[f"{name}.weight"]).astype(np.float64)
            _replace(graph, inits[f"{name}.weight"], (weight * s.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32))
        bias = numpy_helper.to_array(inits[layer.input[2]]).astype(np.float64) if len(layer.input) > 2 else np.zeros_like(s)
        # a new initializer: the traced one may be shared with another layer
        graph.initializer.append(numpy_helper.from_array(((bias - mean) * s + beta).astype(np.float32), f"{name}.bias_folded"))
        if len(layer.input) > 2:
            layer.input[2] = f"{name}.bias_folded"
        else:
            layer.input.append(f"{name}.bias_folded")
        layer.output[0] = bn.output[0]
        graph.node.remove(bn)
        folded[bn.name] = name
    unfolded = tuple(n.name for n in graph.node if n.op_type == "BatchNormalization")
    return folded, unfolded


def _fold_into_scale(graph: Any, name: str, s: np.ndarray, bounds: tuple[int, int]) -> None:
    """The weight's DequantizeLinear scale times |s| per output channel, its levels negated where s < 0."""
    onnx = require("onnx")
    inits = _initializers(graph)
    levels = onnx.numpy_helper.to_array(inits[f"{name}.weight_quantized"])
    scale = onnx.numpy_helper.to_array(inits[f"{name}.weight_scale"]).astype(np.float64)
    scale = np.broadcast_to(scale, s.shape) * np.abs(s)
    sign = np.where(s < 0, -1, 1).reshape(-1, *[1] * (levels.ndim - 1))
    flipped = levels.astype(np.int64) * sign
    # a mid-tread grid's lowest level has no twin on the grid: a channel holding it keeps a negative scale
    keeps = (flipped.reshape(len(s), -1).max(1) > bounds[1]) | (flipped.reshape(len(s), -1).min(1) < bounds[0])
    flipped[keeps] = levels.astype(np.int64)[keeps]
    scale = np.where(keeps, -scale, scale)
    _replace(graph, inits[f"{name}.weight_quantized"], flipped.astype(levels.dtype))
    _replace(graph, inits[f"{name}.weight_scale"], scale.astype(np.float32))
    _replace(graph, inits[f"{name}.weight_zero_point"], np.zeros(len(s), dtype=levels.dtype))
    node = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] == f"{name}.weight")
    del node.attribute[:]
    node.attribute.append(onnx.helper.make_attribute("axis", 0))


def _remove_identities(graph: Any) -> int:
    outputs = {o.name for o in graph.output}
    count = 0
    for node in [n for n in graph.node if n.op_type == "Identity"]:
        source, target = node.input[0], node.output[0]
        graph.node.remove(node)
        count += 1
        if target in outputs:
            # the graph's output keeps its name: the producer writes it, and other readers follow
            for n in graph.node:
                n.output[:] = [target if o == source else o for o in n.output]
                n.input[:] = [target if i == source else i for i in n.input]
        else:
            for n in graph.node:
                n.input[:] = [source if i == target else i for i in n.input]
    return count


def _split_biases(graph: Any, names: list[str], *, keep: set[str]) -> tuple[str, ...]:
    numpy_helper = require("onnx").numpy_helper
    helper = require("onnx").helper
    split = []
    for name in names:
        node = _layer_node(graph, name)
        if node is None or len(node.input) < 3 or not node.input[2] or (name in keep and node.op_type == "Conv"):
            continue
        inits = _initializers(graph)
        bias = numpy_helper.to_array(inits[node.input[2]])
        out = node.output[0]
        shaped = bias.reshape(-1, *[1] * _spatial_dims(graph, node, name))
        add_bias = f"{name}.bias_add"
        graph.initializer.append(numpy_helper.from_array(shaped.astype(np.float32), add_bias))
        del node.input[2]
        node.output[0] = f"{name}/without_bias"
        index = list(graph.node).index(node)
        graph.node.insert(index + 1, helper.make_node("Add", [node.output[0], add_bias], [out], name=f"{name}/bias"))
        split.append(name)
    return tuple(split)


def _spatial_dims(graph: Any, node: Any, name: str) -> int:
    """Dimensions after the channel of a layer's output: 0 for a Gemm, the kernel's rank for a Conv."""
    if node.op_type == "Gemm":
        return 0
    inits = _initializers(graph)
    weight = inits.get(f"{name}.weight_quantized") or inits[f"{name}.weight"]
    return len(weight.dims) - 2


def _flatten_by_reshape(graph: Any) -> None:
    """Flatten(axis=1) as Reshape(0, -1), the same values: onnxruntime moves a QuantizeLinear up across a
    Reshape (not a Flatten), which lets the layer before it end in an integer kernel."""
    onnx = require("onnx")
    for index, node in enumerate(list(graph.node)):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if node.op_type != "Flatten" or axis != 1:
            continue
        shape = f"{node.name}/shape"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, -1], dtype=np.int64), shape))
        graph.node.remove(node)
        graph.node.insert(index, onnx.helper.make_node("Reshape", [node.input[0], shape], list(node.output), name=node.name))


def _drop_unused_initializers(graph: Any) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


# operators between a layer and the next layer's input across which onnxruntime still ends the layer in that
# input's QuantizeLinear (a ReLU at zero point 0 is dropped, a QuantizeLinear moves up across MaxPool / Reshape)
_PASS_THROUGH = ("Relu", "MaxPool", "Flatten", "Reshape", "Identity")


@dataclass(frozen=True)
class LayerOutput:
    """What follows a layer in the traced graph, up to the layer reading it."""

    batchnorm: bool
    """A BatchNormalization reads the layer alone (the export folds it: per-channel scales, a bias)."""
    relu: bool
    reader: str | None
    """The layer whose input is this layer's output through pass-through operators only, each read once;
    None when the output reaches anything else (a residual Add, a pooling, two readers, the graph output)."""


def layer_outputs(graph: Any, layer_nodes: dict[str, Any]) -> dict[str, LayerOutput]:
    """Per layer (name -> its Conv / Gemm / MatMul node), what follows it: the context a one-layer model needs
    to run on the kernel the whole model runs it on."""
    by_input = {node.input[0]: name for name, node in layer_nodes.items()}
    outputs = {o.name for o in graph.output}
    result = {}
    for name, node in layer_nodes.items():
        value, batchnorm, relu, reader = node.output[0], False, False, None
        while value not in outputs:
            readers = _consumers(graph, value)
            if len(readers) != 1:
                break
            after = readers[0]
            if value in by_input and after.output[0] == layer_nodes[by_input[value]].output[0]:
                reader = by_input[value]
                break
            if after.op_type == "BatchNormalization" and value == node.output[0]:
                batchnorm = True
            elif after.op_type in _PASS_THROUGH:
                relu = relu or after.op_type == "Relu"
            else:
                break
            value = after.output[0]
        result[name] = LayerOutput(batchnorm=batchnorm, relu=relu, reader=reader)
    return result


def dequantize_weights(graph: Any, names: Iterable[str]) -> tuple[str, ...]:
    """The named layers' weights stored as their float32 values, in place of the integer levels and their
    DequantizeLinear: the same numbers (levels x scale is one float32 product either way), which onnxruntime
    lays out once for its float convolution, where it would dequantize them on every run before a float kernel
    (a uniform W8A8 resnet18 at 3x32x32 whose conv2 and downsample layers end in a residual add: 126-135 ms
    per batch of 64, 37-44 ms with theirs stored in float, the float model 49-51 ms, the logits equal)."""
    numpy_helper = require("onnx").numpy_helper
    done = []
    for name in names:
        node = next((n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] == f"{name}.weight"), None)
        if node is None:
            continue
        inits = _initializers(graph)
        levels = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if scale.ndim == 1:
            scale = scale.reshape(-1, *[1] * (levels.ndim - 1))
        graph.node.remove(node)
        graph.initializer.append(numpy_helper.from_array((levels * scale).astype(np.float32), f"{name}.weight"))
        done.append(name)
    _drop_unused_initializers(graph)
    return tuple(done)
