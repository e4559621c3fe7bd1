"""The integer levels behind a baked layer's weights: what the ONNX initializers and the packed file store.

``compress`` leaves each quantized layer's weights baked to float values on its quantizer's grid, with the
step in ``CompressionResult.weight_steps[name]``: one float (per-tensor) or one float per output channel
(per-channel, axis 0). The grid is the one the policy's quantizer kind declares at the layer's bits
(``WeightQuantizer.grid_for``, ``autoprune.quant.grids``): W = scale * n with integer levels n and
scale = grid.unit * step. The levels are recovered here once, and checked: ``scale * levels`` must give the
baked float32 weights back bit for bit, and the levels must lie in the grid's range, or the export refuses
the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from autoprune.bits import FLOAT_BITS
from autoprune.errors import AutopruneError
from autoprune.models import compressible_layers
from autoprune.operators import WEIGHT_QUANTIZERS
from autoprune.quant.grids import Grid

if TYPE_CHECKING:
    from autoprune.compress import CompressionResult


@dataclass(frozen=True)
class WeightLevels:
    """W = float32(scale[c] * levels) exactly (products in float64), c the output channel (axis 0)."""

    levels: torch.Tensor
    scale: torch.Tensor
    bits: int
    grid: Grid
    per_channel: bool

    @property
    def storage_bits(self) -> int:
        """Signed bits the integer levels need (b on a mid-tread grid, b + 1 for the odd mid-rise levels)."""
        return self.grid.storage_bits(self.bits)

    @property
    def steps(self) -> torch.Tensor:
        """The quantizer's step per output channel (scale / unit)."""
        return self.scale / self.grid.unit

    def values(self) -> torch.Tensor:
        return rebuild(self.levels, self.scale)


def rebuild(levels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32(scale[c] * n): the product in float64, as the quantizers bake it, rounded once to float32."""
    shape = (-1,) + (1,) * (levels.dim() - 1)
    return (scale.to(torch.float64).view(shape) * levels.to(torch.float64)).to(torch.float32)


def steps_per_channel(steps: float | Sequence[float], out_channels: int, *, name: str) -> tuple[torch.Tensor, bool]:
    """The step of each output channel, and whether the layer is per-channel."""
    if isinstance(steps, (int, float)):
        return torch.full((out_channels,), float(steps), dtype=torch.float64), False
    values = torch.tensor([float(s) for s in steps], dtype=torch.float64)
    if values.numel() != out_channels:
        raise AutopruneError(f"weight_steps[{name!r}]", len(values), f"must give one step per output channel ({out_channels})")
    return values, True


def weight_levels(weight: torch.Tensor, steps: float | Sequence[float], *, bits: int, grid: Grid, name: str) -> WeightLevels:
    """The levels of one baked weight tensor on ``grid``; an AutopruneError when the weights are not on it."""
    weight = weight.detach().cpu()
    step, per_channel = steps_per_channel(steps, weight.shape[0], name=name)
    if not bool((step > 0).all()):
        raise AutopruneError(f"weight_steps[{name!r}]", steps, "must be positive")
    shape = (-1,) + (1,) * (weight.dim() - 1)
    ratio = weight.to(torch.float64) / step.view(shape)
    # exact zeros are removed weights on every grid; a level beyond the range is refused, never clamped
    levels = torch.where(weight == 0, torch.zeros(ratio.shape, dtype=torch.int64), grid.nearest(ratio))
    low, high = grid.bounds(bits)
    if levels.numel() and (int(levels.min()) < low or int(levels.max()) > high):
        raise AutopruneError("weights", name, f"have levels outside {low}..{high} of {bits} bits at their step on the {grid.name} grid")
    scale = step * grid.unit
    if not torch.equal(rebuild(levels, scale), weight.to(torch.float32)):
        raise AutopruneError("weights", name, f"are not on their quantizer's {grid.name} grid (step * level does not give them back)")
    return WeightLevels(levels, scale, bits, grid, per_channel)


def layer_levels(result: CompressionResult) -> dict[str, WeightLevels | None]:
    """Levels of every compressible layer of a compressed model; None for a float (32-bit) layer."""
    quantizer = WEIGHT_QUANTIZERS.lookup(result.policy.quantizer)
    layers = compressible_layers(result.model)
    levels: dict[str, WeightLevels | None] = {}
    for name, layer in layers.items():
        policy = result.layers.get(name)
        if policy is None or policy.w_bits >= FLOAT_BITS or name not in result.weight_steps:
            levels[name] = None
        else:
            grid = quantizer.grid_for(policy.w_bits)
            levels[name] = weight_levels(layer.weight, result.weight_steps[name], bits=policy.w_bits, grid=grid, name=name)
    return levels
