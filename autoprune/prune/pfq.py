"""Pruning for Quantization (seed 003): BN folding (eq. 5-6) and the PfQ pruner (eq. 14, 17, 18).

A channel whose BN running variance V is below eps (eq. 17) has a pre-BN value that barely moves from the
running mean M over the training data, so the BN outputs ``gamma (C - M) / sqrt(V + eps_bn) + beta = beta``
(eq. 11) whatever the input. (``beta - gamma M / sqrt(V + eps_bn)`` is the BN of a zero input: it equals beta
only for a dead filter whose M is zero, so it is not used.) Its filters can go, and what the channel fed the
next layers, ``Act(beta)`` carried through activations, pooling and residual adds, becomes a constant added
to each consumer (eq. 14): ``U_o = sum_(u,v) w_(o,c,u,v) Act(beta_c)``.

The constant is found by one forward pass with every removed channel pinned to beta at its BN output, reading
the consumers' inputs, so any elementwise path (ReLU, ReLU6, pooling, a residual add of constant channels)
is handled without modelling it. U is folded into the consumer's bias (created when the layer has none,
eq. 14), or, when the consumer feeds a BN, into that BN's running_mean (``M <- M - U``). Seed 003 folds into
the BN's beta instead (eq. 18, ``beta <- beta + gamma U / sqrt(V + eps)``), which is the same at inference;
the running mean is preferred because BN recalibration, which autoprune runs after compression, re-estimates
M from data and would otherwise count U twice (once in the new M, once in beta).

The fold is exact where the consumer sees the constant at every tap: a Linear layer, a 1x1 conv, an unpadded
kxk conv. A zero-padded kxk conv sees zeros instead of the constant at the border taps, so its border outputs
change by the part of U that fell in the padding; interior outputs are unchanged.

A group (channels coupled by a residual add or a depthwise conv) loses channel c only when every producer
in the group is followed by a BN and all of those BNs have V_c < eps, so the summed channel is constant too.
At least one channel of each group stays.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
import torch.fx
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.models import COMPRESSIBLE, probing
from autoprune.operators import PfQ
from autoprune.prune.structured import PrunePlan, PruneRequest, refuse_keep_ratios, register_pruner

_BatchNorm = nn.modules.batchnorm._BatchNorm


# The BN kind that normalises each conv kind's output, channel by channel.
_FOLDABLE = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d}
_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm1d / BatchNorm2d that directly follows a Conv1d / Conv2d into it (seed 003 eq. 5-6), in place.

    ``w <- gamma / sqrt(V + eps) * w`` and ``b <- gamma / sqrt(V + eps) * (b - M) + beta``; the BN becomes an
    Identity. Inference outputs are unchanged up to float rounding. A BN is left alone when its conv also
    feeds something else, when either module is called more than once, or when it keeps no running
    statistics (it then normalises with batch statistics, which no fixed weight can reproduce).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # fx signals an untraceable forward with many exception types
        raise AutopruneError("model", type(model).__name__, f"cannot be traced by torch.fx to find Conv -> BatchNorm pairs ({exc})") from None
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], tuple(_FOLDABLE.values())):
            continue
        source = node.args[0]
        if not (
            isinstance(source, torch.fx.Node) and source.op == "call_module"
            and type(modules[node.target]) is _FOLDABLE.get(type(modules[source.target])) and len(source.users) == 1
            and calls[source.target] == 1 and calls[node.target] == 1
            and modules[node.target].track_running_stats
        ):
            continue
        _fold_into(modules[source.target], modules[node.target])
        parent_name, _, child = node.target.rpartition(".")
        setattr(modules[parent_name], child, nn.Identity())
    return model


def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    with torch.no_grad():
        # float64 so that the folded layer differs from conv + BN by one float32 rounding, not several.
        inv_std = (bn.running_var.double() + bn.eps).rsqrt()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_std)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_std)
        scale = gamma * inv_std
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        conv.weight.copy_((conv.weight.double() * scale.view(-1, *[1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
        folded_bias = ((bias - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(folded_bias)
        else:
            conv.bias.copy_(folded_bias)


@register_pruner(PfQ)
def pfq(request: PruneRequest) -> PrunePlan:
    """Remove the channels whose BN running variance is below the config's ``eps`` and fold their constant output."""
    refuse_keep_ratios(request)
    model, graph = request.model, request.graph
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    kept: dict[str, list[int]] = {}
    pins: dict[nn.Module, list[int]] = defaultdict(list)
    removed_inputs: dict[nn.Module, list[int]] = defaultdict(list)
    for group in request.groups:
        root = modules[group.name]
        full = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, list(range(group.channels)))
        variance = _group_variance(graph, full, group.channels)
        if variance is None:
            continue
        dead = [c for c in range(group.channels) if variance[c] < request.config.eps]
        if len(dead) == group.channels:  # a layer with no channel left would cut the network in two
            dead.remove(int(torch.argmax(variance)))
        if not dead:
            continue
        kept[group.name] = [c for c in range(group.channels) if c not in dead]
        for dep, idxs in graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, dead):
            module = dep.target.module
            if isinstance(module, _BatchNorm) and graph.is_out_channel_pruning_fn(dep.handler):
                pins[module].extend(idxs)
            elif isinstance(module, COMPRESSIBLE) and graph.is_in_channel_pruning_fn(dep.handler):
                removed_inputs[module].extend(idxs)
    if not kept:
        return PrunePlan()
    inputs = _pinned_consumer_inputs(model, request.example_input, pins, list(removed_inputs))
    folds: dict[str, torch.Tensor] = {}
    for consumer, idxs in removed_inputs.items():
        target = _fold_target(graph, consumer, names)
        delta = _constant_response(consumer, inputs[consumer], sorted(set(idxs)))
        delta = -delta if target.endswith(".running_mean") else delta
        folds[target] = folds[target] + delta if target in folds else delta
    return PrunePlan(kept=kept, folds=folds)


def _group_variance(graph: tp.DependencyGraph, group: tp.Group, channels: int) -> torch.Tensor | None:
    """Per group channel, the largest BN running variance over the group's BNs; None when some producer of
    the group has no BN after it (its channels cannot be shown constant). Built on the BN statistics' device
    (a CPU tensor indexed with a CUDA one fails)."""
    norms = [item.dep.target.module for item in group if isinstance(item.dep.target.module, _BatchNorm)]
    device = norms[0].running_var.device if norms and norms[0].running_var is not None else torch.device("cpu")
    variance = torch.full((channels,), -float("inf"), dtype=torch.float64, device=device)
    covered: set[int] = set()
    for item in group:
        module = item.dep.target.module
        if not graph.is_out_channel_pruning_fn(item.dep.handler):
            continue
        if isinstance(module, COMPRESSIBLE):
            if not any(isinstance(out.module, _BatchNorm) and out.module.track_running_stats for out in item.dep.target.outputs):
                return None
        elif isinstance(module, _BatchNorm):
            if not module.track_running_stats:
                return None
            roots = torch.tensor(item.root_idxs, device=device)
            var = module.running_var.detach().double()[torch.tensor(item.idxs, device=device)]
            variance[roots] = torch.maximum(variance[roots], var)
            covered.update(item.root_idxs)
    return None if len(covered) < channels else variance


def _pinned_consumer_inputs(
    model: nn.Module, example_input: torch.Tensor, pins: dict[nn.Module, list[int]], consumers: list[nn.Module]
) -> dict[nn.Module, torch.Tensor]:
    """One eval forward pass with the removed channels pinned to beta at their BN outputs; returns each
    consumer's input (one sample), whose removed channels then hold exactly the constants they receive."""
    seen: dict[nn.Module, torch.Tensor] = {}

    def pin(bn: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor(sorted(set(pins[bn])), device=output.device)
        beta = bn.bias.detach()[idx] if bn.bias is not None else torch.zeros(len(idx), dtype=output.dtype, device=output.device)
        output = output.clone()
        output[:, idx] = beta.reshape(-1, *([1] * (output.dim() - 2)))
        return output

    def record(layer: nn.Module, args: tuple) -> None:
        seen[layer] = args[0][0].detach().clone()

    handles = [bn.register_forward_hook(pin) for bn in pins] + [layer.register_forward_pre_hook(record) for layer in consumers]
    with probing(model, handles):
        model(example_input)
    return seen


def _constant_response(layer: nn.Module, sample_input: torch.Tensor, idxs: list[int]) -> torch.Tensor:
    """U of eq. 14: the layer's response to its removed input channels alone, all taps inside the input."""
    weight = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        x = torch.zeros_like(sample_input.reshape(-1, layer.in_features)[0])
        x[idxs] = sample_input.reshape(-1, layer.in_features)[0, idxs]
        return F.linear(x.unsqueeze(0), weight).squeeze(0)
    # Read at the centre: a padded pooling between the BN and this layer can bend a pinned channel at the border.
    centre = tuple(size // 2 for size in sample_input.shape[1:])
    span = [d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size)]
    x = torch.zeros(1, layer.in_channels, *span, dtype=weight.dtype, device=weight.device)
    x[0, idxs] = sample_input[(idxs, *centre)].reshape(-1, *[1] * len(span))
    conv = _CONV_FN[type(layer)]
    return conv(x, weight, None, stride=1, padding=0, dilation=layer.dilation, groups=layer.groups).flatten()


def _fold_target(graph: tp.DependencyGraph, consumer: nn.Module, names: dict[nn.Module, str]) -> str:
    outputs = graph.module2node[consumer].outputs
    if len(outputs) == 1 and isinstance(outputs[0].module, _BatchNorm) and outputs[0].module.track_running_stats:
        return f"{names[outputs[0].module]}.running_mean"
    return f"{names[consumer]}.bias"
