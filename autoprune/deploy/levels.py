"""The integer levels behind a baked layer's weights: what the ONNX initializers and the packed file store.

``compress`` leaves each quantized layer's weights baked to float values on its quantizer's grid, with the
step in ``CompressionResult.weight_steps[name]``: one float (per-tensor) or one float per output channel
(per-channel, axis 0). The levels are recovered here once, and checked: ``scale * levels`` must give the
baked float32 weights back bit for bit, or the export refuses the layer.

- Mid-tread quantizers (``clip_uniform``, ``delayed``, ``saturated``; ``autoprune.quant.uniform``):
  W = step * n with n in -2^(b-1) .. 2^(b-1) - 1, so levels n at scale ``step``: b signed bits.
- Mid-rise (``midrise``, seed 000 App. A): W = delta * (k + 0.5) with k in -2^(b-1) .. 2^(b-1) - 1, or exactly 0
  for pruned weights and filters. Half-integers are not integers, so the levels are n = 2k + 1 (odd) at scale
  delta / 2, which is exact (halving a float is exact) and keeps 0 a level. |n| <= 2^b - 1 takes b + 1 signed
  bits: int8 holds b <= 7, int16 b <= 15, int32 b <= 31.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from autoprune.errors import AutopruneError
from autoprune.models import compressible_layers
from autoprune.policy import FLOAT_BITS

if TYPE_CHECKING:
    from autoprune.compress import CompressionResult


@dataclass(frozen=True)
class WeightLevels:
    """W = float32(scale[c] * levels) exactly (products in float64), c the output channel (axis 0)."""

    levels: torch.Tensor
    scale: torch.Tensor
    bits: int
    midrise: bool
    per_channel: bool

    @property
    def storage_bits(self) -> int:
        """Signed bits the levels need: b, or b + 1 for the odd mid-rise levels."""
        return self.bits + 1 if self.midrise else self.bits

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


def weight_levels(weight: torch.Tensor, steps: float | Sequence[float], *, bits: int, midrise: bool, name: str) -> WeightLevels:
    """The levels of one baked weight tensor; an AutopruneError when the weights are not on that grid."""
    weight = weight.detach().cpu()
    step, per_channel = steps_per_channel(steps, weight.shape[0], name=name)
    if not bool((step > 0).all()):
        raise AutopruneError(f"weight_steps[{name!r}]", steps, "must be positive")
    shape = (-1,) + (1,) * (weight.dim() - 1)
    ratio = weight.to(torch.float64) / step.view(shape)
    if midrise:
        scale = step / 2
        levels = torch.where(weight == 0, torch.zeros_like(ratio), 2 * torch.round(ratio - 0.5) + 1).to(torch.int64)
        low, high = -(2**bits - 1), 2**bits - 1
    else:
        scale = step
        levels = torch.round(ratio).to(torch.int64)
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if levels.numel() and (int(levels.min()) < low or int(levels.max()) > high):
        raise AutopruneError("weights", name, f"have levels outside {low}..{high} of {bits} bits at their step")
    if not torch.equal(rebuild(levels, scale), weight.to(torch.float32)):
        raise AutopruneError("weights", name, "are not on their quantizer's grid (step * level does not give them back)")
    return WeightLevels(levels, scale, bits, midrise, per_channel)


def layer_levels(result: CompressionResult) -> dict[str, WeightLevels | None]:
    """Levels of every compressible layer of a compressed model; None for a float (32-bit) layer."""
    from autoprune.quant import WEIGHT_QUANTIZERS, MidriseWeight

    midrise = issubclass(WEIGHT_QUANTIZERS.lookup(result.policy.quantizer), MidriseWeight)
    layers = compressible_layers(result.model)
    levels: dict[str, WeightLevels | None] = {}
    for name, layer in layers.items():
        policy = result.layers.get(name)
        if policy is None or policy.w_bits >= FLOAT_BITS or name not in result.weight_steps:
            levels[name] = None
        else:
            levels[name] = weight_levels(layer.weight, result.weight_steps[name], bits=policy.w_bits, midrise=midrise, name=name)
    return levels
