"""The learnable non-linear quantizer of seed 002 sec. 3.1 (eq. 1-7); the equations are in the package docstring."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from autoprune.policy import FLOAT_BITS
from autoprune.quant.pow2 import pow2_bits

T_MIN = 0.1
"""Smallest exponent t: eq. 1 needs t > 0, and near 0 every weight above q_s maps to one level."""

_LEVEL_TOLERANCE = 1e-4
"""(q_m - q_s)^t / d is computed in float: a level count within this of an integer is that integer."""


class NonlinearQuant(torch.autograd.Function):
    """x_q of eq. 2 with the straight-through gradients of eq. 5 (d), 6 (q_m) and 7 (t).

    The rounding passes gradients straight through, which is how eq. 5-7 follow from eq. 2; the gradient to x
    is the same derivative of the mapping of eq. 1, t (|x| - q_s)^(t-1) inside [q_s, q_m] and 0 outside (the
    paper does not print it). Its base is floored at q_s so that t < 1 cannot make it infinite at |x| = q_s.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q_m: torch.Tensor, t: torch.Tensor, d: torch.Tensor, q_s: float) -> torch.Tensor:
        magnitude = x.abs()
        inside = (magnitude >= q_s) & (magnitude <= q_m)
        above = magnitude > q_m
        base = torch.where(above, q_m - q_s, (magnitude - q_s).clamp(min=0.0))
        mapped = base.pow(t)
        scaled = mapped / d
        sign = torch.sign(x)
        out = torch.where(inside | above, sign * d * torch.round(scaled), torch.zeros_like(x))
        ctx.save_for_backward(sign, inside, above, base, mapped, scaled, q_m, t, d)
        ctx.q_s = q_s
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        sign, inside, above, base, mapped, scaled, q_m, t, d = ctx.saved_tensors
        live = inside | above
        zero = torch.zeros_like(grad)
        grad_d = torch.where(live, sign * (torch.round(scaled) - scaled), zero)  # eq. 5
        grad_q_m = torch.where(above, sign * t * (q_m - ctx.q_s).pow(t - 1), zero)  # eq. 6
        grad_t = torch.where(live, sign * mapped * torch.log(base.clamp(min=ctx.q_s)), zero)  # eq. 7
        grad_x = torch.where(inside, t * base.clamp(min=ctx.q_s).pow(t - 1), zero)
        return (
            grad * grad_x,
            (grad * grad_q_m).sum().reshape(q_m.shape),
            (grad * grad_t).sum().reshape(t.shape),
            (grad * grad_d).sum().reshape(d.shape),
            None,
        )


def _ceil_straight_through(x: torch.Tensor) -> torch.Tensor:
    """ceil(x) forward (within the level tolerance), identity backward: eq. 3-4 stay differentiable for eq. 17."""
    return x + (torch.ceil(x - _LEVEL_TOLERANCE) - x).detach()


class LearnedQuantizer(nn.Module):
    """One tensor's quantizer: learnable q_m, t (weights only) and d, fixed q_s (buffers, so they are saved).

    ``signed`` picks the bit-width rule: eq. 3 for a symmetric grid (weights, signed activations), eq. 4 for
    the unsigned grid of ReLU activations. ``pow2`` applies Alg. 2 in the forward pass: the bits are rounded
    down to a power of two and d is replaced by the step of those bits with q_m kept; the gradients still
    reach d as if it were unchanged ("no change in the backward pass").
    """

    def __init__(self, *, q_m: float, bits: int, signed: bool, learn_t: bool, q_s_ratio: float, pow2: bool) -> None:
        super().__init__()
        self.register_buffer("q_s", torch.tensor(0.0))
        self.register_buffer("signed", torch.tensor(signed))
        self.register_buffer("pow2", torch.tensor(pow2))
        self.q_m = nn.Parameter(torch.tensor(0.0))
        self.t = nn.Parameter(torch.tensor(1.0), requires_grad=learn_t)
        self.d = nn.Parameter(torch.tensor(0.0))
        self.reset(q_m=q_m, bits=bits, q_s_ratio=q_s_ratio)

    @torch.no_grad()
    def reset(self, *, q_m: float, bits: int, q_s_ratio: float) -> None:
        """Start again from the range ``q_m`` at ``bits`` with t = 1 (a new model to quantize)."""
        self.q_s.fill_(q_s_ratio * q_m)
        self.q_m.fill_(q_m)
        self.t.fill_(1.0)
        self.d.fill_(step_for_bits(q_m - float(self.q_s), bits, signed=bool(self.signed)))

    def span(self) -> torch.Tensor:
        """(q_m - q_s)^t: the largest mapped magnitude."""
        return (self.q_m - self.q_s).pow(self.t)

    def continuous_bits(self) -> torch.Tensor:
        """Eq. 3 or 4 with a straight-through ceil, clamped to [1, 32]; Alg. 2's power of two when ``pow2``."""
        ratio = self.span() / self.d
        bits = torch.log2(_ceil_straight_through(ratio + 1)) + 1 if bool(self.signed) else torch.log2(_ceil_straight_through(ratio))
        bits = bits.clamp(1.0, FLOAT_BITS)
        if bool(self.pow2):
            bits = bits + (float(self._pow2()) - bits).detach()
        return bits

    def bits(self) -> int:
        """The integer bit-width a policy records: eq. 3 or 4 rounded up, or Alg. 2's power of two."""
        if bool(self.pow2):
            return self._pow2()
        with torch.no_grad():
            return min(FLOAT_BITS, max(1, math.ceil(float(self.continuous_bits()) - _LEVEL_TOLERANCE)))

    def _pow2(self) -> int:
        with torch.no_grad():
            ratio = float(self.span() / self.d)
        levels = math.ceil(ratio + 1 - _LEVEL_TOLERANCE) if bool(self.signed) else math.ceil(ratio - _LEVEL_TOLERANCE)
        bits = math.log2(max(levels, 1)) + (1 if bool(self.signed) else 0)
        return pow2_bits(min(FLOAT_BITS, max(1, math.floor(bits + _LEVEL_TOLERANCE))))

    def step(self) -> torch.Tensor:
        """d, or Alg. 2's d' = (q_m - q_s)^t / (2^(b'-1) - 1) (signed) or / 2^b' (unsigned) with gradients to d."""
        if not bool(self.pow2):
            return self.d
        span = self.span().detach()
        adjusted = span / step_divisor(self._pow2(), signed=bool(self.signed))
        return self.d + (adjusted - self.d).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NonlinearQuant.apply(x, self.q_m, self.t.clamp(min=T_MIN), self.step(), float(self.q_s))

    @torch.no_grad()
    def constrain(self) -> None:
        """Project after each optimizer step: q_m > q_s, t >= T_MIN, and d within the bits eq. 3 / 4 allow.

        The top level round(span / d) must stay at least 1 (2 bits signed, 1 bit unsigned), or every value
        would quantize to zero; and at most a 32-bit grid.
        """
        self.q_m.clamp_(min=float(self.q_s) * (1 + 1e-3) + 1e-12)
        self.t.clamp_(min=T_MIN)
        span = float(self.span())
        low = span / step_divisor(FLOAT_BITS, signed=bool(self.signed))
        high = span / step_divisor(2 if bool(self.signed) else 1, signed=bool(self.signed))
        self.d.clamp_(min=low, max=high)


def step_divisor(bits: int, *, signed: bool) -> float:
    """Levels above zero of a b-bit grid as eq. 3 / 4 count them: 2^(b-1) - 1 (symmetric) or 2^b (unsigned)."""
    return float(2 ** (bits - 1) - 1) if signed else float(2**bits)


def step_for_bits(span: float, bits: int, *, signed: bool) -> float:
    """The d that eq. 3 / 4 turn into exactly ``bits`` for a mapped range ``span`` (Alg. 2's last line)."""
    return span / step_divisor(bits, signed=signed)
