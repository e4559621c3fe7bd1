"""Structured pruning: remove whole output channels of Conv1d / Conv2d / Linear layers, physically, in place.

Channels that must be removed together form a *channel group* (found with Torch-Pruning's dependency
graph): the outputs of layers summed by a residual add, and a depthwise conv with the layer that feeds it
(a depthwise conv has one filter per input channel, so it joins its producer's group). A group takes ONE keep
ratio. Torch-Pruning itself silently ignores a second, different ratio given to another member of a coupled
group; here every member given a ratio must agree or ``prune_structured`` raises, and a search samples one
keep ratio per group (``channel_groups``), so no sampled value is ever silently ignored. Groups whose
channels are the model's output (the final classifier) or that hold a single channel are not listed: a
ratio for them could do nothing.

Channels Torch-Pruning cannot remove consistently are *pinned* instead: their groups are not listed, and
``pinned_in_graph`` says why per layer. Those are the channels that reach a grouped convolution (not a depthwise
one) or a GroupNorm of several channels per group (Torch-Pruning cannot keep the groups equal), the channels a
reshape other than a flatten hands to a convolution (a channel shuffle, which it maps as a flatten), the
features of a Linear whose output is reshaped into heads (Hugging Face BERT's query / key / value), and every
layer of a model whose graph Torch-Pruning fails to build or to group (shufflenet_v2).

A pruner is a function registered for a pruner config class (``register_pruner(SignalNorm)``, configs in
``autoprune.operators``) that, given the groups, their keep ratios and its config, says
which channels each group keeps and which constants to fold into the following layers (``PrunePlan``).
``prune_structured`` then removes the other channels with Torch-Pruning, and returns a
``StructuredRecord``: per layer name the kept output channel indices, and the folded constants. A record
is data (JSON through ``to_dict`` / ``from_dict``); ``replay_structured`` applies it to a fresh copy of the
base model, which is how a saved compressed model's shapes are rebuilt before its weights are loaded.

Everything at the API boundary is keyed by module name; module objects are looked up inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch_pruning as tp
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.models import COMPRESSIBLE, CONVS, compressible_layers
from autoprune.models.convert import CONVERTED, Attention, opaque
from autoprune.operators import PRUNER, PRUNERS, NoPruning, PrunerConfig, SignalNorm, parse_config


@dataclass(frozen=True)
class ChannelGroup:
    """Conv / Linear layers whose output channels are coupled and pruned together, with one keep ratio.

    ``name`` is the first member in the model's definition order: stable across runs and copies.
    """

    name: str
    layers: tuple[str, ...]
    channels: int


@dataclass(frozen=True)
class LayerPruning:
    """The output channels one layer kept (indices into the unpruned layer, ascending)."""

    kept: list[int]
    before: int
    after: int


@dataclass(frozen=True)
class StructuredRecord:
    """What ``prune_structured`` did, enough to redo it exactly on the base model.

    ``layers`` lists only the layers that lost channels. ``folds`` maps a tensor name (``"fc.bias"``,
    ``"layers.0.bn1.running_mean"``) to the values added to it before the channels were removed; a bias
    named there that the base layer lacks is created (PfQ folds constants into it).

    ``then`` holds later prunings of the same model (the PfQ workflow prunes twice), each relative to the
    model the one before it left; ``replay_structured`` applies them in order.
    """

    method: str
    layers: dict[str, LayerPruning] = field(default_factory=dict)
    folds: dict[str, list[float]] = field(default_factory=dict)
    then: tuple["StructuredRecord", ...] = ()

    def followed_by(self, later: "StructuredRecord") -> "StructuredRecord":
        """This record with ``later`` (made on the model this one left) appended to its sequence."""
        return StructuredRecord(method=self.method, layers=self.layers, folds=self.folds, then=(*self.then, later))

    def kept_in_base(self) -> dict[str, list[int]]:
        """Per layer that lost channels in any step, the base model's channel indices it keeps in the end."""
        kept = {name: list(p.kept) for name, p in self.layers.items()}
        for later in self.then:
            for name, p in later.layers.items():
                kept[name] = [kept[name][i] for i in p.kept] if name in kept else list(p.kept)
        return kept

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "method": self.method,
            "layers": {n: {"kept": list(p.kept), "before": p.before, "after": p.after} for n, p in self.layers.items()},
            "folds": {n: list(v) for n, v in self.folds.items()},
        }
        if self.then:
            data["then"] = [later.to_dict() for later in self.then]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StructuredRecord":
        try:
            layers = {
                str(name): LayerPruning(kept=[int(i) for i in entry["kept"]], before=int(entry["before"]), after=int(entry["after"]))
                for name, entry in data.get("layers", {}).items()
            }
            folds = {str(name): [float(v) for v in values] for name, values in data.get("folds", {}).items()}
            method = str(data["method"])
            then = tuple(cls.from_dict(later) for later in data.get("then", []))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise AutopruneError("structured record", type(data).__name__, f"is not a structured pruning record ({exc!r})") from None
        for name, entry in layers.items():
            if entry.after != len(entry.kept) or len(set(entry.kept)) != entry.after or not all(0 <= i < entry.before for i in entry.kept):
                raise AutopruneError(f"structured record: layers.{name}", entry.kept, f"are not {entry.after} distinct channel indices below {entry.before}")
        return cls(method=method, layers=layers, folds=folds, then=then)


@dataclass(frozen=True)
class PruneRequest:
    """What a registered pruner sees. ``keep`` maps group names to the keep ratio given for the group;
    ``config`` is the pruner's own config."""

    model: nn.Module
    graph: tp.DependencyGraph
    groups: tuple[ChannelGroup, ...]
    keep: Mapping[str, float]
    example_input: torch.Tensor
    config: PrunerConfig


@dataclass(frozen=True)
class PrunePlan:
    """A pruner's answer: kept channel indices per group name (groups left whole are absent), and the
    values to add to named tensors (a layer's bias or a BN's running_mean) before channels are removed."""

    kept: dict[str, list[int]] = field(default_factory=dict)
    folds: dict[str, torch.Tensor] = field(default_factory=dict)


Pruner = Callable[[PruneRequest], PrunePlan]


def register_pruner(config: type[PrunerConfig]) -> Callable[[Pruner], Pruner]:
    """Register a structured pruner as the handler of a pruner config class (the policy's ``pruner``)."""
    return PRUNERS.register(config)


def pruner(config: PrunerConfig | str | Any) -> Pruner:
    """The pruner registered for a config (or a bare kind)."""
    return PRUNERS.lookup(config)


def keep_count(ratio: float, channels: int) -> int:
    """Channels a group keeps at keep ratio ``ratio``: round(ratio * channels), at least one."""
    return max(1, round(ratio * channels))


class _Pinned(tp.pruner.BasePruningFunc):
    """Attention and recurrent layers (converted, ``autoprune.models.convert``) keep their widths: their q / k
    / v / out projections share the head split and their gates the hidden state, which Torch-Pruning's
    channel coupling does not follow. The graph sees each as one op of fixed input and output widths, and a
    group that would change them is not offered (``groups_in_graph``)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        raise AutopruneError("keep", type(layer).__name__, "cannot narrow an attention or recurrent layer's widths (pinned)")

    prune_in_channels = None  # type: ignore[assignment] - in and out are one dependency-free pair of widths

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.widths[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.widths[0]


class UntracedGraph(tp.DependencyGraph):
    """The graph of a model Torch-Pruning could not trace (a channel shuffle's reshapes divide by zero in its
    index mapping): it has no groups, so every width is kept, and ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.module2node: dict[nn.Module, Any] = {}
        self.reason = reason


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's graph of ``model``, traced in eval mode so that tracing leaves BN statistics alone; an
    ``UntracedGraph`` (no groups) where Torch-Pruning fails on the model."""
    was_training = model.training
    # A grad-requiring input gives every output a grad_fn even when the model's parameters are frozen. Two
    # samples: on a batch of one, Torch-Pruning's index mapping fails where a 2-D input meets a Linear first
    # (a model of tabular features), taking the size-1 batch dimension for an unbind.
    sample = example_input.detach()[:1]
    traced_input = torch.cat([sample, sample]).requires_grad_(example_input.is_floating_point())
    try:
        with torch.enable_grad(), opaque():
            pinned = {kind: _Pinned() for kind in CONVERTED}
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=traced_input, verbose=False, customized_pruners=pinned)
            model.eval()
            with torch.no_grad():
                graph.head_splits = _head_splits(model, traced_input.detach())
            return graph
    except AutopruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Torch-Pruning fails on, the widths are kept and it is said why
        detail = (str(exc).strip().splitlines() or [""])[0]
        return UntracedGraph(f"Torch-Pruning cannot trace the model's channel dependencies ({type(exc).__name__}: {detail})")
    finally:
        model.train(was_training)


_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten}


class _SplitWatch(torch.overrides.TorchFunctionMode):
    """Sees every view / reshape of a Linear's output that splits its last dimension (its features) into
    several, as an attention written by hand splits q / k / v into heads."""

    def __init__(self, outputs: Mapping[int, str]) -> None:
        super().__init__()
        self.outputs, self.split = outputs, set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if func in _VIEWS and isinstance(source, torch.Tensor) and id(source) in self.outputs and isinstance(result, torch.Tensor) \
                and result.dim() > source.dim() and result.shape[-1] < source.shape[-1]:
            self.split.add(self.outputs[id(source)])
        return result


def _head_splits(model: nn.Module, example_input: torch.Tensor) -> set[str]:
    """The Linear layers whose output the forward pass reshapes into heads (``q.view(n, length, -1, head_dim)``).
    Torch-Pruning removes such a layer's channels one by one, leaving a width the reshape cannot split (a failed
    trial): their widths are pinned instead."""
    outputs: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() >= 3:
                outputs[id(output)] = name
                keep_alive.append(output)  # an id stays this tensor's while the forward pass runs
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    watch = _SplitWatch(outputs)
    try:
        with watch:
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return watch.split


def _grouped(module: nn.Module) -> bool:
    """A grouped convolution other than a depthwise one (one filter per channel, which Torch-Pruning prunes)."""
    return isinstance(module, CONVS) and module.groups > 1 and not module.groups == module.in_channels == module.out_channels


def groups_in_graph(model: nn.Module, graph: tp.DependencyGraph) -> list[ChannelGroup]:
    """The prunable channel groups of ``graph`` (made by ``dependency_graph(model, ...)``)."""
    return _scan(model, graph)[0]


def pinned_in_graph(model: nn.Module, graph: tp.DependencyGraph) -> dict[str, str]:
    """Layers whose widths are kept although they have consumers, by name, with why (a grouped convolution,
    a model Torch-Pruning cannot trace). The classifier, whose width is the model's output, is not listed, except
    in a model that cannot be traced, where every layer is."""
    return _scan(model, graph)[1]


def pinned_widths(model: nn.Module, *, example_input: torch.Tensor) -> dict[str, str]:
    """``pinned_in_graph`` of the model's graph."""
    return pinned_in_graph(model, dependency_graph(model, example_input))


def _scan(model: nn.Module, graph: tp.DependencyGraph) -> tuple[list[ChannelGroup], dict[str, str]]:
    if isinstance(graph, UntracedGraph):
        return [], {name: graph.reason for name in compressible_layers(model)}
    try:
        all_groups = list(graph.get_all_groups(root_module_types=COMPRESSIBLE))
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's index mapping fails on some graphs it built
        return _scan(model, UntracedGraph(f"Torch-Pruning cannot group the model's channels ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]})"))
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    order = {name: i for i, name in enumerate(names.values())}
    found = []
    pinned: dict[str, str] = {}
    for group in all_groups:
        producers = [dep.target for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        if any(isinstance(dep.target.module, CONVERTED) for dep, _ in group):
            reason = "an attention or recurrent layer reads or writes these channels (its widths are pinned; heads prune whole)"
            pinned.update({names[node.module]: reason for node in producers if isinstance(node.module, COMPRESSIBLE)})
            continue
        # A producer with no consumer in the graph is the model's output: its width is not ours to change.
        if any(not node.outputs for node in producers):
            continue
        layers = sorted({names[node.module] for node in producers if isinstance(node.module, COMPRESSIBLE)}, key=order.__getitem__)
        channels = graph.get_out_channels(modules[layers[0]])
        if channels is None or channels < 2:
            continue
        reason = _pin_reason(graph, group, names)
        split = next((layer for layer in layers if layer in getattr(graph, "head_splits", ())), None)
        if split is not None:
            reason = f"the output of {split} is reshaped into heads, which Torch-Pruning's channel-by-channel removal would leave unequal"
        if reason is not None:
            pinned.update({layer: reason for layer in layers})
            continue
        found.append(ChannelGroup(name=layers[0], layers=tuple(layers), channels=channels))
    return sorted(found, key=lambda group: order[group.name]), pinned


def _grouped_norm(module: nn.Module) -> bool:
    """A GroupNorm whose groups hold several channels each, but not all of them (one group is a LayerNorm)."""
    return isinstance(module, nn.GroupNorm) and 1 < module.num_groups < module.num_channels


def _pin_reason(graph: tp.DependencyGraph, group: Any, names: Mapping[nn.Module, str]) -> str | None:
    """Why a group's channels cannot be removed consistently, or None."""
    grouped = next((dep.target.module for dep, _ in group if _grouped(dep.target.module)), None)
    if grouped is not None:
        # Torch-Pruning removes a grouped conv's input channels as if every group lost the same ones, and
        # its output channels one by one, which leaves groups of unequal widths: neither is a valid conv.
        return f"its channels reach grouped convolution {names[grouped]} (groups={grouped.groups}), whose groups Torch-Pruning cannot keep equal"
    norm = next((dep.target.module for dep, _ in group if _grouped_norm(dep.target.module)), None)
    if norm is not None:
        return f"its channels reach GroupNorm {names[norm]} ({norm.num_groups} groups), whose groups Torch-Pruning cannot keep equal"
    for dep, _ in group:
        if dep.target.type == tp.ops.OPTYPE.RESHAPE and not _lays_out_a_vector(dep.target):
            read_by_conv = _conv_after(dep.target)
            if read_by_conv is not None:
                # Torch-Pruning maps every reshape as a flatten (right before a classifier); a channel shuffle
                # (view, transpose, view) permutes the channels, so the convolution reading them would lose
                # other input channels than the ones removed.
                return f"its channels are reshaped (a channel shuffle?) before convolution {names[read_by_conv]} reads them, which Torch-Pruning maps as a flatten"
    return None


def _lays_out_a_vector(node: Any) -> bool:
    """A reshape of a tensor with one non-singleton dimension (a layer scale's ``gamma.reshape(1, -1, 1, 1)``):
    its channels keep their order, whatever reads them."""
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None) or getattr(node.grad_fn, "_saved_self_sizes", None)
    return sizes is not None and sum(1 for size in sizes if int(size) > 1) <= 1


def _conv_after(node: Any) -> nn.Module | None:
    """The first convolution reached downstream of a graph node, through anything but Conv / Linear layers."""
    seen, frontier = set(), list(node.outputs)
    while frontier:
        current = frontier.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current.module, CONVS):
            return current.module
        if not isinstance(current.module, COMPRESSIBLE):
            frontier.extend(current.outputs)
    return None


def channel_groups(model: nn.Module, *, example_input: torch.Tensor) -> list[ChannelGroup]:
    """The groups a search samples one keep ratio for, in the model's definition order."""
    return groups_in_graph(model, dependency_graph(model, example_input))


def head_groups(model: nn.Module) -> dict[str, tuple[str, str, str]]:
    """Per attention of two heads or more, its q / k / v projections: one head keep ratio prunes heads whole."""
    return {
        name: (f"{name}.q_proj", f"{name}.k_proj", f"{name}.v_proj")
        for name, module in model.named_modules() if isinstance(module, Attention) and module.num_heads > 1
    }


def searched_groups(model: nn.Module, *, example_input: torch.Tensor) -> list[ChannelGroup]:
    """The groups a search samples one keep ratio for: the channel groups, then per attention of two heads or
    more its q / k / v as one group of ``num_heads`` channels, whose keep ratio is a head keep ratio
    (``prune_structured`` keeps whole heads)."""
    groups = channel_groups(model, example_input=example_input)
    grouped = {layer for group in groups for layer in group.layers}
    heads = [
        ChannelGroup(name=names[0], layers=names, channels=model.get_submodule(attention).num_heads)
        for attention, names in head_groups(model).items() if not grouped.intersection(names)
    ]
    return groups + heads


def _split_head_ratios(model: nn.Module, keep: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """The head keep ratio of each attention named (its q / k / v agree), and the other layers' ratios."""
    heads: dict[str, float] = {}
    rest = dict(keep)
    for attention, names in head_groups(model).items():
        given = {n: rest.pop(n) for n in names if n in rest}
        if not given:
            continue
        every = {n: float(given.get(n, 1.0)) for n in names}
        if len(set(every.values())) > 1:
            raise AutopruneError(f"keep[heads of {attention}]", every, "conflict: q_proj, k_proj and v_proj share their heads and take one keep ratio")
        ratio = next(iter(every.values()))
        if not 0.0 < ratio <= 1.0:
            raise AutopruneError(f"keep[{names[0]!r}]", ratio, "must be a keep ratio in (0, 1]")
        if ratio < 1.0:
            heads[attention] = ratio
    return heads, rest


def _prune_heads(model: nn.Module, ratios: Mapping[str, float]) -> dict[str, LayerPruning]:
    """Keep, per attention, the heads of largest signal norm (q / k / v rows and out_proj columns); the rows
    each projection kept."""
    record: dict[str, LayerPruning] = {}
    for name, ratio in ratios.items():
        attention = model.get_submodule(name)
        count = keep_count(ratio, attention.num_heads)
        if count == attention.num_heads:
            continue
        signal = sum(p.weight.detach().double().pow(2).view(attention.num_heads, -1).sum(1) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
        signal = signal + attention.out_proj.weight.detach().double().pow(2).view(-1, attention.num_heads, attention.head_dim).sum((0, 2))
        kept = sorted(torch.argsort(signal, descending=True, stable=True)[:count].tolist())
        before = attention.q_proj.out_features
        rows = attention.head_rows(kept)
        attention.keep_heads(kept)
        for proj in ("q_proj", "k_proj", "v_proj"):
            record[f"{name}.{proj}"] = LayerPruning(kept=rows, before=before, after=len(rows))
    return record


def prune_structured(
    model: nn.Module,
    *,
    keep: Mapping[str, float],
    example_input: torch.Tensor,
    method: PrunerConfig | str = "signal_norm",
) -> StructuredRecord:
    """Remove output channels in place with the pruner registered for ``method`` (a config or a bare kind).

    ``keep`` maps layer names to keep ratios in (0, 1]; a layer not named keeps all its channels (ratio 1).
    The members of a channel group share their channels, so they must all have the same ratio: naming one
    member of a group with a ratio below 1 means naming every member with that ratio, or this raises. A
    layer outside every group (the final classifier) may only be given 1.0.
    """
    config = parse_config(PRUNER, method)
    prune_fn = pruner(config)
    head_ratios, keep = _split_head_ratios(model, keep)
    if head_ratios and not config.takes_keep_ratios:
        raise AutopruneError("keep", head_ratios, f"are ignored by pruner {config.kind!r}, which takes no keep ratios (use signal_norm for keep ratios)")
    graph = dependency_graph(model, example_input)
    found, pinned = _scan(model, graph)
    groups = tuple(found)
    request = PruneRequest(
        model=model, graph=graph, groups=groups, keep=_group_ratios(model, groups, keep, pinned=pinned),
        example_input=example_input, config=config,
    )
    plan = prune_fn(request)
    record = StructuredRecord(
        method=config.kind,
        layers={
            layer: LayerPruning(kept=sorted(plan.kept[group.name]), before=group.channels, after=len(plan.kept[group.name]))
            for group in groups if group.name in plan.kept
            for layer in group.layers
        },
        folds={name: delta.detach().cpu().tolist() for name, delta in plan.folds.items()},
    )
    _apply(model, graph, groups, kept={g: sorted(k) for g, k in plan.kept.items()}, folds=plan.folds)
    record.layers.update(_prune_heads(model, head_ratios))
    return record


def replay_structured(model: nn.Module, record: StructuredRecord, *, example_input: torch.Tensor) -> nn.Module:
    """Apply ``record`` to a fresh copy of the base model it was made on: same kept indices, same folds."""
    graph = dependency_graph(model, example_input)
    groups = tuple(groups_in_graph(model, graph))
    member_of = {layer: group for group in groups for layer in group.layers}
    kept: dict[str, list[int]] = {}
    heads = _recorded_heads(model, record)
    for layer, entry in record.layers.items():
        if any(layer in names for names in head_groups(model).values()):
            continue
        group = member_of.get(layer)
        if group is None:
            raise AutopruneError("structured record: layers", layer, "is not a prunable layer of this model")
        if entry.before != group.channels:
            raise AutopruneError(f"structured record: layers.{layer}.before", entry.before, f"does not match the model's {group.channels} channels")
        if kept.setdefault(group.name, list(entry.kept)) != list(entry.kept):
            raise AutopruneError(f"structured record: layers.{layer}.kept", entry.kept, f"differs from its group {group.name}'s ({', '.join(group.layers)})")
    for group in groups:
        missing = [layer for layer in group.layers if layer not in record.layers]
        if group.name in kept and missing:
            raise AutopruneError("structured record: layers", missing, f"are missing from group {group.name} ({', '.join(group.layers)})")
    folds = {}
    for name, values in record.folds.items():
        _, _, size = _fold_owner(model, name)
        if size != len(values):
            raise AutopruneError(f"structured record: folds.{name}", len(values), f"values do not match the tensor's {size}")
        folds[name] = torch.tensor(values, dtype=torch.float64)
    _apply(model, graph, groups, kept=kept, folds=folds)
    for name, kept_heads in heads.items():
        model.get_submodule(name).keep_heads(kept_heads)
    for later in record.then:
        replay_structured(model, later, example_input=example_input)
    return model


def _recorded_heads(model: nn.Module, record: StructuredRecord) -> dict[str, list[int]]:
    """The heads each attention kept, read from its projections' rows in ``record`` (all three, whole heads)."""
    heads: dict[str, list[int]] = {}
    for name, names in head_groups(model).items():
        entries = [record.layers.get(n) for n in names]
        if not any(entries):
            continue
        attention = model.get_submodule(name)
        rows = entries[0].kept if entries[0] is not None else None
        kept = sorted({r // attention.head_dim for r in rows}) if rows is not None else []
        if any(e is None or e.kept != rows for e in entries) or attention.head_rows(kept) != rows or entries[0].before != attention.q_proj.out_features:
            raise AutopruneError(f"structured record: layers.{names[0]}", rows, f"are not whole heads of {name} kept alike by q_proj, k_proj and v_proj")
        heads[name] = kept
    return heads


def _group_ratios(model: nn.Module, groups: tuple[ChannelGroup, ...], keep: Mapping[str, float], *, pinned: Mapping[str, str]) -> dict[str, float]:
    layers = compressible_layers(model)
    member_of = {layer: group for group in groups for layer in group.layers}
    given: dict[str, dict[str, float]] = {}
    for name, ratio in keep.items():
        if name not in layers:
            raise AutopruneError("keep", name, f"is not a Conv1d / Conv2d / Linear layer of the model (layers: {', '.join(layers)})")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise AutopruneError(f"keep[{name!r}]", ratio, "must be a keep ratio in (0, 1]")
        group = member_of.get(name)
        if group is None:
            if ratio < 1.0:
                why = f"its width is pinned: {pinned[name]}" if name in pinned else "the layer's output channels are the model's output or cannot be pruned"
                raise AutopruneError(f"keep[{name!r}]", ratio, f"cannot be applied: {why} (give 1.0)")
            continue
        given.setdefault(group.name, {})[name] = float(ratio)
    by_name = {group.name: group for group in groups}
    for group_name, ratios in given.items():
        every = {layer: ratios.get(layer, 1.0) for layer in by_name[group_name].layers}
        if len(set(every.values())) > 1:
            raise AutopruneError(
                f"keep[group {group_name}]", every,
                "conflict: these layers share their output channels and take one keep ratio (a layer not named keeps 1.0)",
            )
    return {group_name: next(iter(ratios.values())) for group_name, ratios in given.items()}


def _fold_owner(model: nn.Module, name: str) -> tuple[nn.Module, str, int]:
    """The module, attribute and length of a fold target: a conv / Linear bias or a BN running_mean."""
    owner_name, _, attr = name.rpartition(".")
    owner = dict(model.named_modules()).get(owner_name)
    if attr == "bias" and isinstance(owner, COMPRESSIBLE):
        return owner, attr, owner.weight.shape[0]
    if attr == "running_mean" and isinstance(owner, nn.modules.batchnorm._BatchNorm) and owner.running_mean is not None:
        return owner, attr, owner.running_mean.numel()
    raise AutopruneError("fold target", name, "is not a Conv1d / Conv2d / Linear bias or a BatchNorm running_mean of the model")


def _apply(
    model: nn.Module,
    graph: tp.DependencyGraph,
    groups: tuple[ChannelGroup, ...],
    *,
    kept: Mapping[str, list[int]],
    folds: Mapping[str, torch.Tensor],
) -> None:
    # Folds are computed on the unpruned layers, so they go in before any channel is removed.
    with torch.no_grad():
        for name, delta in folds.items():
            owner, attr, size = _fold_owner(model, name)
            if getattr(owner, attr) is None:
                # PfQ folds into the next layer's bias; a bias-free layer gets one (eq. 14 with b = 0).
                owner.bias = nn.Parameter(torch.zeros(size, dtype=owner.weight.dtype, device=owner.weight.device))
            target = getattr(owner, attr)
            target.add_(delta.to(target))
    modules = dict(model.named_modules())
    for group in groups:
        if group.name not in kept:
            continue
        root = modules[group.name]
        removed = sorted(set(range(group.channels)) - set(kept[group.name]))
        graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, removed).prune()


@register_pruner(SignalNorm)
def signal_norm(request: PruneRequest) -> PrunePlan:
    """Keep, per group, the channels with the largest signal norm (seed 000 sec. 3): the squared L2 norm of
    the output filter, summed over the group's members (eq. 5's signal ``||W||^2``, per channel)."""
    modules = dict(request.model.named_modules())
    kept = {}
    for group in request.groups:
        count = keep_count(request.keep.get(group.name, 1.0), group.channels)
        if count == group.channels:
            continue
        signal = sum(modules[layer].weight.detach().double().flatten(1).pow(2).sum(1) for layer in group.layers)
        # A stable sort makes ties keep the lower channel index, so a record never depends on sort internals.
        ranked = torch.argsort(signal, descending=True, stable=True)
        kept[group.name] = sorted(ranked[:count].tolist())
    return PrunePlan(kept=kept)


def refuse_keep_ratios(request: PruneRequest) -> None:
    """A pruner that takes no keep ratios must not be handed ratios it would ignore."""
    ratios = {name: ratio for name, ratio in request.keep.items() if ratio < 1.0}
    if ratios and not request.config.takes_keep_ratios:
        rule = f"are ignored by pruner {request.config.kind!r}, which takes no keep ratios (use signal_norm for keep ratios)"
        raise AutopruneError("keep", ratios, rule)


@register_pruner(NoPruning)
def no_pruning(request: PruneRequest) -> PrunePlan:
    refuse_keep_ratios(request)
    return PrunePlan()
