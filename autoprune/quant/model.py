"""Whole-model steps around the quantizers: wiring, calibration, the step counter, baking, BN recalibration."""

from __future__ import annotations

from contextlib import contextmanager
from itertools import chain
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from autoprune.errors import AutopruneError
from autoprune.bits import FLOAT_BITS
from autoprune.quant.act import ActQuantizer
from autoprune.quant.weight import WeightQuantizer, quantizer_name

ACT_QUANT = "input_quant"
SECOND_ACT_QUANT = "input_quant_b"
"""The quantizer of a product's second input (``autoprune.models.convert.MatMul``: a @ b)."""

Batch = torch.Tensor | Sequence[torch.Tensor]
"""A batch of inputs, or an (inputs, labels, ...) tuple of which only the inputs are used."""


def attach_act_quantizer(layer: nn.Module, quantizer: ActQuantizer, *, second: bool = False) -> RemovableHandle:
    """Quantize what ``layer`` reads: ``quantizer`` becomes its child ``input_quant`` and runs as a forward pre-hook.

    Being a child, it follows ``to()`` / ``state_dict()`` and the model-level helpers find it. A feature mask
    (``autoprune.prune.unstructured``) prepends its hook, so features are pruned before they are quantized.
    ``handle.remove()`` and ``delattr(layer, ACT_QUANT)`` take it off again. ``second``: the quantizer reads
    the layer's second input instead (a product's ``b``), as its child ``input_quant_b``.
    """
    child = SECOND_ACT_QUANT if second else ACT_QUANT
    if hasattr(layer, child):
        raise AutopruneError("activation quantizer", type(layer).__name__, "already has one attached")
    layer.add_module(child, quantizer)
    return layer.register_forward_pre_hook(_quantize_second if second else _quantize_input)


def _quantize_input(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (getattr(layer, ACT_QUANT)(args[0]), *args[1:])


def _quantize_second(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (args[0], getattr(layer, SECOND_ACT_QUANT)(args[1]), *args[2:])


def advance_quantizers(model: nn.Module, *, step: int) -> None:
    """Tell every weight and activation quantizer in ``model`` the training step (delayed quantization)."""
    for module in model.modules():
        if isinstance(module, (WeightQuantizer, ActQuantizer)):
            module.advance(step)


def calibrate(
    model: nn.Module, quantizers: Iterable[ActQuantizer] | None, batches: Iterable[Batch], *, max_batches: int | None = None
) -> int:
    """Calibrate activation quantizers on batches of data and fix their ranges; return the batches run.

    ``quantizers`` defaults to every ``ActQuantizer`` in ``model``; each forgets any earlier range first.
    The model runs in eval mode without gradients (BN statistics and feature masks stay as they are) on up
    to ``max_batches`` batches (all of them by default) and gets its previous mode back.
    """
    chosen = [m for m in model.modules() if isinstance(m, ActQuantizer)] if quantizers is None else list(quantizers)
    if max_batches is not None:
        _check_max_batches(max_batches)
    was_training = model.training
    for quantizer in chosen:
        quantizer.reset()
        quantizer.observing = True
    model.eval()
    try:
        count = run_batches(model, batches, max_batches=max_batches)
    finally:
        for quantizer in chosen:
            quantizer.observing = False
        model.train(was_training)
    if count == 0 and chosen:
        raise AutopruneError("activation calibration", "no batches", "needs at least one batch of data")
    layers = {id(m): name.rpartition(".")[0] for name, m in model.named_modules() if isinstance(m, ActQuantizer)}
    for quantizer in chosen:
        if quantizer.bits < FLOAT_BITS:
            quantizer.fix_range(layer=layers.get(id(quantizer)))
    return count


@contextmanager
def float_activations(quantizers: Iterable[ActQuantizer]) -> Iterator[None]:
    """Inside, ``quantizers`` pass their input unchanged (their ranges are kept for after).

    For BN re-estimation before the ranges are measured again: a range measured on the statistics being
    replaced can be far off (a model whose BN statistics are the initial ones has features 1e-14 small at
    depth), and BN statistics of features quantized that badly have near-zero variances that blow the
    features up layer after layer (efficientnet_b0: inf, then NaN, within 30 layers).
    """
    chosen = list(quantizers)
    for quantizer in chosen:
        quantizer.passing = True
    try:
        yield
    finally:
        for quantizer in chosen:
            quantizer.passing = False


def bake_weights(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Make weight quantization permanent; return {module name: {"w_bits", "delta", "quantizer"}}.

    The parametrizations of every weight that has a quantizer are removed with the quantized values left in
    the plain ``weight``. A quantizer that never chose its step (a delay not reached) chooses it now from the
    current weights: a baked model is always quantized. Weights without a quantizer are left untouched.
    """
    baked: dict[str, dict[str, Any]] = {}
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module, "weight"):
            continue
        parametrizations = module.parametrizations["weight"]
        quantizers = [p for p in parametrizations if isinstance(p, WeightQuantizer)]
        if not quantizers:
            continue
        if len(quantizers) > 1:
            raise AutopruneError("weight quantizers", name, f"has {len(quantizers)} quantizers on one weight; expected one")
        with torch.no_grad():
            value = parametrizations.original
            for transform in parametrizations:
                if isinstance(transform, WeightQuantizer) and not transform.frozen:
                    transform.freeze(value)
                value = transform(value)
        quantizer = quantizers[0]
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        baked[name] = {"w_bits": quantizer.bits, "delta": quantizer.delta, "quantizer": quantizer_name(quantizer)}
    return baked


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Batch], *, max_batches: int) -> int:
    """Re-estimate BN running statistics on unlabeled data (seed 000 sec. 3); return the batches used.

    After pruning and quantization the statistics a BN layer learned no longer describe its input. Every BN
    layer's running mean / var is reset and re-estimated as the cumulative average over up to
    ``max_batches`` batches (momentum None), its momentum restored afterwards. Only the BN layers run in
    training mode, so dropout and feature masks behave as at inference. The model ends in eval mode.
    """
    _check_max_batches(max_batches)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    model.eval()
    if not norms:
        return 0
    remaining = iter(batches)
    first = next(remaining, None)
    if first is None:
        raise AutopruneError("batch norm recalibration", "no batches", "needs at least one batch of data")
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        return run_batches(model, chain([first], remaining), max_batches=max_batches)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()


def _check_max_batches(max_batches: int) -> None:
    if max_batches < 1:
        raise AutopruneError("max_batches", max_batches, "must be at least 1")


def run_batches(model: nn.Module, batches: Iterable[Batch], *, max_batches: int | None) -> int:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    count = 0
    with torch.no_grad():
        for batch in batches:
            model(_inputs(batch).to(device))
            count += 1
            if count == max_batches:
                break
    return count


def _inputs(batch: Batch) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else batch[0]
