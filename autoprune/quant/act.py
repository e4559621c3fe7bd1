"""Activation fake quantizers: applied to the *input* of a layer (a forward pre-hook), STE in backward.

A quantizer learns its range from data:

- Calibration: while ``observing`` it records the running min / max (and a bounded sample) of what passes and
  lets it through unchanged; ``fix_range()`` then fixes the step from what it saw. ``calibrate`` does both
  for a whole model.
- The quantizer is identity while ``advance(step)`` has not reached ``delay``, calibrated or not (seed 004
  eq. 5: features stay float before t_q). At ``delay`` an uncalibrated one fixes its range on the batch it
  sees then, the x_tq of eq. 5. ``start_now()`` moves the delay to the current step (post-training use, the
  end of a fine-tune shorter than the delay).

The range is unsigned when the observed minimum is >= 0 (after a ReLU), else signed; the grid is mid-tread
(mid-rise for signed ranges below 3 bits, ``autoprune.quant.uniform``); zero stays exactly zero either way,
so features masked before the quantizer stay masked. The step and the sign are buffers: a saved model loads
back calibrated. 32 bits is identity.
``reset()`` forgets range and statistics, for a new calibration (after pruning, say).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from autoprune.bits import FLOAT_BITS
from autoprune.errors import AutopruneError
from autoprune.operators import ACT_QUANTIZER, ACT_QUANTIZERS, ActQuantizerConfig, ClipUniformAct, DelayedAct, OperatorConfig, SaturatedAct, parse_config
from autoprune.policy import Policy
from autoprune.quant.uniform import fake_uniform, mse_optimal_step, quantile, uniform_step
from autoprune.quant.weight import check_bits, check_delay

SAMPLE_PER_BATCH = 8192
"""Values of each observed batch kept (evenly strided) for the MSE searches of ``delayed`` / ``saturated``."""


class ActQuantizer(nn.Module, ABC):
    """Base of the activation quantizers: observation, the step fixed once, identity before ``delay``."""

    step_size: torch.Tensor
    is_signed: torch.Tensor
    config_class: ClassVar[type[OperatorConfig]]
    fixes_range_at_delay: ClassVar[bool] = False
    """True: the range comes from the batch at t_q (seed 004), so the fine-tune does not calibrate it up front."""

    def __init__(self, *, bits: int, delay: int = 0) -> None:
        super().__init__()
        check_bits(bits)
        check_delay(delay)
        self._bits = bits
        self.delay = delay
        self.current_step = 0
        self.observing = False
        self.passing = False
        # 0 means "no range yet"; a real step is always > 0.
        self.register_buffer("step_size", torch.tensor(0.0))
        self.register_buffer("is_signed", torch.tensor(True))
        self.reset()

    @classmethod
    def from_config(cls, config: Any, *, bits: int, start_step: int = 0) -> ActQuantizer:
        """Build from the config it handles, introduced at ``start_step`` (a delay counts from there)."""
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
        """Tell the quantizer the training step; it quantizes from ``step >= delay``."""
        self.current_step = step

    def start_now(self) -> None:
        """Quantize from the current step on, whatever the delay said."""
        self.delay = min(self.delay, self.current_step)

    def fix_range(self, *, layer: str | None = None) -> None:
        """Fix the step from everything observed since ``reset()``; ``layer`` names the quantized layer in an error.

        An all-zero or degenerate range gets a defined step (``uniform_step``); a range holding inf or NaN
        has none, and the error names the layer and the range: the model's own forward produced them.
        """
        field = "activation range" + (f" of layer {layer!r}" if layer else "")
        if self._low is None or self._high is None:
            raise AutopruneError(field, None, "cannot be fixed: no batch has been observed")
        if not (math.isfinite(self._low) and math.isfinite(self._high)):
            raise AutopruneError(field, [self._low, self._high], "is not finite: the model's forward produces inf or NaN at this layer's input")
        self.is_signed.fill_(self._low < 0)
        self.step_size.fill_(self._choose_delta(torch.cat(self._sample)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bits == FLOAT_BITS or self.passing:
            return x
        if self.observing:
            self._observe(x.detach())
            return x
        if self.current_step < self.delay:
            return x
        if not self.calibrated:
            self.reset()
            self._observe(x.detach())
            self.fix_range()
        return fake_uniform(x, step=self.delta, bits=self._bits, signed=self.signed)

    def extra_repr(self) -> str:
        return f"bits={self._bits}, delay={self.delay}, delta={float(self.step_size)}, signed={self.signed}"

    def _observe(self, x: torch.Tensor) -> None:
        low, high = x.min().item(), x.max().item()
        self._low = _merged(self._low, low, min)
        self._high = _merged(self._high, high, max)
        flat = x.flatten()
        self._sample.append(flat[:: max(1, flat.numel() // SAMPLE_PER_BATCH)])

    def _max_abs(self) -> float:
        assert self._low is not None and self._high is not None, "observed before choosing a step"
        return max(-self._low, self._high) if self.signed else self._high

    @abstractmethod
    def _choose_delta(self, sample: torch.Tensor) -> float:
        """The step, from the statistics observed and a sample of the observed values."""


def _merged(seen: float | None, new: float, pick: Callable[[float, float], float]) -> float:
    """The range bound so far with a new batch's; a NaN sticks (``min`` / ``max`` drop one met second), so
    ``fix_range`` refuses a range a NaN ever reached."""
    if seen is None or math.isnan(new) or math.isnan(seen):
        return new if seen is None or math.isnan(new) else seen
    return pick(seen, new)


def register_act_quantizer(config: type[ActQuantizerConfig]) -> Callable[[type[ActQuantizer]], type[ActQuantizer]]:
    """Class decorator: make an ``ActQuantizer`` subclass the handler of an activation quantizer config class."""
    return ACT_QUANTIZERS.register(config)


def act_quantizer(config: ActQuantizerConfig | str | Any, *, bits: int, **fields: Any) -> ActQuantizer:
    """A new activation quantizer for a config (or a kind, with ``fields`` of its config: ``delay=5``)."""
    if fields:
        config = parse_config(ACT_QUANTIZER, {**ACT_QUANTIZERS.config(config).to_dict(), **fields})
    return ACT_QUANTIZERS.create(config, bits=bits)


def make_act_quantizer(policy: Policy, *, bits: int, start_step: int = 0) -> ActQuantizer:
    """The policy's activation quantizer for one layer input, introduced at ``start_step``: a ``delayed`` /
    ``saturated`` one is float until ``start_step + delay``."""
    return ACT_QUANTIZERS.create(policy.act_quantizer, bits=bits, start_step=start_step)


@register_act_quantizer(ClipUniformAct)
class ClipUniformActQuantizer(ActQuantizer):
    """Seed 003 eq. 20-21 on the observed range: [-max|x|, max|x|], or [0, max x] after a ReLU."""

    def _choose_delta(self, sample: torch.Tensor) -> float:
        return uniform_step(self._max_abs(), bits=self._bits, signed=self.signed)


@register_act_quantizer(DelayedAct)
class DelayedActQuantizer(ActQuantizer):
    """Seed 004 eq. 5 on features: identity until ``delay``, then the MSE-optimal step (clip ranges k/100
    of the largest magnitude seen, error measured on the observed values), fixed from then on."""

    fixes_range_at_delay = True

    @classmethod
    def from_config(cls, config: Any, *, bits: int, start_step: int = 0) -> ActQuantizer:
        return cls(bits=bits, delay=start_step + config.delay)

    def _choose_delta(self, sample: torch.Tensor) -> float:
        return mse_optimal_step(sample, bits=self._bits, signed=self.signed, clip=self._max_abs())


@register_act_quantizer(SaturatedAct)
class SaturatedActQuantizer(ActQuantizer):
    """Seed 004 eq. 6-7 on features: the limit is the q-quantile of the nonzero |x|, averaged over the
    observed batches; the step minimises the error against the observed values saturated at that limit."""

    fixes_range_at_delay = True

    def __init__(self, *, bits: int, delay: int = 0, quantile: float = 0.999) -> None:
        if not 0.5 < quantile <= 1.0:
            raise AutopruneError("quantile", quantile, "must be in (0.5, 1]")
        super().__init__(bits=bits, delay=delay)
        self.quantile = quantile

    @classmethod
    def from_config(cls, config: Any, *, bits: int, start_step: int = 0) -> ActQuantizer:
        return cls(bits=bits, delay=start_step + config.delay, quantile=config.quantile)

    def reset(self) -> None:
        super().reset()
        self._limits: list[float] = []

    def _observe(self, x: torch.Tensor) -> None:
        super()._observe(x)
        self._limits.append(quantile(x, self.quantile))

    def _choose_delta(self, sample: torch.Tensor) -> float:
        limit = sum(self._limits) / len(self._limits)
        target = sample.clamp(-limit, limit)
        return mse_optimal_step(sample, bits=self._bits, signed=self.signed, clip=limit, target=target)
