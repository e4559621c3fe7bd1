"""Activation fake quantizers: applied to the *input* of a layer (a forward pre-hook), STE in backward.

A quantizer learns its range from data:

- Calibration: while ``observing`` it records the running min / max (and a bounded sample) of what passes and
  lets it through unchanged; ``fix_range()`` then fixes the step from what it saw. ``calibrate`` does both
  for a whole model. Calibration fixes the range whatever the step counter says.
- Without calibration the quantizer is identity until ``advance(step)`` reaches ``delay`` and fixes its range
  on the first batch from then on, the x_tq of seed 004 eq. 5.

The range is unsigned when the observed minimum is >= 0 (after a ReLU), else signed; either way the grid is
mid-tread (``autoprune.quant.uniform``), so zero stays exactly zero and features masked before the quantizer
stay masked. The step and the sign are buffers: a saved model loads back calibrated. 32 bits is identity.
``reset()`` forgets range and statistics, for a new calibration (after pruning, say).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.policy import FLOAT_BITS, Policy
from autoprune.quant.registry import Registry
from autoprune.quant.uniform import fake_uniform, mse_optimal_step, quantile, uniform_step
from autoprune.quant.weight import check_bits, check_delay

SAMPLE_PER_BATCH = 8192
"""Values of each observed batch kept (evenly strided) for the MSE searches of ``delayed`` / ``saturated``."""


class ActQuantizer(nn.Module, ABC):
    """Base of the activation quantizers: observation, the step fixed once, identity before ``delay``."""

    step_size: torch.Tensor
    is_signed: torch.Tensor

    def __init__(self, *, bits: int, delay: int = 0) -> None:
        super().__init__()
        check_bits(bits)
        check_delay(delay)
        self._bits = bits
        self.delay = delay
        self.current_step = 0
        self.observing = False
        # 0 means "no range yet"; a real step is always > 0.
        self.register_buffer("step_size", torch.tensor(0.0))
        self.register_buffer("is_signed", torch.tensor(True))
        self.reset()

    @classmethod
    def from_options(cls, *, bits: int, delay: int, saturation_quantile: float) -> ActQuantizer:
        """Build from the policy's options; a quantizer takes the ones it uses."""
        return cls(bits=bits)

    def reset(self) -> None:
        self._low: float | None = None
        self._high: float | None = None
        self._sample: list[torch.Tensor] = []
        self.step_size.zero_()
        self.is_signed.fill_(True)

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def calibrated(self) -> bool:
        return bool(self.step_size > 0)

    @property
    def delta(self) -> float:
        if not self.calibrated:
            raise AutopruneError("delta", None, "is not known yet: the quantizer has no range (calibrate it, or reach its delay)")
        return float(self.step_size)

    @property
    def signed(self) -> bool:
        return bool(self.is_signed)

    def advance(self, step: int) -> None:
        """Tell the quantizer the training step; an uncalibrated one starts at ``step >= delay``."""
        self.current_step = step

    def fix_range(self) -> None:
        """Fix the step from everything observed since ``reset()``."""
        if self._low is None:
            raise AutopruneError("activation range", None, "cannot be fixed: no batch has been observed")
        self.is_signed.fill_(self._low < 0)
        self.step_size.fill_(self._choose_delta(torch.cat(self._sample)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bits == FLOAT_BITS:
            return x
        if self.observing:
            self._observe(x.detach())
            return x
        if not self.calibrated:
            if self.current_step < self.delay:
                return x
            self._observe(x.detach())
            self.fix_range()
        return fake_uniform(x, step=self.delta, bits=self._bits, signed=self.signed)

    def extra_repr(self) -> str:
        return f"bits={self._bits}, delay={self.delay}, delta={float(self.step_size)}, signed={self.signed}"

    def _observe(self, x: torch.Tensor) -> None:
        low, high = x.min().item(), x.max().item()
        self._low = low if self._low is None else min(self._low, low)
        self._high = high if self._high is None else max(self._high, high)
        flat = x.flatten()
        self._sample.append(flat[:: max(1, flat.numel() // SAMPLE_PER_BATCH)])

    def _max_abs(self) -> float:
        assert self._low is not None and self._high is not None, "observed before choosing a step"
        return max(-self._low, self._high) if self.signed else self._high

    @abstractmethod
    def _choose_delta(self, sample: torch.Tensor) -> float:
        """The step, from the statistics observed and a sample of the observed values."""


ACT_QUANTIZERS: Registry[type[ActQuantizer]] = Registry("policy.act_quantizer")


def register_act_quantizer(name: str) -> Callable[[type[ActQuantizer]], type[ActQuantizer]]:
    """Class decorator: make an ``ActQuantizer`` subclass available as ``policy.act_quantizer: <name>``."""
    return ACT_QUANTIZERS.register(name)


def act_quantizer(name: str, *, bits: int, delay: int = 0, saturation_quantile: float = 0.999) -> ActQuantizer:
    """A new activation quantizer by registered name; ``delay`` and ``saturation_quantile`` as in the policy."""
    return ACT_QUANTIZERS.create(name, bits=bits, delay=delay, saturation_quantile=saturation_quantile)


def make_act_quantizer(policy: Policy, *, bits: int, start_step: int = 0) -> ActQuantizer:
    """The policy's activation quantizer for one layer input, introduced at ``start_step``: an uncalibrated
    ``delayed`` / ``saturated`` one starts at ``start_step + policy.quant_delay``."""
    return act_quantizer(
        policy.act_quantizer, bits=bits, delay=start_step + policy.quant_delay, saturation_quantile=policy.saturation_quantile
    )


@register_act_quantizer("clip_uniform")
class ClipUniformAct(ActQuantizer):
    """Seed 003 eq. 20-21 on the observed range: [-max|x|, max|x|], or [0, max x] after a ReLU."""

    def _choose_delta(self, sample: torch.Tensor) -> float:
        return uniform_step(self._max_abs(), bits=self._bits, signed=self.signed)


@register_act_quantizer("delayed")
class DelayedAct(ActQuantizer):
    """Seed 004 eq. 5 on features: identity until ``delay``, then the MSE-optimal step (clip ranges k/100
    of the largest magnitude seen, error measured on the observed values), fixed from then on."""

    @classmethod
    def from_options(cls, *, bits: int, delay: int, saturation_quantile: float) -> ActQuantizer:
        return cls(bits=bits, delay=delay)

    def _choose_delta(self, sample: torch.Tensor) -> float:
        return mse_optimal_step(sample, bits=self._bits, signed=self.signed, clip=self._max_abs())


@register_act_quantizer("saturated")
class SaturatedAct(ActQuantizer):
    """Seed 004 eq. 6-7 on features: the limit is the q-quantile of the nonzero |x|, averaged over the
    observed batches; the step minimises the error against the observed values saturated at that limit."""

    def __init__(self, *, bits: int, delay: int = 0, saturation_quantile: float = 0.999) -> None:
        if not 0.5 < saturation_quantile <= 1.0:
            raise AutopruneError("policy.saturation_quantile", saturation_quantile, "must be in (0.5, 1]")
        super().__init__(bits=bits, delay=delay)
        self.saturation_quantile = saturation_quantile

    @classmethod
    def from_options(cls, *, bits: int, delay: int, saturation_quantile: float) -> ActQuantizer:
        return cls(bits=bits, delay=delay, saturation_quantile=saturation_quantile)

    def reset(self) -> None:
        super().reset()
        self._limits: list[float] = []

    def _observe(self, x: torch.Tensor) -> None:
        super()._observe(x)
        self._limits.append(quantile(x, self.saturation_quantile))

    def _choose_delta(self, sample: torch.Tensor) -> float:
        limit = sum(self._limits) / len(self._limits)
        target = sample.clamp(-limit, limit)
        return mse_optimal_step(sample, bits=self._bits, signed=self.signed, clip=limit, target=target)
