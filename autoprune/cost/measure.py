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
from autoprune.models import COMPRESSIBLE, CONVS, probing, reads_tensor
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
    """One Conv1d / Conv2d / Linear layer's cost. ``params`` and ``w_sparsity`` count the nonzero mid-rise levels."""

    name: str
    kind: Literal["conv", "linear"]
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
    layers: tuple[LayerCost, ...]
    total: CostTotal = field(init=False)
    # where the weights the ESN figures read came from, when the caller knows ("trained weights", ...)
    weights: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", CostTotal.of(self.layers))

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total.to_dict(), "layers": [layer.to_dict() for layer in self.layers], **({"weights": self.weights} if self.weights else {})}

    def performance_density(self, accuracy_percent: float) -> float:
        """Accuracy (%) per megabit of weights and features (seed 004)."""
        return accuracy_percent / self.total.memory_mb


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass
class _Seen:
    calls: int = 0
    out_shape: tuple[int, ...] = ()
    in_elements: int = 0
    reads_input: bool = False


def _trace(model: nn.Module, modules: Mapping[str, nn.Module], input_shape: tuple[int, ...]) -> dict[str, _Seen]:
    """One eval-mode forward pass of a zero sample, recording what each layer reads and writes."""
    seen = {name: _Seen() for name in modules}
    reference = next(model.parameters(), None)
    x = torch.zeros((1, *input_shape), device=reference.device if reference is not None else None,
                    dtype=reference.dtype if reference is not None else None)

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            s = seen[name]
            s.calls += 1
            s.out_shape = tuple(output.shape)
            s.in_elements = args[0].numel()
            s.reads_input = reads_tensor(args[0], x)
        return record

    with probing(model, [m.register_forward_hook(hook(name)) for name, m in modules.items()]):
        try:
            model(x)
        except (RuntimeError, ValueError) as exc:  # a shape the model cannot take: bad input, not a crash
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise AutopruneError("input_shape", "x".join(map(str, input_shape)), f"does not fit the model ({first})") from None
    for name, s in seen.items():
        if s.calls > 1:
            raise AutopruneError(f"model.{name}", s.calls, "calls per forward pass: a layer shared by several calls cannot be costed")
    return seen


def _layer_cost(name: str, module: nn.Module, seen: _Seen, quant: LayerQuant, input_bits: int) -> LayerCost:
    weight = module.weight.detach()
    if isinstance(module, CONVS):
        kind: Literal["conv", "linear"] = "conv"
        in_ch, out_ch, groups = module.in_channels, module.out_channels, module.groups
        kernel = tuple(module.kernel_size)
        out_hw = seen.out_shape[2:]
    else:
        kind = "linear"
        in_ch, out_ch, groups = module.in_features, module.out_features, 1
        kernel = (1, 1)
        out_hw = seen.out_shape[1:-1] or (1, 1)
    positions = math.prod(out_hw)
    keep_f = 1.0 - quant.f_sparsity
    a_bits = input_bits if seen.reads_input else quant.a_bits

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
        memory_mb=(params * quant.w_bits + seen.in_elements * a_bits * keep_f) / 1e6,
    )


def measure_cost(
    model: nn.Module,
    *,
    input_shape: tuple[int, ...],
    layers: Mapping[str, LayerQuant] | None = None,
    input_bits: int = FLOAT_BITS,
) -> CostReport:
    """Cost of every Conv1d / Conv2d / Linear layer that runs in one forward pass of one ``input_shape``
    sample, (C, H, W) for images or (C, L) for sequences.

    ``layers`` maps module names to their settings; a layer not named is float (``LayerQuant()``). A layer
    that reads the network input (or a view of it) counts ``input_bits`` activation bits instead of its
    ``a_bits``. Layers that never run (auxiliary heads) cost nothing and are left out. The model's train /
    eval mode is restored afterwards.
    """
    _check_bits("input_bits", input_bits)
    if not input_shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape):
        raise AutopruneError("input_shape", input_shape, "must be positive integer sizes of one sample, e.g. (3, 32, 32) or (1, 40)")
    modules = {name: m for name, m in model.named_modules() if isinstance(m, COMPRESSIBLE)}
    layers = dict(layers or {})
    for key, quant in layers.items():
        if not isinstance(quant, LayerQuant):
            raise AutopruneError(f"layers[{key!r}]", type(quant).__name__, "must be a LayerQuant")
        if key not in modules:
            raise AutopruneError("layers", key, f"is not a Conv1d/Conv2d/Linear layer of the model (layers: {', '.join(modules)})")
    seen = _trace(model, modules, tuple(input_shape))
    return CostReport(tuple(
        _layer_cost(name, m, seen[name], layers.get(name, LayerQuant()), input_bits)
        for name, m in modules.items() if seen[name].calls
    ))
