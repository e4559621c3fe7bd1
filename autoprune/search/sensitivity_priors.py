"""Sensitivity priors: the integer program's least-loss policy per cost budget, for a study to enqueue.

The model-facing half of ``budget_ip``: ``cost_model`` reads from a model what the program needs (MACs per
weight bit-width at full width from ``measure_cost``; for each layer the channel group producing its outputs
and the one producing its inputs, from Torch-Pruning's dependency graph), and ``sensitivity_priors`` joins
the cached sensitivity table (``autoprune.sensitivity.load_or_measure``) with it. Each policy is tagged
``prior=sensitivity:budget=<i>``, i = 0 for the cheapest budget; a policy equal to a cheaper budget's is
dropped, so the list may be shorter than ``budgets``. The solved policies are cached beside the table
(``sensitivity_priors.json`` in the model's cache folder), keyed by the table, the choices, the budgets, the
metric and the template.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from autoprune.cost import LayerQuant, measure_cost
from autoprune.models import COMPRESSIBLE, compressible_layers, input_readers
from autoprune.policy import FLOAT_BITS, Policy, write_atomic
from autoprune.prune.structured import dependency_graph, groups_in_graph
from autoprune.search.budget_ip import CostModel, LayerChoices, LayerCostModel, Metric, SpaceChoices, solve_budgets
from autoprune.sensitivity import DEFAULT_METHOD, Method, load_or_measure, table_path

if TYPE_CHECKING:
    from autoprune.search.space import SearchSpace
    from autoprune.task import Task

TAG = "prior=sensitivity:budget={index}"
PRIORS_FILE = "sensitivity_priors.json"


def cost_model(
    model: nn.Module, *, input_shape: tuple[int, int, int], w_bits: Sequence[int], input_bits: int = 8, metric: Metric = "bops"
) -> CostModel:
    """Per layer: MACs at full width for each of ``w_bits`` (and 32), its output and input channel groups."""
    macs: dict[str, dict[int, float]] = {}
    names = list(compressible_layers(model))
    for bits in sorted({*w_bits, FLOAT_BITS}):
        report = measure_cost(model, input_shape=input_shape, layers={n: LayerQuant(w_bits=bits) for n in names}, input_bits=input_bits)
        for layer in report.layers:
            macs.setdefault(layer.name, {})[bits] = layer.macs
    readers = input_readers(model, input_shape=input_shape)
    graph = dependency_graph(model, torch.zeros(1, *input_shape))
    groups = groups_in_graph(model, graph)
    modules = dict(model.named_modules())
    names_of = {m: n for n, m in modules.items()}
    out_group = {layer: group.name for group in groups for layer in group.layers}
    in_group: dict[str, str] = {}
    for group in groups:
        root = modules[group.name]
        for dep, _ in graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, [0]):
            target = dep.target.module
            if graph.is_in_channel_pruning_fn(dep.handler) and isinstance(target, COMPRESSIBLE):
                in_group[names_of[target]] = group.name
    return CostModel(
        metric=metric, input_bits=input_bits, groups={group.name: group.channels for group in groups},
        layers={
            name: LayerCostModel(macs=per_bits, out_group=out_group.get(name), in_group=in_group.get(name), reads_input=name in readers)
            for name, per_bits in macs.items()
        },
    )


def space_choices(space: "SearchSpace") -> SpaceChoices:
    """What a bound search space allows each layer, from its dimensions: a fixed field is its one value, a
    field the space leaves out (a pinned layer, a reader of the network input's a_bits) the float default."""
    layers = {}
    for name in space.layer_names:
        dims = space.layer_dims[name]
        keep = space._keep_dim(name)
        layers[name] = LayerChoices(
            w_bits=tuple(dims["w_bits"].values()) if "w_bits" in dims else (FLOAT_BITS,),
            a_bits=tuple(dims["a_bits"].values()) if "a_bits" in dims else (FLOAT_BITS,),
            keep_ratio=tuple(keep.values()) if keep is not None else (1.0,),
        )
    return SpaceChoices(default=LayerChoices(w_bits=(FLOAT_BITS,), a_bits=(FLOAT_BITS,)), layers=layers)


def sensitivity_priors(
    base_model: nn.Module,
    task: "Task",
    *,
    space_choices: SpaceChoices,
    budgets: int = 8,
    objective_metric: Metric = "bops",
    method: Method = DEFAULT_METHOD,
    batches: int = 4,
    template: Policy | None = None,
) -> list[tuple[Policy, str]]:
    """The least-predicted-loss policy for each of ``budgets`` cost budgets, with its tag, cheapest first.

    Choices come only from ``space_choices``, so every policy is inside the search space; ``template``
    gives the other policy fields (its ``input_bits`` costs the layers reading the network input).
    """
    everyone = [space_choices.default, *space_choices.layers.values()]
    w_bits = sorted({b for c in everyone for b in c.w_bits})
    a_bits = sorted({b for c in everyone for b in c.a_bits})
    keep_ratios = sorted({r for c in everyone for r in c.keep_ratio})
    table = load_or_measure(base_model, task, method=method, batches=batches, w_bits=w_bits, a_bits=a_bits, keep_ratios=keep_ratios)
    input_bits = template.input_bits if template is not None else Policy().input_bits
    # The solves take about a second on a small model (longer on a large one, budget_ip.TIME_LIMIT each); their
    # answer depends only on what the key holds, so it is cached beside the table, once per base model and space.
    key = hashlib.sha256(json.dumps(
        [table.to_json(), space_choices.model_dump_json(), budgets, objective_metric, template.to_dict() if template else None], sort_keys=True
    ).encode()).hexdigest()[:16]
    path = table_path(task, base_model).parent / PRIORS_FILE
    solved = _read_cache(path)
    if key in solved:
        return [(Policy.from_dict(policy), tag) for policy, tag in solved[key]]
    costs = cost_model(base_model, input_shape=task.input_shape, w_bits=w_bits, input_bits=input_bits, metric=objective_metric)
    priors: list[tuple[Policy, str]] = []
    for index, solution in enumerate(solve_budgets(table, costs, choices=space_choices, budgets=budgets, template=template)):
        if all(solution.policy != policy for policy, _ in priors):
            priors.append((solution.policy, TAG.format(index=index)))
    write_atomic(path, json.dumps({**solved, key: [(policy.to_dict(), tag) for policy, tag in priors]}))
    return priors


def _read_cache(path: Path) -> dict[str, Any]:
    """The cached solutions by key; an unreadable file is solved again (the cache is ours, not the user's)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
