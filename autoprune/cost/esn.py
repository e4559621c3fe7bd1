"""Effective Signal Norms of one layer's integer weights (seed 000 eq. 2-4, 7), read on the grid its
quantizer produced (``autoprune.quant.grids``: mid-rise levels by default)."""

from __future__ import annotations

import math

import torch

from autoprune.quant.grids import MIDRISE, Grid, grid_named


def bits_of_levels(w_int: torch.Tensor, grid: Grid | str = MIDRISE) -> torch.Tensor:
    return grid_named(grid).level_bits(w_int)


def esn_a(w_int: torch.Tensor) -> float:
    """||W_int||_F^2 (eq. 2 for one layer, c = 1)."""
    return float(w_int.to(torch.float64).square().sum().item())


def esn_d(w_int: torch.Tensor, grid: Grid | str = MIDRISE) -> float:
    """Linear sum of the bits of every level (eq. 3 as autoprune reads it, c = 1)."""
    return float(bits_of_levels(w_int, grid).sum().item())


def filter_bits(w_int: torch.Tensor, grid: Grid | str = MIDRISE) -> torch.Tensor:
    """Bits of each output filter's widest level (dim 0 indexes filters); 0 for a pruned filter."""
    return bits_of_levels(w_int, grid).flatten(1).amax(dim=1)


def esn_a_from_snr(weight: torch.Tensor, w_int: torch.Tensor, delta: float) -> float:
    """Eq. 4 for one layer: S/N x ||W||_0 / 12, S/N = ||W||_F^2 / ||W - delta W_int||_F^2.

    Infinite when W is reproduced exactly (no quantization noise), 0 for an all-zero W.
    """
    w = weight.detach().to(torch.float64)
    signal = w.square().sum().item()
    if signal == 0:
        return 0.0
    noise = (w - delta * w_int.to(torch.float64)).square().sum().item()
    if noise == 0:
        return math.inf
    return signal / noise * torch.count_nonzero(w).item() / 12
