"""The uniform grid shared by the non-mid-rise quantizers: seed 003 eq. 20-21, the STE, the MSE step search.

Eq. 20-21 with the range [m, M] = [-M, M] (signed) or [0, M] (unsigned, after a ReLU):

    Q(x) = round((clip(x, m, M) - m) / scale) * scale + m,    scale = (M - m) / 2^n

With m = -M that is ``round(clip(x) / scale) * scale`` (m is a whole number of steps), a *mid-tread* grid:
zero is a level, so pruned weights and masked features stay exactly zero. Rounded as printed, the grid has
2^n + 1 levels, one more than n bits hold; the integer is clamped to 2^n levels (signed -2^(n-1) .. 2^(n-1) - 1,
unsigned 0 .. 2^n - 1), which drops the single top level M.

A signed grid below ``MIDRISE_BELOW`` bits is *mid-rise* instead: two's complement at 1 bit is {-M, 0},
which sends every positive value to zero, and at 2 bits {-2, -1, 0, 1} steps is lopsided. The mid-rise
levels (k + 1/2) * step, k = -2^(n-1) .. 2^(n-1) - 1, keep both signs and symmetry (+-step/2 at 1 bit,
+-step/2 and +-3 step/2 at 2 bits), the form of seed 000 App. A. An exact zero stays zero there too (a pruned
weight or a masked feature is not a value to represent).
"""

from __future__ import annotations

import math

import torch

from autoprune.errors import AutopruneError

CLIP_GRID = 100
"""Candidate clip ranges of the MSE search: k / CLIP_GRID of the largest magnitude, k = 1 .. CLIP_GRID."""

MIN_CLIP = 2.0**-100
"""Ranges below this (zero, or a degenerate few subnormals) take a unit range: every level of theirs
would be a float32 subnormal or zero. A network's real values never come this close to zero."""

_FLOAT32_MANTISSA = 24
_EXACT_UP_TO_BITS = 16


def uniform_step(clip: float, *, bits: int, signed: bool) -> float:
    """Eq. 21's scale for the range [-clip, clip] or [0, clip], rounded up to a float32-friendly value.

    The step keeps at most 24 - bits significant bits, so every level (an integer of at most ``bits`` bits)
    times the step is exact in float32: W_q / delta then gives the integer back exactly, which the cost
    model's ``midrise_int(W_q, delta)`` relies on (a level a hair below k would floor to k - 1). Rounding up
    changes the range by less than 2^-8 and never clips the largest value. Above 16 bits float32 cannot be
    exact for every level; the step is then only rounded to float32. An all-zero tensor keeps a unit range,
    as ``midrise_delta`` does, and so does a range below ``MIN_CLIP`` (its step would underflow float32 to
    zero, and x / 0 is NaN). A range that is not finite has no step: ``AutopruneError``.
    """
    if not math.isfinite(clip):
        raise AutopruneError("quantization range", clip, "is not finite: the values quantized hold inf or NaN")
    if clip < MIN_CLIP:
        clip = 1.0
    step = 2 * clip / 2**bits if signed else clip / 2**bits
    precision = _FLOAT32_MANTISSA - bits if bits <= _EXACT_UP_TO_BITS else _FLOAT32_MANTISSA
    mantissa, exponent = math.frexp(step)
    return math.ldexp(math.ceil(mantissa * 2**precision) / 2**precision, exponent)


MIDRISE_BELOW = 3
"""Signed grids of fewer bits are mid-rise (see the module docstring)."""


def is_midrise(*, bits: int, signed: bool) -> bool:
    return signed and bits < MIDRISE_BELOW


def level_range(*, bits: int, signed: bool) -> tuple[int, int]:
    """The integers of an n-bit grid: two's complement when signed, 0 .. 2^n - 1 otherwise."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def uniform_values(x: torch.Tensor, *, step: float | torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Eq. 20 on the n-bit grid (mid-rise for signed grids below 3 bits), no gradient."""
    low, high = level_range(bits=bits, signed=signed)
    x = x.detach()
    if is_midrise(bits=bits, signed=signed):
        levels = torch.clamp(torch.floor(x / step), low, high) + 0.5
        return torch.where(x == 0, torch.zeros_like(x), levels * step)
    return torch.clamp(torch.round(x / step), low, high) * step


def straight_through(x: torch.Tensor, quantized: torch.Tensor, passes: torch.Tensor | None = None) -> torch.Tensor:
    """The value of ``quantized`` with the gradient of ``x`` (STE), zeroed where ``passes`` is False.

    ``x - x.detach()`` is exactly zero, so the forward value is ``quantized`` bit for bit.
    """
    through = x - x.detach()
    if passes is not None:
        through = through * passes
    return quantized.detach() + through


def fake_uniform(x: torch.Tensor, *, step: float | torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Eq. 20 in float with the STE of seed 003: the gradient passes inside the clip range only."""
    top = 2 ** (bits - 1) * step if signed else 2**bits * step
    passes = (x >= -top) & (x <= top) if signed else (x >= 0) & (x <= top)
    return straight_through(x, uniform_values(x, step=step, bits=bits, signed=signed), passes)


def mse_optimal_step(
    x: torch.Tensor, *, bits: int, signed: bool, clip: float, target: torch.Tensor | None = None
) -> float:
    """The step of the clip range k / CLIP_GRID * clip that minimises ||Q(x) - target||^2 (target = x by default).

    This is d* of seed 004 eq. 5 (eq. 7 with a saturated target) over a grid of clip ranges rather than over
    power-of-two steps 2^-d. The search runs from the full range down and keeps the first minimum, so the
    result is never worse than the max-abs range ``clip`` itself.
    """
    values = x.detach()
    reference = (values if target is None else target.detach()).to(torch.float64)
    best_step, best_error = 0.0, math.inf
    for k in range(CLIP_GRID, 0, -1):
        step = uniform_step(clip * k / CLIP_GRID, bits=bits, signed=signed)
        error = (uniform_values(values, step=step, bits=bits, signed=signed).to(torch.float64) - reference).square().sum().item()
        if error < best_error:
            best_step, best_error = step, error
    return best_step


def quantile(x: torch.Tensor, q: float) -> float:
    """The q-quantile of the nonzero magnitudes of ``x`` (linear interpolation, as numpy's default).

    Zeros are left out: they are pruned weights or masked features, not part of the distribution to clip,
    and counting them would give a layer pruned beyond 1 - q a zero range.
    """
    magnitudes = x.detach().abs().flatten()
    magnitudes = magnitudes[magnitudes > 0].to(torch.float64)
    if magnitudes.numel() == 0:
        return 0.0
    ordered = torch.sort(magnitudes).values
    position = q * (ordered.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, ordered.numel() - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
