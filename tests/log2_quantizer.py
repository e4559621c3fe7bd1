"""A weight quantizer kind defined outside autoprune, in this one module: power-of-two levels (logarithmic
quantization), W_q = sign(W) * step * 2^e with e in 0 .. 2^(b-1) - 2, and 0 for weights below step / 2.

Its config, its quantizer and the grid of its levels register themselves on import; nothing else in autoprune
changes for a policy to name ``quantizer: log2`` and for the cost model, the ONNX export and the packed
weights to read what it produced.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from autoprune.operators import WEIGHT_QUANTIZER, WEIGHT_QUANTIZERS, WeightQuantizerConfig, register_config
from autoprune.quant.grids import GRIDS, MIDRISE, Grid
from autoprune.quant.uniform import straight_through
from autoprune.quant.weight import WeightQuantizer


def top_exponent(bits: int) -> int:
    """The largest exponent: the b-1 bits after the sign code 0 (zero) and 1 .. 2^(b-1) - 1 (exponents 0 ..)."""
    return 2 ** (bits - 1) - 2


def _powers(ratio: torch.Tensor, top: int | None) -> torch.Tensor:
    magnitude = ratio.abs().to(torch.float64)
    exponent = torch.round(torch.log2(magnitude.clamp_min(0.5)))
    exponent = exponent.clamp(0, top) if top is not None else exponent.clamp_min(0)
    return torch.where(magnitude < 0.5, torch.zeros_like(magnitude), torch.sign(ratio).to(torch.float64) * torch.exp2(exponent))


class Log2Grid(Grid):
    name = "log2"

    def read(self, weight: torch.Tensor, step: float | torch.Tensor, bits: int) -> torch.Tensor:
        return _powers(weight.detach().to(torch.float64) / step, top_exponent(bits))

    def nearest(self, ratio: torch.Tensor) -> torch.Tensor:
        return _powers(ratio, None).to(torch.int64)

    def level_bits(self, w_int: torch.Tensor) -> torch.Tensor:
        # a sign and the exponent's code e + 1
        exponent = torch.log2(w_int.abs().clamp_min(1).to(torch.float64))
        return torch.where(w_int == 0, torch.zeros_like(exponent), 1 + torch.ceil(torch.log2(exponent + 2)))

    def bounds(self, bits: int) -> tuple[int, int]:
        return -(2 ** top_exponent(bits)), 2 ** top_exponent(bits)

    def codes(self, levels: torch.Tensor, bits: int) -> torch.Tensor:
        # code 0 is zero; otherwise a sign bit and the exponent's code e + 1 in the b - 1 low bits
        exponent = torch.log2(levels.abs().clamp_min(1).to(torch.float64)).round().to(torch.int64)
        return torch.where(levels == 0, 0, torch.where(levels < 0, 2 ** (bits - 1), 0) + exponent + 1)

    def from_codes(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        field = codes % 2 ** (bits - 1)
        sign = torch.where(codes >= 2 ** (bits - 1), -1, 1)
        return torch.where(field == 0, 0, sign * 2 ** (field - 1).clamp_min(0))


@register_config(WEIGHT_QUANTIZER)
class Log2(WeightQuantizerConfig):
    """Power-of-two weight levels at a step that maps max|W| to the top level."""

    kind: Literal["log2"] = "log2"


@WEIGHT_QUANTIZERS.register(Log2)
class Log2Weight(WeightQuantizer):
    @classmethod
    def grid_for(cls, bits: int) -> Grid:
        return MIDRISE if bits == 32 else GRIDS["log2"]

    def _choose_delta(self, weight: torch.Tensor) -> float:
        peak = weight.detach().abs().max().item()
        return math.ldexp(peak, -top_exponent(self.bits)) if peak > 0 else 1.0

    def _fake_quantize(self, weight: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
        quantized = (_powers(weight.detach() / delta, top_exponent(self.bits)) * delta).to(weight.dtype)
        return straight_through(weight, quantized)
