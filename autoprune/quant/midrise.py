"""The mid-rise integer weights of seed 000 App. A: the one definition the quantizer and the cost model share."""

from __future__ import annotations

import torch


def midrise_delta(weight: torch.Tensor, bits: int) -> float:
    """The step that lets b bits cover the layer's range: max|W| / 2^(b-1)."""
    peak = weight.detach().abs().max().item()
    return peak / 2 ** (bits - 1) if peak > 0 else 1.0


def midrise_int(weight: torch.Tensor, delta: float, bits: int) -> torch.Tensor:
    """W_int = floor(W / delta) + 0.5, clamped to +-(2^(b-1) - 0.5).

    An output filter whose weights all satisfy |W| < delta/2 becomes all zero (App. A), and so does
    every weight that is exactly zero (removed by pruning).
    """
    w = weight.detach().to(torch.float64)
    top = 2.0 ** (bits - 1) - 0.5
    w_int = torch.clamp(torch.floor(w / delta) + 0.5, -top, top)
    if w.dim() > 1:
        small = (w.abs() < delta / 2).flatten(1).all(dim=1)
        w_int[small] = 0.0
    return torch.where(w == 0, torch.zeros_like(w_int), w_int)


def level_bits(w_int: torch.Tensor) -> torch.Tensor:
    """Bits of each mid-rise level |x| in {0.5, 1.5, ...}: max(1, ceil(log2|x| + 1)); 0 for a zero weight."""
    magnitude = w_int.abs()
    bits = torch.clamp(torch.ceil(torch.log2(magnitude.clamp_min(0.5)) + 1), min=1)
    return torch.where(magnitude == 0, torch.zeros_like(bits), bits)


def tread_int(weight: torch.Tensor, delta: float | torch.Tensor, bits: int) -> torch.Tensor:
    """The integers k of a mid-tread b-bit grid (W_q = k * delta): round(W / delta) in two's complement range."""
    w = weight.detach().to(torch.float64)
    return torch.clamp(torch.round(w / delta), -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)


def tread_level_bits(k: torch.Tensor) -> torch.Tensor:
    """Two's complement bits of each integer level k: 1 + ceil(log2(k + 1)) for k > 0, 1 + ceil(log2(-k)) for
    k < 0 (-1 fits 1 bit, +1 needs 2), 0 for a zero weight."""
    k = k.to(torch.float64)
    positive = 1 + torch.ceil(torch.log2(k.clamp_min(0) + 1))
    negative = 1 + torch.ceil(torch.log2((-k).clamp_min(1)))
    return torch.where(k > 0, positive, torch.where(k < 0, negative, torch.zeros_like(k)))
