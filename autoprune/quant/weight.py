"""Weight fake quantizers: parametrizations of a layer's ``weight`` with a straight-through estimator.

Use one as ``torch.nn.utils.parametrize.register_parametrization(layer, "weight", q)``; the layer then
computes with the quantized weights while the optimizer updates the float ones (STE). Every quantizer has
``bits``, ``delta`` (the step it used, once known) and ``freeze()``; 32 bits leaves the weights as they are.

How the cost model and the exporters read them: each quantizer class declares the grid it produces at each
bit-width (``grid_for(bits)``, an ``autoprune.quant.grids.Grid``), and they read the baked weights W_q on it.

- ``midrise`` produces W_q = delta * midrise_int(W, delta, bits) exactly, so the cost model reads back the
  very levels used (App. A of seed 000).
- ``clip_uniform``, ``delayed`` and ``saturated`` are mid-tread from 3 bits: W_q = k * delta with an integer
  k in [-2^(b-1), 2^(b-1) - 1] (exact in float32 up to 16 bits, see ``uniform_step``); below 3 bits they are
  mid-rise (both signs at 1 and 2 bits, see ``autoprune.quant.uniform``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from autoprune.bits import FLOAT_BITS
from autoprune.errors import AutopruneError
from autoprune.operators import (
    WEIGHT_QUANTIZER, WEIGHT_QUANTIZERS, ClipUniform, Delayed, Midrise, OperatorConfig, Saturated, WeightQuantizerConfig, parse_config,
)
from autoprune.policy import Policy
from autoprune.quant.grids import MIDRISE, MIDTREAD, Grid
from autoprune.quant.midrise import midrise_delta, midrise_int
from autoprune.quant.uniform import fake_uniform, is_midrise, mse_optimal_step, quantile, straight_through, uniform_step


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= FLOAT_BITS:
        raise AutopruneError("bits", bits, f"must be an integer number of bits in 1..{FLOAT_BITS}")


def check_delay(delay: int) -> None:
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise AutopruneError("delay", delay, "must be a step number >= 0")


class WeightQuantizer(nn.Module, ABC):
    """Base of the weight quantizers: when to pick the step, and the STE forward.

    Until frozen, the step is re-derived from the current weights at every forward (the range follows the
    weights while they train). The quantizer is identity while ``step < delay`` (``advance(step)`` moves
    the step; the fine-tune loop calls it) unless frozen. Subclasses give ``_choose_delta`` and
    ``_fake_quantize``; ``fix_on_first_use`` freezes the first step chosen (seed 004's delayed quantization).

    ``per_channel``: one step per output channel (dim 0), each chosen by the same rule from that channel's
    weights alone; ``delta`` is then a list. The steps are kept as a float32 tensor shaped to broadcast over
    the weight, so the quantizing code is the same as per tensor.
    """

    fix_on_first_use = False
    config_class: ClassVar[type[OperatorConfig]]

    def __init__(self, *, bits: int, delay: int = 0, per_channel: bool = False) -> None:
        super().__init__()
        check_bits(bits)
        check_delay(delay)
        self._bits = bits
        self.delay = delay
        self.per_channel = per_channel
        self.current_step = 0
        self.frozen = False
        self._delta: float | torch.Tensor | None = None
        self._seen: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: Any, *, bits: int, start_step: int = 0) -> WeightQuantizer:
        """Build from the config it handles, introduced at ``start_step`` (a delay counts from there)."""
        return cls(bits=bits, per_channel=config.per_channel)

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def delta(self) -> float | list[float]:
        """The step used by the last quantizing forward (or fixed by ``freeze``); per channel, a list."""
        step = self._step()
        return step.flatten().tolist() if isinstance(step, torch.Tensor) else step

    def keep_channels(self, kept: list[int]) -> None:
        """Structured pruning kept these output channels: a per-channel step keeps theirs."""
        if isinstance(self._delta, torch.Tensor):
            self._delta = self._delta[kept]

    def _step(self) -> float | torch.Tensor:
        if self._delta is None:
            rule = f"is not known yet: the quantizer has not quantized (step {self.current_step} < delay {self.delay}) nor been frozen"
            raise AutopruneError("delta", None, rule)
        return self._delta

    @property
    def active(self) -> bool:
        return self.frozen or self.current_step >= self.delay

    def advance(self, step: int) -> None:
        """Tell the quantizer the training step; quantization starts at ``step >= delay``."""
        self.current_step = step

    def freeze(self, weight: torch.Tensor | None = None) -> None:
        """Stop re-deriving the step and quantize from now on, delay or not.

        The step is chosen from ``weight`` when given, else it is the last one used, else (still before the
        delay) the one for the weights last seen, so post-training quantization can freeze any quantizer.
        """
        if weight is None and self._delta is None:
            weight = self._seen
        if weight is not None:
            self._delta = self._step_for(weight.detach())
        elif self._delta is None:
            raise AutopruneError("freeze", None, "needs a weight: the quantizer has seen none yet")
        self.frozen = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.active:
            self._seen = weight.detach()
            return weight
        if not self.frozen:
            self._delta = self._step_for(weight.detach())
            self.frozen = self.fix_on_first_use
        if self._bits == FLOAT_BITS:
            return weight
        return self._fake_quantize(weight, self._step())

    def extra_repr(self) -> str:
        return f"bits={self._bits}, delay={self.delay}, per_channel={self.per_channel}, frozen={self.frozen}"

    @classmethod
    def grid_for(cls, bits: int) -> Grid:
        """The levels this quantizer produces at ``bits``: what the cost model and the exporters read."""
        return MIDRISE

    def _step_for(self, weight: torch.Tensor) -> float | torch.Tensor:
        # At 32 bits the step is the cost model's reading of a float layer (max|W| / 2^31).
        if self._bits == FLOAT_BITS:
            return midrise_delta(weight, FLOAT_BITS)
        if self.per_channel:
            steps = [self._choose_delta(channel) for channel in weight]
            return torch.tensor(steps, dtype=torch.float32, device=weight.device).view(-1, *([1] * (weight.dim() - 1)))
        return self._choose_delta(weight)

    @abstractmethod
    def _choose_delta(self, weight: torch.Tensor) -> float:
        """The step for these weights at 1..31 bits."""

    @abstractmethod
    def _fake_quantize(self, weight: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
        """The quantized weights with the STE gradient."""


def register_weight_quantizer(config: type[WeightQuantizerConfig]) -> Callable[[type[WeightQuantizer]], type[WeightQuantizer]]:
    """Class decorator: make a ``WeightQuantizer`` subclass the handler of a weight quantizer config class."""
    return WEIGHT_QUANTIZERS.register(config)


def weight_quantizer(config: WeightQuantizerConfig | str | Any, *, bits: int, **fields: Any) -> WeightQuantizer:
    """A new weight quantizer for a config (or a kind, with ``fields`` of its config: ``delay=5``)."""
    if fields:
        config = parse_config(WEIGHT_QUANTIZER, {**WEIGHT_QUANTIZERS.config(config).to_dict(), **fields})
    return WEIGHT_QUANTIZERS.create(config, bits=bits)


def make_weight_quantizer(policy: Policy, *, bits: int, start_step: int = 0) -> WeightQuantizer:
    """The policy's weight quantizer for one layer, introduced at ``start_step``: a delayed one's t_q is
    ``start_step + delay``."""
    return WEIGHT_QUANTIZERS.create(policy.quantizer, bits=bits, start_step=start_step)


def quantizer_name(quantizer: WeightQuantizer) -> str:
    return WEIGHT_QUANTIZERS.kind_of(type(quantizer))


@register_weight_quantizer(Midrise)
class MidriseWeight(WeightQuantizer):
    """Seed 000 App. A: W_q = delta * midrise_int(W, delta, bits), delta = max|W| / 2^(b-1) of the current W.

    Filters whose weights all lie within +-delta/2 become zero (pruned) and levels are clamped to
    +-(2^(b-1) - 0.5). A ``delta`` given here is fixed (a calibrated step) instead of following max|W|.
    The STE passes the gradient wherever the clamp does not bite, pruned filters included, so a pruned
    filter can grow back while fine-tuning.
    """

    def __init__(self, *, bits: int, delta: float | None = None, per_channel: bool = False) -> None:
        super().__init__(bits=bits, per_channel=per_channel)
        if delta is not None:
            if not delta > 0:
                raise AutopruneError("delta", delta, "must be a positive step")
            self._delta = delta
            self.frozen = True

    def _choose_delta(self, weight: torch.Tensor) -> float:
        return midrise_delta(weight, self._bits)

    def _fake_quantize(self, weight: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
        quantized = (delta * midrise_int(weight, delta, self._bits)).to(weight.dtype)
        return straight_through(weight, quantized, weight.abs() <= 2 ** (self._bits - 1) * delta)


@register_weight_quantizer(ClipUniform)
class ClipUniformWeight(WeightQuantizer):
    """Seed 003 eq. 20-21 on the range [-max|W|, max|W|] (see ``autoprune.quant.uniform``), with its STE:
    the gradient passes inside the clip range only, which matters once the step is frozen."""

    @classmethod
    def grid_for(cls, bits: int) -> Grid:
        return MIDRISE if bits == FLOAT_BITS or is_midrise(bits=bits, signed=True) else MIDTREAD

    def _choose_delta(self, weight: torch.Tensor) -> float:
        return uniform_step(weight.abs().max().item(), bits=self._bits, signed=True)

    def _fake_quantize(self, weight: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
        return fake_uniform(weight, step=delta, bits=self._bits, signed=True)


@register_weight_quantizer(Delayed)
class DelayedWeight(ClipUniformWeight):
    """Seed 004 eq. 5: identity until step t_q = ``delay``; at t_q the MSE-optimal step is fixed for good.

    The step minimises ||Q(W_tq) - W_tq||^2 over clip ranges k/100 of max|W_tq| (``mse_optimal_step``);
    from then on the weights train through the STE on that fixed grid. With delay 0 the step comes from the
    weights at the first forward, which ``register_parametrization`` itself runs.
    """

    fix_on_first_use = True

    @classmethod
    def from_config(cls, config: Any, *, bits: int, start_step: int = 0) -> WeightQuantizer:
        return cls(bits=bits, delay=start_step + config.delay, per_channel=config.per_channel)

    def _choose_delta(self, weight: torch.Tensor) -> float:
        return mse_optimal_step(weight, bits=self._bits, signed=True, clip=weight.abs().max().item())


@register_weight_quantizer(Saturated)
class SaturatedWeight(ClipUniformWeight):
    """Seed 004 eq. 6-7: delayed quantization whose MSE target is W_tq saturated at the q-quantile of |W|.

    The clip range is searched within [0, quantile] (k/100 of it), so no weight is represented beyond the
    quantile: outliers are clipped instead of stretching the step. One symmetric quantile of the nonzero
    |W| stands for eq. 6's pair (q_l, q_u), which keeps zero a level.
    """

    fix_on_first_use = True

    def __init__(self, *, bits: int, delay: int = 0, quantile: float = 0.999, per_channel: bool = False) -> None:
        super().__init__(bits=bits, delay=delay, per_channel=per_channel)
        if not 0.5 < quantile <= 1.0:
            raise AutopruneError("quantile", quantile, "must be in (0.5, 1]")
        self.quantile = quantile

    @classmethod
    def from_config(cls, config: Any, *, bits: int, start_step: int = 0) -> WeightQuantizer:
        return cls(bits=bits, delay=start_step + config.delay, quantile=config.quantile, per_channel=config.per_channel)

    def _choose_delta(self, weight: torch.Tensor) -> float:
        limit = quantile(weight, self.quantile)
        target = weight.clamp(-limit, limit)
        return mse_optimal_step(weight, bits=self._bits, signed=True, clip=limit, target=target)
