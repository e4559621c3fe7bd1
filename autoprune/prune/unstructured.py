"""Unstructured pruning of weights and features (seed 004 sec. 2.2 and 3.2).

Both follow one sparsification schedule (seed 004 sec. 2.2, App. B: "the same schedule for both weight
and feature pruning"): sparsity rises at the steps ``start + i * interval``, i = 1..updates, along the
gradual cubic curve of Zhu & Gupta (2017) that seed 004 adopts, ``s_i = s_f * (1 - (1 - i / n) ** 3)``,
and is ``s_f`` from the last update on. The seed's own code (qsparse ``PruneLayer``) computes exactly this.

Weights (eq. 3-4): the smallest magnitudes of a layer are masked. The mask is refitted on the dense
weights, the pruned ones keeping the value they had when pruned, so a masked weight can come back at a
later update as the seed describes ("allows for masked weights to reactivate during training").

Features (eq. 8): the mask is over the *neurons* of a feature map (its positions (c, h, w) per sample),
not a per-value threshold: a neuron is kept when its magnitude summed over the last T training batches
reaches the s-quantile of those sums. The mask is fixed at inference (App. B.2 replicates it for larger
test images, B.3 falls back to channels when it cannot be fixed), which is what lets an ideal hardware
skip the removed neurons and store the feature map with fewer elements (DESIGN: memory x (1 - s_f)).

Sparsity is counted per tensor as the fraction of zeros and hit exactly: the k = round(s * numel)
smallest entries are removed even when magnitudes tie, where eq. 4's ``>= quantile`` would keep ties.
"""

from __future__ import annotations

from collections import deque
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from autoprune.errors import AutopruneError

FEATURE_MASK = "feature_mask"


def sparsity_at(step: int, *, target: float, start: int, interval: int, updates: int) -> float:
    """Sparsity of the schedule at ``step``: 0 until ``start + interval``, ``target`` from ``start + interval * updates``."""
    _check_schedule(start=start, interval=interval, updates=updates)
    _check_sparsity("target", target)
    done = min(max((step - start) // interval, 0), updates)
    return target * (1.0 - (1.0 - done / updates) ** 3)


def keep_largest(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask that drops exactly round(sparsity * numel) entries of smallest ``score``."""
    keep = torch.ones_like(score, dtype=torch.bool)
    drop = round(sparsity * score.numel())
    if drop:
        keep.view(-1)[torch.topk(score.flatten(), drop, largest=False).indices] = False
    return keep


class _Scheduled:
    """Per-layer targets raised together along one schedule; subclasses refit one layer at a level."""

    def __init__(self, targets: Mapping[str, float], *, kind: str, start: int, interval: int, updates: int) -> None:
        _check_schedule(start=start, interval=interval, updates=updates)
        self._start, self._interval, self._updates = start, interval, updates
        for name, target in targets.items():
            _check_sparsity(f"{kind} sparsity of {name!r}", target)
        # A zero target costs nothing at all: such layers are not tracked.
        self._targets = {name: float(t) for name, t in targets.items() if t > 0}
        self._levels = dict.fromkeys(self._targets, 0.0)

    def update(self, step: int) -> bool:
        """Refit every layer whose scheduled sparsity at ``step`` differs from its current one; True if any did.

        Calling it every step refits exactly at the schedule's steps; calling it less often (per epoch)
        catches up at the next call.
        """
        changed = False
        for name, target in self._targets.items():
            level = sparsity_at(step, target=target, start=self._start, interval=self._interval, updates=self._updates)
            if level != self._levels[name]:
                self._refit(name, level)
                self._levels[name] = level
                changed = True
        return changed

    def final(self) -> None:
        """Bring every layer to its target now, wherever the schedule stands."""
        for name, target in self._targets.items():
            self._refit(name, target)
            self._levels[name] = target

    @property
    def levels(self) -> dict[str, float]:
        """The sparsity each layer is currently fitted at."""
        return dict(self._levels)

    @property
    def targets(self) -> dict[str, float]:
        """The sparsity each layer reaches at the end of the schedule."""
        return dict(self._targets)

    def _refit(self, name: str, level: float) -> None:
        raise NotImplementedError


class WeightMasker(_Scheduled):
    """Magnitude masks of layer weights (seed 004 eq. 3-4), keyed by module name.

    Call ``update(step)`` and then ``apply()`` after each optimizer step: the optimizer moves pruned
    weights off zero (their gradient is not zero), ``apply`` puts them back.

    The masks act on the trained tensor: the layer's ``weight`` parameter, or the original under a
    parametrization (a weight quantizer), looked up at every use. ``layer.weight`` of a parametrized layer is
    computed at each access, so editing it would change nothing.
    """

    def __init__(
        self, model: nn.Module, targets: Mapping[str, float], *, start: int, interval: int, updates: int
    ) -> None:
        super().__init__(targets, kind="weight", start=start, interval=interval, updates=updates)
        modules = dict(model.named_modules())
        self._layers: dict[str, nn.Module] = {}
        for name in self._targets:
            weight = getattr(modules.get(name), "weight", None)
            if not isinstance(weight, torch.Tensor):
                with_weights = [n for n, m in modules.items() if isinstance(getattr(m, "weight", None), torch.Tensor)]
                rule = f"is not a layer with weights (layers: {', '.join(with_weights)})"
                raise AutopruneError("weight sparsity", name, rule)
            self._layers[name] = modules[name]
        self._masks = {name: torch.ones_like(self._weight(name), dtype=torch.bool) for name in self._layers}
        # Where a weight is masked, the value it had when pruned: the magnitude it competes with at the next refit.
        self._pruned_values = {name: torch.zeros_like(self._weight(name).detach()) for name in self._layers}

    def _weight(self, name: str) -> torch.Tensor:
        layer = self._layers[name]
        if parametrize.is_parametrized(layer, "weight"):
            return layer.parametrizations.weight.original
        return layer.weight

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Layer name -> bool mask shaped like its weight, True where the weight is kept."""
        return dict(self._masks)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every masked weight again."""
        for name in self._layers:
            self._weight(name).mul_(self._masks[name])

    @torch.no_grad()
    def _refit(self, name: str, level: float) -> None:
        weight = self._weight(name)
        dense = torch.where(self._masks[name], weight, self._pruned_values[name])
        mask = keep_largest(dense.abs(), level)
        weight.copy_(dense.masked_fill(~mask, 0.0))
        self._pruned_values[name] = dense
        self._masks[name] = mask


class FeatureMask(nn.Module):
    """Sliding-window neuron mask of one feature map (seed 004 eq. 8); ``forward(x)`` is ``x * mask``.

    In training mode each batch's mean |x| over the batch joins a window of the last ``window`` batches;
    ``update(sparsity=...)`` refits the mask from the window. In eval mode the fitted mask is applied and
    nothing is recorded, so evaluation data never moves it. Before the first fit the input passes unchanged.
    To fit on data without training the rest of the model, put only this module in training mode.
    The window holds ``window`` tensors the size of one sample's feature map.
    """

    mask: torch.Tensor | None

    def __init__(self, *, window: int) -> None:
        super().__init__()
        if window < 1:
            raise AutopruneError("feature window", window, "must be at least 1")
        self.window = window
        self._recent: deque[torch.Tensor] = deque(maxlen=window)
        self.register_buffer("mask", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._recent.append(x.detach().abs().mean(dim=0))
        if self.mask is None:
            return x
        if x.shape[1:] != self.mask.shape:
            rule = f"does not match the fitted feature shape {tuple(self.mask.shape)}"
            raise AutopruneError("feature mask", tuple(x.shape[1:]), rule)
        return x * self.mask

    def update(self, *, sparsity: float) -> None:
        """Refit the mask at ``sparsity`` from the batches now in the window."""
        _check_sparsity("feature sparsity", sparsity)
        if not self._recent:
            raise AutopruneError("feature sparsity", sparsity, "cannot be fitted before a training batch has passed")
        self.mask = keep_largest(torch.stack(tuple(self._recent)).sum(dim=0), sparsity)


class FeatureMasker(_Scheduled):
    """FeatureMasks on the input features of named layers, raised along the schedule, keyed by module name.

    Each mask becomes a child module ``feature_mask`` of its layer, so ``train()``/``eval()``, ``to()`` and
    ``state_dict()`` reach it, and runs as the layer's first forward pre-hook: the features are pruned
    before any input quantizer sees them (seed 004 Fig. 1), which must therefore keep zero at zero.
    Call ``update(step)`` after each training step, ``remove()`` to take the masks off again.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Mapping[str, float],
        *,
        start: int,
        interval: int,
        updates: int,
        window: int,
    ) -> None:
        super().__init__(targets, kind="feature", start=start, interval=interval, updates=updates)
        modules = dict(model.named_modules())
        missing = [name for name in self._targets if name not in modules]
        if missing:
            rule = f"is not a layer of the model (layers: {', '.join(n for n in modules if n)})"
            raise AutopruneError("feature sparsity", missing[0], rule)
        self._layers = {name: modules[name] for name in self._targets}
        self._handles: list[RemovableHandle] = []
        for layer in self._layers.values():
            layer.add_module(FEATURE_MASK, FeatureMask(window=window))
            self._handles.append(layer.register_forward_pre_hook(_mask_input, prepend=True))

    @property
    def masks(self) -> dict[str, FeatureMask]:
        return {name: getattr(layer, FEATURE_MASK) for name, layer in self._layers.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self._layers.values():
            delattr(layer, FEATURE_MASK)

    def _refit(self, name: str, level: float) -> None:
        getattr(self._layers[name], FEATURE_MASK).update(sparsity=level)


def _mask_input(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (getattr(layer, FEATURE_MASK)(args[0]), *args[1:])


def _check_schedule(*, start: int, interval: int, updates: int) -> None:
    if start < 0:
        raise AutopruneError("sparsity_start", start, "must be at least 0")
    if interval < 1:
        raise AutopruneError("sparsity_interval", interval, "must be at least 1")
    if updates < 1:
        raise AutopruneError("sparsity_updates", updates, "must be at least 1")


def _check_sparsity(field: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise AutopruneError(field, value, "must be in [0, 1)")


def attach_feature_mask(layer: nn.Module, *, mask: torch.Tensor, window: int) -> FeatureMask:
    """Put a fitted mask back on a layer (loading a saved compressed model), pruning before other hooks."""
    feature_mask = FeatureMask(window=window)
    feature_mask.mask = mask.detach().clone().to(torch.bool)
    layer.add_module(FEATURE_MASK, feature_mask)
    layer.register_forward_pre_hook(_mask_input, prepend=True)
    return feature_mask
