"""ONNX export of a compressed model: pruned shapes, QDQ weight and activation quantization, feature masks.

The graph is the compressed model's own: structured pruning already removed channels from the layers, so
every initializer has the pruned shape. The float graph is traced by the TorchScript exporter (opset 20, in
eval mode without its BatchNorm folding, which would move the weights off their grid), converted to ``opset``
(21 by default: the first with 16-bit QDQ), then each layer gets what its PyTorch hooks did, and the graph is
cleaned (``autoprune.deploy.graph``: BatchNorm folded into the weight scales, Identity nodes removed, biases
placed where onnxruntime keeps them exact):

- Weights: the integer levels (``autoprune.deploy.levels``, on the grid the quantizer kind declares) are stored
  as an integer initializer, read by a DequantizeLinear (per-tensor, or per-axis on axis 0 when the layer has
  one step per output channel) whose output replaces the float weight: the form runtimes expect for constant
  weights (a QuantizeLinear on a constant would only be folded away). Zero points are 0 (symmetric grids).
  Storage is int8 when the grid's levels fit (b <= 8 bits mid-tread, b <= 7 mid-rise, whose odd levels
  2k + 1 at scale delta / 2 need b + 1 bits), else int16, else int32; the levels never leave the grid's
  b-bit range, the exporter checks it.
- Activations a layer reads: QuantizeLinear -> DequantizeLinear with the quantizer's step as scale, zero point
  0, int8 when signed and uint8 after a ReLU (int16 / uint16 for 9-16 bits). Below the storage width the
  integers are clipped to the real b-bit range [-2^(b-1), 2^(b-1) - 1] or [0, 2^b - 1]: by a Clip on the
  integers between the pair for 8-bit storage (the QCDQ form of Brevitas), and for 16-bit storage by a Clip on
  the float input before QuantizeLinear at the same bounds times the scale (exact: the step keeps 24 - b
  significant bits), as onnxruntime has no 16-bit integer Clip. Rounding is half to even in both frameworks.
  A signed input below 3 bits is on the mid-rise grid (k + 1/2) x step, which no zero point gives: it is
  computed op for op as PyTorch does, Div, Floor, Clip, Add 1/2, Mul, and a Where keeping exact zeros.
  17 to 31 activation bits have no ONNX integer type and are refused.
- A fitted feature mask becomes a Mul by the constant mask, before the activation quantization.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from autoprune.bits import FLOAT_BITS
from autoprune.compress import CompressionResult
from autoprune.deploy.graph import GraphCleanup, clean_graph, dequantize_weights
from autoprune.deploy.levels import WeightLevels, layer_levels
from autoprune.deps import require
from autoprune.errors import AutopruneError
from autoprune.files import atomic_path
from autoprune.models import compressible_layers
from autoprune.prune.unstructured import FEATURE_MASK
from autoprune.quant import ACT_QUANT
from autoprune.quant.uniform import is_midrise, level_range

DEFAULT_OPSET = 21
TRACE_OPSET = 20
"""The highest opset the TorchScript exporter writes; the graph is converted to the requested one after."""
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_ACT_BITS = 16


class ActQdq(BaseModel):
    """The QuantizeLinear / DequantizeLinear pair on one layer's input."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    bits: int
    signed: bool
    scale: float
    storage: str
    clip: tuple[int, int] | None
    grid: str = "midtread"
    """``midrise`` (signed, below 3 bits): the levels (k + 1/2) x step, computed in float (no QDQ form)."""


class LayerQdq(BaseModel):
    """What the export put around one Conv / Gemm: its weight storage, input quantization and mask."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    weight_shape: tuple[int, ...]
    w_bits: int
    w_storage: str
    per_channel: bool
    act: ActQdq | None
    feature_mask: bool
    batchnorm_folded: bool = False
    bias_in_layer: bool = True
    """False: the bias is an Add after the layer (see ``autoprune.deploy.graph``)."""
    weights_dequantized: bool = False
    """True: onnxruntime runs the layer on a float kernel and the file stores its weights as float32 values
    (``export_onnx(..., float_weights_off_kernel=True)``)."""

    @property
    def integer_candidate(self) -> bool:
        """8-bit int8 weights reading 8-bit QDQ activations: an integer kernel that keeps its bias.

        Below 8 bits the bias onnxruntime quantizes at s_x s_w rounds on a coarse grid (a W3 conv feeding a
        2-bit input moved whole steps: 99.4 % top-1 agreement); such a layer adds its bias after it in float.
        """
        act = self.act
        return (
            self.w_bits == 8 and self.w_storage == "int8"
            and act is not None and act.bits == 8 and act.clip is None and act.grid == "midtread"
        )


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    opset: int
    input_name: str
    output_name: str
    layers: dict[str, LayerQdq]
    size_bytes: int
    cleanup: GraphCleanup | None = None


def float_copy(result: CompressionResult) -> nn.Module:
    """The compressed model (on the CPU) with its input quantizers and feature masks made identities.

    The baked weights stay: only what the forward pre-hooks do is taken out (the hooks call the children,
    which become ``nn.Identity``), for the exporter to put back as ONNX nodes.
    """
    model = copy.deepcopy(result.model).cpu().eval()
    for layer in compressible_layers(model).values():
        for child in (ACT_QUANT, FEATURE_MASK):
            if hasattr(layer, child):
                setattr(layer, child, nn.Identity())
    return model


def export_onnx(
    result: CompressionResult, path: str | Path, *, input_shape: tuple[int, int, int], opset: int = DEFAULT_OPSET,
    float_weights_off_kernel: bool = False,
) -> OnnxExport:
    """Write the compressed model as ONNX with QDQ nodes; the file passes ``onnx.checker`` (full check).

    ``float_weights_off_kernel``: the layers onnxruntime runs on float kernels (asked of onnxruntime on the
    written graph, ``runtime_kernels``) store their weights as float32 values, the same numbers, which it then
    prepacks instead of dequantizing them on every run (``autoprune.deploy.graph.dequantize_weights``); the
    integer levels stay in the packed file."""
    onnx = require("onnx")
    if not DEFAULT_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise AutopruneError("opset", opset, f"must be in {DEFAULT_OPSET}..{onnx.defs.onnx_opset_version()} (16-bit QDQ needs 21)")
    layers = compressible_layers(result.model)
    acts = {name: _act_qdq(name, layer) for name, layer in layers.items()}
    levels = layer_levels(result)
    graph_model = _trace(float_copy(result), input_shape=input_shape, opset=opset)
    records = _insert_qdq(graph_model.graph, layers, levels, acts)
    cleanup = clean_graph(
        graph_model.graph, layers=list(layers), quantized={n: level.grid.bounds(level.bits) for n, level in levels.items() if level is not None},
        dequantized_input={n for n, record in records.items() if record.act is not None or record.w_storage != "float32"},
        conv_kernels={n for n, record in records.items() if record.integer_candidate},
    )
    records = {
        name: record.model_copy(update={
            "batchnorm_folded": name in cleanup.folded.values(), "bias_in_layer": name not in cleanup.biases_split,
        })
        for name, record in records.items()
    }
    helper = onnx.helper
    graph_model.producer_name = "autoprune"
    helper.set_model_props(graph_model, {"autoprune.policy": result.policy.to_json(), "autoprune.input_shape": ",".join(map(str, input_shape))})
    onnx.checker.check_model(graph_model, full_check=True)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(graph_model, str(tmp))
        if float_weights_off_kernel:
            from autoprune.deploy.verify import INTEGER_KERNELS, runtime_kernels

            kernels = runtime_kernels(tmp)
            done = dequantize_weights(graph_model.graph, [n for n, k in kernels.items() if k not in INTEGER_KERNELS])
            records = {n: r.model_copy(update={"weights_dequantized": True}) if n in done else r for n, r in records.items()}
            onnx.checker.check_model(graph_model, full_check=True)
            onnx.save(graph_model, str(tmp))
    return OnnxExport(path, opset, INPUT_NAME, OUTPUT_NAME, records, path.stat().st_size, cleanup)


def _act_qdq(name: str, layer: nn.Module) -> ActQdq | None:
    quantizer = getattr(layer, ACT_QUANT, None)
    if quantizer is None or quantizer.bits >= FLOAT_BITS:
        return None
    if quantizer.bits > MAX_ACT_BITS:
        raise AutopruneError(f"a_bits of {name!r}", quantizer.bits, f"has no ONNX QuantizeLinear type: use at most {MAX_ACT_BITS} bits, or 32 (float)")
    signed, width = quantizer.signed, (8 if quantizer.bits <= 8 else 16)
    low, high = level_range(bits=quantizer.bits, signed=signed)
    if is_midrise(bits=quantizer.bits, signed=signed):
        return ActQdq(bits=quantizer.bits, signed=signed, scale=quantizer.delta, storage="float32", clip=(low, high), grid="midrise")
    full = level_range(bits=width, signed=signed)
    storage = f"{'' if signed else 'u'}int{width}"
    return ActQdq(bits=quantizer.bits, signed=signed, scale=quantizer.delta, storage=storage, clip=None if (low, high) == full else (low, high))


def _trace(model: nn.Module, *, input_shape: tuple[int, int, int], opset: int) -> Any:
    onnx = require("onnx")
    require("onnx.version_converter")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation; it is used for its opset-20 graph of named
        # initializers, which the dynamo exporter would need onnxscript for.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, *input_shape),),
            buffer,
            dynamo=False,
            opset_version=TRACE_OPSET,
            # PRESERVE on an eval model exports inference BatchNorm without folding it into the conv weights.
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    traced = onnx.version_converter.convert_version(onnx.load_from_string(buffer.getvalue()), opset)
    _unshare_initializers(traced.graph)
    return traced


def _unshare_initializers(graph: Any) -> None:
    """Give every parameter its own initializer again. The exporter keeps one of several equal tensors (the
    cloned layers of an nn.TransformerEncoder start equal) and names the others by Identity nodes reading it;
    each layer's weight must be an initializer of its own name for its QDQ nodes to replace it."""
    numpy_helper = require("onnx").numpy_helper
    initializers = {init.name: init for init in graph.initializer}
    aliases = [node for node in graph.node if node.op_type == "Identity" and node.input[0] in initializers]
    for node in aliases:
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(initializers[node.input[0]]), node.output[0]))
        graph.node.remove(node)


def _int_storage(bits: int) -> str:
    return "int8" if bits <= 8 else "int16" if bits <= 16 else "int32"


def _insert_qdq(graph: Any, layers: dict[str, nn.Module], levels: dict[str, WeightLevels | None], acts: dict[str, ActQdq | None]) -> dict[str, LayerQdq]:
    onnx = require("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    initializers = {init.name: init for init in graph.initializer}
    weight_nodes: list[Any] = []
    before: dict[int, list[Any]] = {}
    records: dict[str, LayerQdq] = {}
    for name, layer in layers.items():
        weight_name = f"{name}.weight"
        if weight_name not in initializers:
            raise AutopruneError("onnx export", name, f"has no initializer {weight_name!r} in the traced graph")
        shape = tuple(initializers[weight_name].dims)
        if shape != tuple(layer.weight.shape):
            raise AutopruneError("onnx export", name, f"traced weight shape {shape} differs from the model's {tuple(layer.weight.shape)}")
        indices = _layer_nodes(graph, weight_name)
        level = levels[name]
        storage = "float32"
        if level is not None:
            storage = _int_storage(level.storage_bits)
            graph.initializer.remove(initializers[weight_name])
            scale = level.scale.to(torch.float32).numpy() if level.per_channel else np.array(level.scale[0].item(), dtype=np.float32)
            graph.initializer.extend([
                numpy_helper.from_array(level.levels.numpy().astype(storage), f"{weight_name}_quantized"),
                numpy_helper.from_array(scale, f"{weight_name}_scale"),
                numpy_helper.from_array(np.zeros(scale.shape, dtype=storage), f"{weight_name}_zero_point"),
            ])
            axis = {"axis": 0} if level.per_channel else {}
            weight_nodes.append(helper.make_node(
                "DequantizeLinear", [f"{weight_name}_quantized", f"{weight_name}_scale", f"{weight_name}_zero_point"],
                [weight_name], name=f"{name}/weight_dequantize", **axis,
            ))
        mask = getattr(getattr(layer, FEATURE_MASK, None), "mask", None)
        mask = None if mask is None else mask.cpu()
        # a layer called once per step (an unrolled recurrent layer's hidden Linear) quantizes each call's input
        for call, index in enumerate(indices):
            consumer = graph.node[index]
            chain = _input_chain(graph, name if call == 0 else f"{name}.call{call}", consumer.input[0], mask, acts[name])
            if chain:
                consumer.input[0] = chain[-1].output[0]
                before[index] = chain
        records[name] = LayerQdq(
            weight_shape=shape, w_bits=level.bits if level is not None else FLOAT_BITS, w_storage=storage,
            per_channel=bool(level is not None and level.per_channel), act=acts[name], feature_mask=mask is not None,
        )
    nodes = list(weight_nodes)
    for index, node in enumerate(graph.node):
        nodes.extend(before.get(index, []))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return records


def _layer_nodes(graph: Any, weight_name: str) -> list[int]:
    """Indices of the Conv / Gemm / MatMul nodes reading a weight (through the Transpose of a Linear): one per
    call of the layer."""
    consumers = [i for i, n in enumerate(graph.node) if weight_name in n.input]
    if not consumers:
        raise AutopruneError("onnx export", weight_name, "is read by no node of the traced graph")
    found: list[int] = []
    for index in consumers:
        node = graph.node[index]
        found.extend(_layer_nodes(graph, node.output[0]) if node.op_type == "Transpose" else [index])
    return found


def _input_chain(graph: Any, name: str, source: str, mask: torch.Tensor | None, act: ActQdq | None) -> list[Any]:
    """Mul by the feature mask, then (Clip) QuantizeLinear (Clip) DequantizeLinear, on one layer's input."""
    onnx = require("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    nodes: list[Any] = []
    current = source
    if mask is not None:
        graph.initializer.append(numpy_helper.from_array(mask.to(torch.float32).numpy(), f"{name}.input_mask"))
        nodes.append(helper.make_node("Mul", [current, f"{name}.input_mask"], [f"{name}/masked_input"], name=f"{name}/input_mask"))
        current = f"{name}/masked_input"
    if act is None:
        return nodes
    if act.grid == "midrise":
        return nodes + _midrise_chain(graph, name, current, act)
    scale, zero = f"{name}.input_scale", f"{name}.input_zero_point"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(act.scale, dtype=np.float32), scale),
        numpy_helper.from_array(np.array(0, dtype=act.storage), zero),
    ])
    if act.clip is not None and act.storage.endswith("16"):
        low, high = (np.float32(act.scale) * np.float32(v) for v in act.clip)
        graph.initializer.extend([
            numpy_helper.from_array(np.array(low, dtype=np.float32), f"{name}.input_clip_low"),
            numpy_helper.from_array(np.array(high, dtype=np.float32), f"{name}.input_clip_high"),
        ])
        nodes.append(helper.make_node("Clip", [current, f"{name}.input_clip_low", f"{name}.input_clip_high"], [f"{name}/clipped_input"], name=f"{name}/input_clip"))
        current = f"{name}/clipped_input"
    nodes.append(helper.make_node("QuantizeLinear", [current, scale, zero], [f"{name}/input_quantized"], name=f"{name}/input_quantize"))
    current = f"{name}/input_quantized"
    if act.clip is not None and not act.storage.endswith("16"):
        graph.initializer.extend([
            numpy_helper.from_array(np.array(act.clip[0], dtype=act.storage), f"{name}.input_clip_low"),
            numpy_helper.from_array(np.array(act.clip[1], dtype=act.storage), f"{name}.input_clip_high"),
        ])
        nodes.append(helper.make_node("Clip", [current, f"{name}.input_clip_low", f"{name}.input_clip_high"], [f"{name}/input_clipped"], name=f"{name}/input_clip"))
        current = f"{name}/input_clipped"
    nodes.append(helper.make_node("DequantizeLinear", [current, scale, zero], [f"{name}/input_dequantized"], name=f"{name}/input_dequantize"))
    return nodes


def _midrise_chain(graph: Any, name: str, source: str, act: ActQdq) -> list[Any]:
    """The signed mid-rise grid of ``autoprune.quant.uniform`` op for op: where(x == 0, 0, (clip(floor(x / step),
    low, high) + 1/2) x step). Its half-integer levels have no zero point that QuantizeLinear rounds to, and the
    same float operations in the same order give PyTorch's values bit for bit."""
    onnx = require("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    assert act.clip is not None, "a mid-rise grid has its level range"
    constants = {
        "input_scale": act.scale, "input_clip_low": act.clip[0], "input_clip_high": act.clip[1], "input_half": 0.5, "input_zero": 0.0,
    }
    graph.initializer.extend(numpy_helper.from_array(np.array(v, dtype=np.float32), f"{name}.{k}") for k, v in constants.items())
    steps = [
        ("Div", [source, f"{name}.input_scale"], "input_steps"),
        ("Floor", ["input_steps"], "input_floor"),
        ("Clip", ["input_floor", f"{name}.input_clip_low", f"{name}.input_clip_high"], "input_level"),
        ("Add", ["input_level", f"{name}.input_half"], "input_midrise"),
        ("Mul", ["input_midrise", f"{name}.input_scale"], "input_values"),
        ("Equal", [source, f"{name}.input_zero"], "input_is_zero"),
        ("Where", ["input_is_zero", f"{name}.input_zero", "input_values"], "input_dequantized"),
    ]
    local = {out for _, _, out in steps}
    return [
        helper.make_node(op, [f"{name}/{i}" if i in local else i for i in inputs], [f"{name}/{out}"], name=f"{name}/{out}")
        for op, inputs, out in steps
    ]
