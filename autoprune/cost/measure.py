"""Measure a model on the ideal-hardware cost model; the formulas are in the package docstring."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from autoprune.bits import FLOAT_BITS
from autoprune.cost.esn import esn_a, esn_d, filter_bits
from autoprune.errors import AutopruneError
from autoprune.cost.ops import ElementCount, OpCost, OpRecorder, Uncounted
from autoprune.models import COMPRESSIBLE, CONVS, probing, reads_tensor
from autoprune.models.convert import MatMul, converted
from autoprune.quant.grids import MIDRISE, Grid, grid_named
from autoprune.quant.midrise import midrise_delta


def _check_bits(name: str, bits: Any) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= FLOAT_BITS:
        raise AutopruneError(name, bits, f"must be an integer number of bits in 1..{FLOAT_BITS}")


@dataclass(frozen=True)
class LayerQuant:
    """How one layer is costed: its weight bits and the bits / sparsity of the features it reads.

    ``delta`` is the weight step: one float, or one per output channel (per-channel quantization); ``grid``
    says which levels the weight quantizer produced (``autoprune.quant.grids``: ``midrise``, App. A's, or
    ``midtread``, integers k, or any registered grid, by object or name), so the cost counts the levels really
    used. ``masked`` says that an unstructured mask zeroed some of the weights,
    so the exact zeros of a float (``w_bits`` 32) layer are pruned weights; without it a float layer's exact
    zeros are weights like any other. A quantized layer's zeros are always pruned (by a mask, or by the
    quantizer mapping them to 0).
    """

    w_bits: int = FLOAT_BITS
    a_bits: int = FLOAT_BITS
    f_sparsity: float = 0.0
    delta: float | tuple[float, ...] | None = None
    grid: Grid | str = MIDRISE
    masked: bool = False

    def __post_init__(self) -> None:
        _check_bits("w_bits", self.w_bits)
        _check_bits("a_bits", self.a_bits)
        if not 0.0 <= self.f_sparsity < 1.0:
            raise AutopruneError("f_sparsity", self.f_sparsity, "must be in [0, 1)")
        if isinstance(self.delta, (list, tuple)):
            object.__setattr__(self, "delta", tuple(float(d) for d in self.delta))
        steps = self.delta if isinstance(self.delta, tuple) else (self.delta,)
        if self.delta is not None and not (steps and all(math.isfinite(d) and d > 0 for d in steps)):
            raise AutopruneError("delta", self.delta, "must be positive finite steps (or None for max|W| / 2^(b-1))")
        object.__setattr__(self, "grid", grid_named(self.grid))


@dataclass(frozen=True)
class LayerCost:
    """One row of the cost: a Conv1d / Conv2d / Linear layer, a product of two activations (``product``: a
    ``MatMul`` site; ``w_bits`` is then the bits of its second input), an embedding (lookups, no MACs) or an
    op counted at the dispatch level (``op``: a float multiplication outside any module autoprune compresses).
    ``params`` and ``w_sparsity`` count the nonzero mid-rise levels."""

    name: str
    kind: Literal["conv", "linear", "product", "embedding", "op"]
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, ...]
    out_hw: tuple[int, ...]
    in_elements: int
    dense_params: int
    params: int
    w_bits: int
    a_bits: int
    w_sparsity: float
    f_sparsity: float
    macs: float
    bops: float
    esn_a: float
    esn_d: float
    esn_d_prime: float
    esn_a_comp: float
    esn_d_comp: float
    memory_mb: float

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class CostTotal:
    """Sums over the layers."""

    macs: float = 0.0
    bops: float = 0.0
    esn_a: float = 0.0
    esn_d: float = 0.0
    esn_d_prime: float = 0.0
    esn_a_comp: float = 0.0
    esn_d_comp: float = 0.0
    memory_mb: float = 0.0
    params: int = 0
    dense_params: int = 0

    @classmethod
    def of(cls, layers: tuple[LayerCost, ...]) -> "CostTotal":
        sums = {f.name: math.fsum(getattr(layer, f.name) for layer in layers) for f in fields(cls)}
        return cls(**{**sums, "params": int(sums["params"]), "dense_params": int(sums["dense_params"])})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class CostReport:
    """Every row of the cost and its total; ``elements`` lists normalizations, nonlinearities and parameters
    only added or concatenated (no MACs), ``uncounted`` what multiplies but could not be counted."""

    layers: tuple[LayerCost, ...]
    total: CostTotal = field(init=False)
    # where the weights the ESN figures read came from, when the caller knows ("trained weights", ...)
    weights: str | None = None
    elements: tuple[ElementCount, ...] = ()
    uncounted: tuple[Uncounted, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", CostTotal.of(self.layers))

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total.to_dict(), "layers": [layer.to_dict() for layer in self.layers],
            "elements": [e.to_dict() for e in self.elements], "uncounted": [u.to_dict() for u in self.uncounted],
            **({"weights": self.weights} if self.weights else {}),
        }

    def performance_density(self, accuracy_percent: float) -> float:
        """Accuracy (%) per megabit of weights and features (seed 004)."""
        return accuracy_percent / self.total.memory_mb


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


COUNTED = (*COMPRESSIBLE, MatMul, nn.Embedding)
"""Modules with a row of their own; the ops they issue are not counted again."""


@dataclass
class _Seen:
    """What one module read and wrote over its calls in the traced forward (a hidden Linear of an unrolled
    recurrent layer runs once per step: its output positions and input elements add up)."""

    calls: int = 0
    out_shape: tuple[int, ...] = ()
    positions: int = 0
    in_elements: int = 0
    reads_input: bool = False
    # a product's second input, and its MACs (output elements x the inner size)
    b_elements: int = 0
    b_reads_input: bool = False
    inner: int = 0
    macs: int = 0


@dataclass
class _Trace:
    seen: dict[str, _Seen]
    recorder: OpRecorder


def _positions(module: nn.Module, out_shape: tuple[int, ...]) -> int:
    if isinstance(module, CONVS):
        return math.prod(out_shape[2:])
    return math.prod(out_shape[1:-1])


def _trace(model: nn.Module, modules: Mapping[str, nn.Module], input_shape: tuple[int, ...]) -> _Trace:
    """One eval-mode forward pass of a zero sample, recording what each counted module reads and writes and,
    at the dispatch level, the ops issued outside them."""
    seen = {name: _Seen() for name in modules}
    reference = next(model.parameters(), None)
    x = torch.zeros((1, *input_shape), device=reference.device if reference is not None else None,
                    dtype=reference.dtype if reference is not None else None)
    recorder = OpRecorder(params={p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}, skip=set(modules))

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            s = seen[name]
            s.calls += 1
            s.out_shape = tuple(output.shape)
            s.in_elements += args[0].numel()
            s.reads_input |= reads_tensor(args[0], x)
            if isinstance(module, MatMul):
                s.b_elements += args[1].numel()
                s.b_reads_input |= reads_tensor(args[1], x)
                s.inner = args[0].shape[-1]
                s.macs += output.numel() * s.inner
            elif not isinstance(module, nn.Embedding):
                s.positions += _positions(module, s.out_shape)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda _m, _a, name=name: recorder.enter(name)))
        handles.append(m.register_forward_hook(lambda _m, _a, _o: recorder.leave()))
    fast_path = torch.backends.mha.get_fastpath_enabled()
    with probing(model, handles):
        try:
            # nn.MultiheadAttention's fused fast path would hide its projections from the op recorder
            torch.backends.mha.set_fastpath_enabled(False)
            with recorder:
                model(x)
        except (RuntimeError, ValueError) as exc:  # a shape the model cannot take: bad input, not a crash
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise AutopruneError("input_shape", "x".join(map(str, input_shape)), f"does not fit the model ({first})") from None
        finally:
            torch.backends.mha.set_fastpath_enabled(fast_path)
    return _Trace(seen, recorder)


def _product_cost(name: str, seen: _Seen, quant: LayerQuant, input_bits: int) -> LayerCost:
    a_bits = input_bits if seen.reads_input else quant.a_bits
    b_bits = input_bits if seen.b_reads_input else quant.w_bits
    return LayerCost(
        name=name, kind="product", in_channels=seen.inner, out_channels=seen.out_shape[-1],
        groups=1, kernel=(), out_hw=seen.out_shape[1:-1], in_elements=seen.in_elements + seen.b_elements, dense_params=0, params=0,
        w_bits=b_bits, a_bits=a_bits, w_sparsity=0.0, f_sparsity=0.0, macs=float(seen.macs), bops=float(seen.macs * a_bits * b_bits),
        esn_a=0.0, esn_d=0.0, esn_d_prime=0.0, esn_a_comp=0.0, esn_d_comp=0.0,
        memory_mb=(seen.in_elements * a_bits + seen.b_elements * b_bits) / 1e6,
    )


def _op_cost(op: OpCost) -> LayerCost:
    return LayerCost(
        name=op.name, kind="op", in_channels=0, out_channels=0, groups=1, kernel=(), out_hw=(), in_elements=op.in_elements,
        dense_params=0, params=0, w_bits=FLOAT_BITS, a_bits=FLOAT_BITS, w_sparsity=0.0, f_sparsity=0.0, macs=op.macs,
        bops=op.macs * FLOAT_BITS * FLOAT_BITS, esn_a=0.0, esn_d=0.0, esn_d_prime=0.0, esn_a_comp=0.0, esn_d_comp=0.0,
        memory_mb=op.in_elements * FLOAT_BITS / 1e6,
    )


def _layer_cost(name: str, module: nn.Module, seen: _Seen, quant: LayerQuant, input_bits: int) -> LayerCost:
    weight = module.weight.detach()
    kind: Literal["conv", "linear", "embedding"]
    if isinstance(module, CONVS):
        kind = "conv"
        in_ch, out_ch, groups = module.in_channels, module.out_channels, module.groups
        kernel = tuple(module.kernel_size)
    elif isinstance(module, nn.Embedding):
        kind = "embedding"
        in_ch, out_ch, groups = module.num_embeddings, module.embedding_dim, 1
        kernel = ()
    else:
        kind = "linear"
        in_ch, out_ch, groups = module.in_features, module.out_features, 1
        kernel = (1, 1)
    out_hw = (seen.out_shape[2:] if kind == "conv" else seen.out_shape[1:-1] or (1, 1)) if seen.calls == 1 else (seen.positions,)
    if kind == "embedding":
        out_hw = (seen.in_elements,)  # rows looked up
    # an embedding looks rows up: no MACs, and its input (indices) is no feature map
    positions = seen.positions
    keep_f = 1.0 - quant.f_sparsity
    a_bits = input_bits if seen.reads_input else quant.a_bits
    features = 0 if kind == "embedding" else seen.in_elements

    delta: float | torch.Tensor = quant.delta if quant.delta is not None else midrise_delta(weight, quant.w_bits)
    if isinstance(delta, tuple):
        if len(delta) != weight.shape[0]:
            raise AutopruneError(f"layers[{name!r}].delta", len(delta), f"steps given for {weight.shape[0]} output channels")
        delta = torch.tensor(delta, dtype=torch.float64).view(-1, *([1] * (weight.dim() - 1)))
    grid = grid_named(quant.grid)
    w_int = grid.read(weight, delta, quant.w_bits)
    if grid is MIDRISE and quant.w_bits == FLOAT_BITS and not quant.masked:
        # Nothing removed these zeros (no mask, no quantizer): mid-rise has no zero level, so they read as +-0.5.
        w_int = torch.where(w_int == 0, torch.floor(weight.to(torch.float64) / delta) + 0.5, w_int)
    nonzero_per_filter = (w_int != 0).flatten(1).sum(dim=1).to(torch.float64)
    params = int(nonzero_per_filter.sum().item())
    dense = weight.numel()

    # c^l of eq. 1 for the computation-weighted ESN: the MACs each nonzero weight takes part in.
    computations = positions * keep_f
    macs = params * computations
    esn_d_prime = float((nonzero_per_filter * filter_bits(w_int, grid)).sum().item()) * computations
    layer_esn_a, layer_esn_d = esn_a(w_int), esn_d(w_int, grid)
    return LayerCost(
        name=name, kind=kind, in_channels=in_ch, out_channels=out_ch, groups=groups, kernel=kernel,
        out_hw=tuple(out_hw), in_elements=seen.in_elements, dense_params=dense, params=params,
        w_bits=quant.w_bits, a_bits=a_bits, w_sparsity=1.0 - params / dense, f_sparsity=quant.f_sparsity,
        macs=float(macs), bops=float(macs * quant.w_bits * a_bits), esn_a=layer_esn_a, esn_d=layer_esn_d,
        esn_d_prime=esn_d_prime, esn_a_comp=layer_esn_a * computations, esn_d_comp=layer_esn_d * computations,
        memory_mb=(params * quant.w_bits + features * a_bits * keep_f) / 1e6,
    )


def measure_cost(
    model: nn.Module,
    *,
    input_shape: tuple[int, ...],
    layers: Mapping[str, LayerQuant] | None = None,
    input_bits: int = FLOAT_BITS,
) -> CostReport:
    """Cost of one forward pass of one ``input_shape`` sample, (C, H, W) for images or (C, L) for sequences:
    a row per Conv1d / Conv2d / Linear layer, ``MatMul`` product and Embedding that runs, and per
    multiplication issued outside them (``torch.matmul`` in a forward, scaled-dot-product attention, ...).

    A model holding ``nn.MultiheadAttention`` / GRU / LSTM / RNN layers is costed as its Linear-layer
    equivalent (``autoprune.models.convert``), so their projections, gates at every step and attention
    products are rows of their own (``attn.q_proj``, ``attn.qk``, ``gru.cells.l0.hh``, ...).

    ``layers`` maps module names to their settings; a layer not named is float (``LayerQuant()``). A layer
    that reads the network input (or a view of it) counts ``input_bits`` activation bits instead of its
    ``a_bits``. Layers that never run (auxiliary heads) cost nothing and are left out. The model's train /
    eval mode is restored afterwards.
    """
    _check_bits("input_bits", input_bits)
    if not input_shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape):
        raise AutopruneError("input_shape", input_shape, "must be positive integer sizes of one sample, e.g. (3, 32, 32) or (1, 40)")
    model = converted(model)
    modules = {name: m for name, m in model.named_modules() if isinstance(m, COUNTED)}
    layers = dict(layers or {})
    for key, quant in layers.items():
        if not isinstance(quant, LayerQuant):
            raise AutopruneError(f"layers[{key!r}]", type(quant).__name__, "must be a LayerQuant")
        if key not in modules:
            raise AutopruneError("layers", key, f"is not a Conv1d/Conv2d/Linear layer, product or embedding of the model (layers: {', '.join(modules)})")
    trace = _trace(model, modules, tuple(input_shape))
    rows = [
        _product_cost(name, trace.seen[name], layers.get(name, LayerQuant()), input_bits) if isinstance(m, MatMul)
        else _layer_cost(name, m, trace.seen[name], layers.get(name, LayerQuant()), input_bits)
        for name, m in modules.items() if trace.seen[name].calls
    ]
    recorder = trace.recorder
    params = dict(model.named_parameters())
    added = [ElementCount(name, "parameter", params[name].numel()) for name in sorted(recorder.passive_params)]
    return CostReport(
        (*rows, *(_op_cost(op) for op in recorder.ops)), elements=(*recorder.elements, *added), uncounted=tuple(recorder.uncounted),
    )
