"""Latency measured on this machine with onnxruntime: a table per layer, summed per policy, checked against
whole-model runs.

A compressed model's latency is predicted as

    latency = overhead + sum over its Conv / Gemm layers of (t(layer) - overhead) + rest x features / base features

- ``t(layer)``: the time per batch (``time_session``: CPU time with one thread), the fastest median of ``BLOCKS``
  blocks of runs, the points measured together taking turns of a one-layer model exported by the same QDQ path as a whole model
  (``export_onnx``: the layer's weight storage, its input's QuantizeLinear / Clip / DequantizeLinear) with what
  follows the layer in the model (the BN folded into it, the ReLU, the reading layer's QuantizeLinear as its
  output: onnxruntime fuses a layer into its integer kernel only with it there), for the
  layer's pruned shape, its weight and activation bits, the sign of what it reads and the weight quantizer kind
  (which sets the weight storage). One point is measured the first time a search or an export needs it, never
  before, and kept in the table.
- ``overhead``: one ``session.run`` of a one-node graph: every one-layer time holds it once, a model holds it once.
- ``rest``: what is not a Conv / Gemm layer (BatchNorm, ReLU, pooling, adds, reshapes): per activation storage
  and weight grid, the base model's whole-model time with every layer at that storage on that grid less the
  sum of its layers, shared among the layers reading that storage by their input elements against the base
  model's (pruning shrinks the feature maps these operators read).

The table is a JSON file under the cache root (``latency/<key>.json``), keyed by this machine's CPU, the
onnxruntime version, the intra-op threads and the batch size: the same layers on another machine are measured
again. Unstructured weight sparsity and feature masks do not change a dense runtime's time and are not modelled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from autoprune.bits import FLOAT_ACT_BITS, FLOAT_BITS
from autoprune.compress import CompressionResult, attach_act_quantizers, static_compress
from autoprune.deploy.graph import LayerOutput, layer_outputs
from autoprune.deps import require
from autoprune.errors import AutopruneError
from autoprune.files import cache_root, write_atomic
from autoprune.models import compressible_layers, probing
from autoprune.policy import LayerPolicy, Policy, parse_model
from autoprune.quant import ACT_QUANT
from autoprune.quant.uniform import is_midrise

# 2: a point carries what follows its layer (BN, ReLU, the reader's QuantizeLinear)
TABLE_VERSION = 2
# One batch size for every latency the product reports, so that the rows of a report compare.
LATENCY_BATCH = 64
LATENCY_THREADS = 1
WARMUP = 5
REPEATS = 30
# the repeats are timed in this many blocks apart in time (the points of one batch taking turns), and the fastest
# block's median is kept: a burst of load on the machine reaches one block, not the point
BLOCKS = 3


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayerPoint(_Frozen):
    """One measured point: a layer's shape as compressed, its bits and the weight quantizer kind."""

    op: Literal["conv1d", "conv2d", "linear"]
    in_shape: tuple[int, ...] = Field(description="one sample's input: (C, L), (C, H, W) or (features,)")
    out_channels: int = Field(ge=1)
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = Field(1, ge=1)
    bias: bool
    w_bits: int = Field(ge=1, le=FLOAT_BITS)
    a_bits: int = Field(ge=1, le=FLOAT_BITS)
    signed: bool = Field(description="the layer reads signed values (the network input, a linear bottleneck)")
    quantizer: str = Field(description="the weight quantizer's config as JSON, or '' for a float layer")
    batchnorm: bool = Field(False, description="a BatchNorm follows, folded by the export into the layer")
    relu: bool = Field(False, description="a ReLU follows before the next layer's input")
    output_bits: int | None = Field(None, ge=1, le=16, description="the QuantizeLinear of the layer reading this one's output")
    output_signed: bool = False

    @property
    def key(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def float_point(self) -> "LayerPoint":
        return self.model_copy(update={"w_bits": FLOAT_BITS, "a_bits": FLOAT_BITS, "quantizer": "", "output_bits": None, "output_signed": False})


class LatencyTable(_Frozen):
    """The times measured on one machine, milliseconds per batch of ``batch_size``."""

    version: Literal[2] = TABLE_VERSION
    machine: str
    onnxruntime: str
    threads: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    float_weights_off_kernel: bool = Field(False, description="files exported with export_onnx(float_weights_off_kernel=True)")
    overhead_ms: float | None = None
    layers: dict[str, float] = Field(default_factory=dict, description="LayerPoint.key -> ms")
    models: dict[str, float] = Field(default_factory=dict, description="a float model's architecture digest -> whole-model ms")

    def merged(self, other: "LatencyTable") -> "LatencyTable":
        """This table with what another process wrote meanwhile (ours wins where both measured)."""
        return self.model_copy(update={
            "layers": {**other.layers, **self.layers}, "models": {**other.models, **self.models},
            "overhead_ms": self.overhead_ms if self.overhead_ms is not None else other.overhead_ms,
        })


class LatencyEstimate(_Frozen):
    """The latency model's prediction for one compressed model, milliseconds per batch."""

    total_ms: float
    layers: dict[str, float] = Field(description="each layer's time less the run overhead")
    rest_ms: float
    overhead_ms: float
    measured: int = Field(ge=0, description="points this estimate had to measure (0: all from the table)")


class LatencyCheck(_Frozen):
    """The latency model beside a whole-model run of the same exported model."""

    batch_size: int
    threads: int
    model_ms: float
    measured_ms: float
    relative_error: float = Field(description="(model - measured) / measured")
    kernels: dict[str, str] = Field(default_factory=dict, description="the operator onnxruntime runs each layer of the whole model with")


def machine_name() -> str:
    """The CPU the times belong to: its model name, architecture and logical cores."""
    name = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or 'unknown cpu'} ({platform.machine()}, {os.cpu_count()} cores)"


def table_path(*, batch_size: int, threads: int, float_weights_off_kernel: bool = False) -> Path:
    ort = require("onnxruntime")
    form = "|float-off-kernel" if float_weights_off_kernel else ""
    key = hashlib.sha256(f"{machine_name()}|{ort.__version__}|{threads}|{batch_size}{form}".encode()).hexdigest()[:16]
    return cache_root() / "latency" / f"{key}.json"


def architecture_digest(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """What a float model's time depends on: its modules as printed (shapes included) and the input shape."""
    return hashlib.sha256(f"{model!r}|{tuple(input_shape)}".encode()).hexdigest()[:16]


def _session(path: Path, threads: int) -> Any:
    from autoprune.deploy.verify import onnx_session

    return onnx_session(path, threads=threads)


def time_session(session: Any, x: Any, *, threads: int = LATENCY_THREADS, warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """The median milliseconds of ``repeats`` runs of ``session.run`` on the array ``x``, after ``warmup`` runs.

    With one intra-op thread onnxruntime computes in the calling thread, whose CPU time is timed: on a shared
    machine wall time measures the load (one W8A8 MNIST-1D model timed five times here under a load of 6 to 9
    on 2 cores: wall medians 1.9 to 4.6 ms, CPU-time medians 1.84 to 1.86 ms), and a table measured once serves
    every later search. With more threads the work leaves the calling thread, and wall time is timed."""
    feed = {session.get_inputs()[0].name: x}
    clock = time.thread_time if threads == 1 else time.perf_counter
    times = []
    for index in range(warmup + repeats):
        start = clock()
        session.run(None, feed)
        if index >= warmup:
            times.append(1e3 * (clock() - start))
    return statistics.median(times)


def _sample(shape: tuple[int, ...], *, signed: bool, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x if signed else x.relu()


def layer_context(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerOutput]:
    """What follows each layer in the graph the export traces (the float model's: structure only)."""
    from autoprune.deploy.onnx_export import DEFAULT_OPSET, _layer_nodes, _trace

    graph = _trace(copy.deepcopy(model).cpu().eval(), input_shape=input_shape, opset=DEFAULT_OPSET).graph  # type: ignore[arg-type]
    # a layer called at every step (a recurrent gate) is followed by what follows its first call
    nodes = {name: graph.node[_layer_nodes(graph, f"{name}.weight")[0]] for name in compressible_layers(model)}
    return layer_outputs(graph, nodes)


def _reader_quantize(point: LayerPoint | None) -> tuple[int | None, bool]:
    """The QuantizeLinear a layer reading ``point``'s input puts on it: its bits and sign, or None (float, or
    the signed mid-rise grid, computed op for op)."""
    if point is None or point.a_bits >= FLOAT_BITS or is_midrise(bits=point.a_bits, signed=point.signed):
        return None, False
    return point.a_bits, point.signed


def _layer_points(
    model: nn.Module, input_shape: tuple[int, ...], *, w_bits: dict[str, int], a_bits: dict[str, int], quantizer: str,
    context: dict[str, LayerOutput] | None = None,
) -> tuple[dict[str, LayerPoint], int]:
    """Each layer that runs, as a point (with what follows it in ``context``), and the output elements of all of
    them per sample."""
    layers = compressible_layers(model)
    seen: dict[str, tuple[tuple[int, ...], int, bool]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            # the sign of what the layer reads: its activation quantizer's, else the values themselves
            quant = getattr(module, ACT_QUANT, None)
            signed = bool(quant.signed) if quant is not None and getattr(quant, "calibrated", False) else bool((args[0] < 0).any())
            seen[name] = (tuple(args[0].shape[1:]), output[0].numel(), signed)
        return record

    reference = next(model.parameters(), None)
    x = _sample((2, *input_shape), signed=True).to(reference.device if reference is not None else "cpu")
    with probing(model, [m.register_forward_hook(hook(name)) for name, m in layers.items()]):
        model(x)
    points = {}
    for name, (in_shape, _, signed) in seen.items():
        layer = layers[name]
        w, a = w_bits.get(name, FLOAT_BITS), a_bits.get(name, FLOAT_BITS)
        common: dict[str, Any] = dict(
            in_shape=in_shape, bias=layer.bias is not None, w_bits=w, a_bits=a, signed=signed,
            quantizer=quantizer if min(w, a) < FLOAT_BITS else "",
        )
        if isinstance(layer, nn.Linear):
            points[name] = LayerPoint(op="linear", out_channels=layer.out_features, **common)
        else:
            points[name] = LayerPoint(
                op="conv1d" if isinstance(layer, nn.Conv1d) else "conv2d", out_channels=layer.out_channels,
                kernel=tuple(layer.kernel_size), stride=tuple(layer.stride), dilation=tuple(layer.dilation), groups=layer.groups,
                padding=layer.padding if isinstance(layer.padding, str) else tuple(layer.padding), **common,
            )
    for name, after in (context or {}).items():
        if name in points:
            bits, signed = _reader_quantize(points.get(after.reader) if after.reader else None)
            points[name] = points[name].model_copy(update={"batchnorm": after.batchnorm, "relu": after.relu, "output_bits": bits, "output_signed": signed})
    return points, sum(elements for _, elements, _ in seen.values())


Storage = Literal["float", "int8", "int16"]
# the activation bits that stand for each storage when the base model is measured with every layer at them
STORAGE_BITS: dict[str, int] = {"float": FLOAT_BITS, "int8": 8, "int16": 16}


def _storage(a_bits: int) -> Storage:
    """What the runtime holds a layer's input in: the operators before the layer run on it (a MaxPool moved
    after the QuantizeLinear runs on uint8), so the rest of the graph costs what its storage costs."""
    return "float" if a_bits >= FLOAT_BITS else "int8" if a_bits <= 8 else "int16"


def _input_elements(points: dict[str, LayerPoint]) -> dict[str, int]:
    return {name: math.prod(p.in_shape) for name, p in points.items()}


def _uniform_policy(model: nn.Module, bits: int, quantizer: str) -> Policy:
    every = LayerPolicy(w_bits=bits, a_bits=bits).model_dump()
    spec: dict[str, Any] = {"layers": dict.fromkeys(compressible_layers(model), every), "input_bits": bits, "finetune_steps": 0}
    if quantizer:
        spec["quantizer"] = json.loads(quantizer)
    return Policy.model_validate(spec)


def random_calibrated(model: nn.Module, policy: Policy, input_shape: tuple[int, ...]) -> CompressionResult:
    """``model`` compressed by ``policy`` without data: weights on the quantizer's grid, each layer's input
    quantizer calibrated on random values (a time does not depend on the values)."""
    from autoprune.quant import calibrate, make_act_quantizer

    result = static_compress(model, policy, input_shape=input_shape)  # type: ignore[arg-type]
    modules = dict(result.model.named_modules())
    quantizers = []
    for name, bits in result.act_bits.items():
        if bits not in FLOAT_ACT_BITS:
            # both inputs of a product (attention's QK^T and AV) as well as each layer's input
            for _, quantizer in attach_act_quantizers(modules[name], name, lambda: make_act_quantizer(policy, bits=bits)):
                quantizer.start_now()
                quantizers.append(quantizer)
    if quantizers:
        calibrate(result.model, quantizers, [_sample((LATENCY_BATCH, *input_shape), signed=True).to(next(result.model.parameters()).device)])
    return result


def _one_layer(point: LayerPoint) -> nn.Module:
    """The layer with the BatchNorm and ReLU that follow it in the model (the export folds the BN as it folds the
    whole model's, its per-channel scales and bias deciding the kernel)."""
    # a Linear reads its features last (tokens before them); a convolution its channels first
    channels = point.in_shape[-1] if point.op == "linear" else point.in_shape[0]
    if point.op == "linear":
        layer: nn.Module = nn.Linear(channels, point.out_channels, bias=point.bias)
    else:
        conv = nn.Conv1d if point.op == "conv1d" else nn.Conv2d
        layer = conv(channels, point.out_channels, point.kernel, stride=point.stride, padding=point.padding, dilation=point.dilation, groups=point.groups, bias=point.bias)
    after: list[nn.Module] = []
    if point.batchnorm:
        after.append((nn.BatchNorm2d if point.op == "conv2d" else nn.BatchNorm1d)(point.out_channels))
    if point.relu:
        after.append(nn.ReLU())
    return nn.Sequential(layer, *after).eval()


def _end_in_quantize(path: Path, *, bits: int, signed: bool) -> None:
    """The one-layer file's output quantized as the reading layer quantizes it, the graph's output its integers:
    onnxruntime fuses a DequantizeLinear -> Conv / Gemm -> QuantizeLinear into an integer kernel only with the
    QuantizeLinear there, as the whole model has it (the scale does not change the time)."""
    onnx = require("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    model = onnx.load(str(path))
    graph = model.graph
    storage = f"{'' if signed else 'u'}int{8 if bits <= 8 else 16}"
    output = graph.output[0]
    graph.initializer.extend([
        numpy_helper.from_array(np.array(0.05, dtype=np.float32), "output_scale"),
        numpy_helper.from_array(np.array(0, dtype=storage), "output_zero_point"),
    ])
    for node in graph.node:
        node.output[:] = ["output_float" if o == output.name else o for o in node.output]
    graph.node.append(helper.make_node("QuantizeLinear", ["output_float", "output_scale", "output_zero_point"], [output.name], name="output_quantize"))
    output.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(storage))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _compressed_layer(point: LayerPoint) -> CompressionResult:
    """The one-layer model compressed as the policy compresses the layer (its input is the network input,
    so its bits are the input's)."""
    torch.manual_seed(0)
    model = _one_layer(point)
    quantizer = json.loads(point.quantizer) if point.quantizer else "midrise"
    policy = Policy.model_validate({
        "layers": {"0": LayerPolicy(w_bits=point.w_bits, a_bits=point.a_bits).model_dump()},
        "input_bits": point.a_bits, "quantizer": quantizer, "finetune_steps": 0,
    })
    result = random_calibrated(model, policy, point.in_shape)
    if point.a_bits < FLOAT_BITS and not point.signed:
        # a layer after a ReLU reads unsigned values: calibrated on them, its QuantizeLinear is uint8
        from autoprune.quant import calibrate

        calibrate(result.model, None, [_sample((LATENCY_BATCH, *point.in_shape), signed=False)])
    return result


def write_layer_file(point: LayerPoint, path: Path, *, float_weights_off_kernel: bool = False) -> None:
    """The one-layer ONNX file timed for ``point``: exported by the whole model's path, ending in the reading
    layer's QuantizeLinear where the model has one."""
    from autoprune.deploy.onnx_export import export_onnx

    export_onnx(_compressed_layer(point), path, input_shape=point.in_shape)  # type: ignore[arg-type]
    if point.output_bits is not None:
        _end_in_quantize(path, bits=point.output_bits, signed=point.output_signed)
    if float_weights_off_kernel:
        from autoprune.deploy.graph import dequantize_weights
        from autoprune.deploy.verify import INTEGER_KERNELS, runtime_kernels

        onnx = require("onnx")
        model = onnx.load(str(path))
        dequantize_weights(model.graph, [n for n, k in runtime_kernels(path).items() if k not in INTEGER_KERNELS])
        onnx.save(model, str(path))


def _identity(table: LatencyTable) -> tuple[Any, ...]:
    return table.machine, table.onnxruntime, table.threads, table.batch_size, table.float_weights_off_kernel


class LatencyModel:
    """The latency model of one base model on this machine; ``estimate`` measures only the points it lacks."""

    def __init__(
        self, base_model: nn.Module, *, input_shape: tuple[int, ...], batch_size: int = LATENCY_BATCH, threads: int = LATENCY_THREADS,
        warmup: int = WARMUP, repeats: int = REPEATS, path: str | Path | None = None, float_weights_off_kernel: bool = False,
    ) -> None:
        """``float_weights_off_kernel``: the model deployed is exported with
        ``export_onnx(..., float_weights_off_kernel=True)`` (its own table)."""
        ort = require("onnxruntime")
        require("onnx")
        if batch_size < 1 or threads < 1 or repeats < 1 or warmup < 0:
            raise AutopruneError("latency", f"batch {batch_size}, threads {threads}, repeats {repeats}", "must be positive")
        self.base_model = base_model
        self.input_shape = tuple(input_shape)
        self.batch_size, self.threads, self.warmup, self.repeats = batch_size, threads, warmup, repeats
        self.float_weights_off_kernel = float_weights_off_kernel
        self.path = Path(path) if path is not None else table_path(batch_size=batch_size, threads=threads, float_weights_off_kernel=float_weights_off_kernel)
        empty = LatencyTable(
            machine=machine_name(), onnxruntime=ort.__version__, threads=threads, batch_size=batch_size, float_weights_off_kernel=float_weights_off_kernel,
        )
        self.table = self._read() or empty
        if _identity(self.table) != _identity(empty):
            self.table = empty
        # the base model's rest per storage, once per process (it compresses the base model to find its layers)
        self._rests: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}
        self._context: dict[str, LayerOutput] | None = None

    @property
    def context(self) -> dict[str, LayerOutput]:
        """What follows each layer of the base model (pruning and bits keep the graph's structure)."""
        if self._context is None:
            self._context = layer_context(self.base_model, self.input_shape)
        return self._context

    def _read(self) -> LatencyTable | None:
        if not self.path.is_file():
            return None
        try:
            return parse_model(LatencyTable, json.loads(self.path.read_text()), source=str(self.path), shape="a latency table")
        except (AutopruneError, ValueError, OSError):
            return None  # the cache is ours: an unreadable table is measured again

    def _save(self) -> None:
        on_disk = self._read()
        if on_disk is not None and _identity(on_disk) == _identity(self.table):
            self.table = self.table.merged(on_disk)
        write_atomic(self.path, self.table.model_dump_json(indent=1) + "\n")

    def _time(self, path: Path, shape: tuple[int, ...], *, signed: bool = True) -> float:
        return self._time_all([(path, shape, signed)])[0]

    def _time_all(self, files: list[tuple[Path, tuple[int, ...], bool]]) -> list[float]:
        """Each file's time: the fastest of ``BLOCKS`` medians, the files taking turns block by block."""
        runs = [(_session(path, self.threads), _sample((self.batch_size, *shape), signed=signed, seed=1).numpy()) for path, shape, signed in files]
        per_block = max(1, self.repeats // BLOCKS)
        best = [float("inf")] * len(runs)
        for block in range(BLOCKS):
            for index, (session, x) in enumerate(runs):
                median = time_session(session, x, threads=self.threads, warmup=self.warmup if block == 0 else 1, repeats=per_block)
                best[index] = min(best[index], median)
        return best

    def _overhead(self, folder: Path) -> float:
        if self.table.overhead_ms is None:
            onnx = require("onnx")
            helper = onnx.helper
            tensor = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["batch", 1]) for n in ("input", "output")]
            graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "overhead", tensor[:1], tensor[1:])
            path = folder / "overhead.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
            self.table = self.table.model_copy(update={"overhead_ms": self._time(path, (1,))})
        assert self.table.overhead_ms is not None
        return self.table.overhead_ms

    def _measure_layers(self, points: dict[str, LayerPoint], folder: Path) -> int:
        missing = {p.key: p for p in points.values() if p.key not in self.table.layers}
        files = []
        for index, (key, point) in enumerate(sorted(missing.items())):
            path = folder / f"layer_{index}.onnx"
            write_layer_file(point, path, float_weights_off_kernel=self.float_weights_off_kernel)
            files.append((path, point.in_shape, point.signed))
        measured = dict(zip(sorted(missing), self._time_all(files)))
        if measured:
            self.table = self.table.model_copy(update={"layers": {**self.table.layers, **measured}})
        return len(measured)

    def _whole(self, result: CompressionResult, folder: Path, name: str) -> float:
        from autoprune.deploy.onnx_export import export_onnx

        path = folder / f"{name}.onnx"
        export_onnx(result, path, input_shape=self.input_shape, float_weights_off_kernel=self.float_weights_off_kernel)  # type: ignore[arg-type]
        return self._time(path, self.input_shape)

    def _rest(self, storage: Storage, quantizer: str, folder: Path) -> tuple[float, dict[str, int], int]:
        """The base model's rest with every layer reading ``storage`` and its weights on ``quantizer``'s grid
        (its whole time less its layers), each layer's input elements per sample, and how many points that
        measured. The grid matters: at 8 bits a mid-tread grid's int8 weights let onnxruntime fuse the operators
        around a layer into its integer kernel (a uniform W8A8 MNIST-1D CNN: 0.33 ms whole), where the mid-rise
        grid's int16 weights leave them running (2.97 ms whole, 1.7 ms of it outside the layers)."""
        quantizer = "" if storage == "float" else quantizer
        if (storage, quantizer) in self._rests:
            return (*self._rests[storage, quantizer], 0)
        bits = STORAGE_BITS[storage]
        policy = _uniform_policy(self.base_model, bits, quantizer)
        base = random_calibrated(self.base_model, policy, self.input_shape)
        points, _ = _layer_points(
            base.model, self.input_shape, w_bits=dict.fromkeys(base.layers, bits), a_bits=dict(base.act_bits),
            quantizer=policy.quantizer.model_dump_json(), context=self.context,
        )
        measured = self._measure_layers(points, folder)
        grid = f":{hashlib.sha256(quantizer.encode()).hexdigest()[:8]}" if quantizer else ""
        key = f"{architecture_digest(self.base_model, self.input_shape)}:{storage}{grid}"
        if key not in self.table.models:
            self.table = self.table.model_copy(update={"models": {**self.table.models, key: self._whole(base, folder, "base")}})
            measured += 1
        overhead = self._overhead(folder)
        layers = sum(self.table.layers[p.key] - overhead for p in points.values())
        self._rests[storage, quantizer] = (self.table.models[key] - overhead - layers, _input_elements(points))
        return (*self._rests[storage, quantizer], measured)

    def float_base(self) -> CompressionResult:
        """The base model as a float CompressionResult (no layer quantized, the input float)."""
        return static_compress(self.base_model, Policy(input_bits=FLOAT_BITS), input_shape=self.input_shape)  # type: ignore[arg-type]

    def points(self, result: CompressionResult) -> dict[str, LayerPoint]:
        """Each layer of ``result`` as the point the table times it by."""
        w_bits = {name: lp.w_bits for name, lp in result.layers.items()}
        quantizer = result.policy.quantizer.model_dump_json()
        return _layer_points(result.model, self.input_shape, w_bits=w_bits, a_bits=dict(result.act_bits), quantizer=quantizer, context=self.context)[0]

    def estimate(self, result: CompressionResult) -> LatencyEstimate:
        """The predicted milliseconds per batch of ``result``'s exported model; the points it lacks are measured
        (and the table written) first."""
        points = self.points(result)
        elements = _input_elements(points)
        measured = 0
        rest_ms = 0.0
        with tempfile.TemporaryDirectory(prefix="autoprune-latency-") as tmp:
            folder = Path(tmp)
            overhead = self._overhead(folder)
            for storage in sorted({_storage(p.a_bits) for p in points.values()}):
                rest, base_elements, new = self._rest(storage, result.policy.quantizer.model_dump_json(), folder)
                measured += new
                # the rest is shared among the layers by the features they read, and shrinks with them
                total = sum(base_elements.values())
                rest_ms += sum(rest * elements[name] / total for name, p in points.items() if _storage(p.a_bits) == storage and name in base_elements)
            measured += self._measure_layers(points, folder)
        if measured:
            self._save()
        layers = {name: self.table.layers[p.key] - overhead for name, p in points.items()}
        return LatencyEstimate(total_ms=max(overhead, overhead + sum(layers.values()) + rest_ms), layers=layers, rest_ms=rest_ms, overhead_ms=overhead, measured=measured)

    def check(self, result: CompressionResult) -> LatencyCheck:
        """The estimate beside a whole-model run of ``result`` exported, timed the same way."""
        model_ms = self.estimate(result).total_ms
        from autoprune.deploy.verify import runtime_kernels

        with tempfile.TemporaryDirectory(prefix="autoprune-latency-") as tmp:
            measured_ms = self._whole(result, Path(tmp), "model")
            kernels = runtime_kernels(Path(tmp) / "model.onnx")
        return LatencyCheck(
            batch_size=self.batch_size, threads=self.threads, model_ms=model_ms, measured_ms=measured_ms,
            relative_error=(model_ms - measured_ms) / measured_ms, kernels=kernels,
        )


__all__ = [
    "LatencyModel", "LatencyTable", "LatencyEstimate", "LatencyCheck", "LayerPoint", "table_path", "machine_name",
    "time_session", "architecture_digest", "random_calibrated", "write_layer_file", "layer_context", "LATENCY_BATCH", "LATENCY_THREADS",
]
