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
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from autoprune.cost import LayerQuant, measure_cost
from autoprune.models import COMPRESSIBLE, compressible_layers, input_readers
from autoprune.policy import FLOAT_BITS, LayerPolicy, Policy, write_atomic
from autoprune.prune.structured import dependency_graph, groups_in_graph
from autoprune.search.budget_ip import Assignment, CostModel, LayerChoices, LayerCostModel, Metric, SpaceChoices, assignment_cost, solve_budgets
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
        # the layers a policy sets: products and embeddings follow them (their MACs are left to the final cost)
        for layer in report.layers:
            if layer.name in names:
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


class SolvedPrior(BaseModel):
    """One budget's least-predicted-loss policy with its tag, the budget, its exact cost and its predicted loss
    increase (rung 0 of the fidelity ladder: ``search.ladder``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    policy: Policy
    tag: str
    budget: float
    cost: float
    loss: float


def sensitivity_solutions(
    base_model: nn.Module,
    task: "Task",
    *,
    space_choices: SpaceChoices,
    budgets: int = 8,
    objective_metric: Metric = "bops",
    method: Method = DEFAULT_METHOD,
    batches: int = 4,
    template: Policy | None = None,
) -> list[SolvedPrior]:
    """The least-predicted-loss policy for each of ``budgets`` cost budgets, cheapest first, with its tag, cost and
    predicted loss; a policy equal to a cheaper budget's is left out.

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
    if isinstance(solved.get(key), list) and all(isinstance(entry, dict) for entry in solved[key]):
        return [SolvedPrior.model_validate(entry) for entry in solved[key]]
    costs = cost_model(base_model, input_shape=task.input_shape, w_bits=w_bits, input_bits=input_bits, metric=objective_metric)
    priors: list[SolvedPrior] = []
    for index, solution in enumerate(solve_budgets(table, costs, choices=space_choices, budgets=budgets, template=template)):
        if all(solution.policy != prior.policy for prior in priors):
            priors.append(SolvedPrior(policy=solution.policy, tag=TAG.format(index=index), budget=solution.budget, cost=solution.cost, loss=solution.loss))
    write_atomic(path, json.dumps({**solved, key: [prior.model_dump(mode="json") for prior in priors]}))
    return priors


def sensitivity_priors(base_model: nn.Module, task: "Task", **options: Any) -> list[tuple[Policy, str]]:
    """``sensitivity_solutions``' policies with their tags, cheapest budget first."""
    return [(prior.policy, prior.tag) for prior in sensitivity_solutions(base_model, task, **options)]


UNIFORM_KEEP = (1.0, 0.5, 0.25)
UNIFORM_BITS = (8, 4, 3)
UNIFORM_TAG = "prior=uniform:keep={keep:g},bits={bits}"


def uniform_solutions(
    base_model: nn.Module, task: "Task", *, space_choices: SpaceChoices, budgets: Sequence[float], objective_metric: Metric = "bops",
    template: Policy | None = None,
) -> list[SolvedPrior]:
    """Uniform policies (one keep ratio and one bit-width for weights and activations of every layer, as far
    as each layer's choices allow): the grid ``UNIFORM_KEEP`` x ``UNIFORM_BITS`` (W8A8, W4A4, W3A3, each at full,
    half and quarter width), those whose cost lies in the span of ``budgets`` (widened twofold), cheapest first. So the first
    trials hold the baselines a user compares a front against, along the costs the integer program's policies
    sit at, and no uniform policy of them can dominate the front unseen (a grid placed by cost alone chose
    extremes such as W2A2 at full width instead, and missed keep 0.5 W4A4, which then beat the final front)."""
    w_bits = sorted({b for c in (space_choices.default, *space_choices.layers.values()) for b in c.w_bits})
    input_bits = template.input_bits if template is not None else Policy().input_bits
    costs = cost_model(base_model, input_shape=task.input_shape, w_bits=w_bits, input_bits=input_bits, metric=objective_metric)
    options: list[tuple[float, float, int, Policy]] = []
    for keep in UNIFORM_KEEP:
        for bits in UNIFORM_BITS:
            assignment, policy = _uniform(costs, space_choices, keep=keep, bits=bits, template=template)
            options.append((assignment_cost(costs, assignment), keep, bits, policy))
    if not budgets:
        return []
    # the span, widened by a factor of two either way: the dearest budget is the space's dearest mixed policy,
    # which can cost less than W8A8 everywhere (the layer reading the input pays its input bits, not 8)
    low, high = min(budgets) / 2, max(budgets) * 2
    chosen: list[SolvedPrior] = []
    for cost, keep, bits, policy in sorted(options, key=lambda option: option[0]):
        if low <= cost <= high and all(policy != prior.policy for prior in chosen):
            chosen.append(SolvedPrior(policy=policy, tag=UNIFORM_TAG.format(keep=keep, bits=bits), budget=cost, cost=cost, loss=math.nan))
    return chosen


def _uniform(costs: CostModel, choices: SpaceChoices, *, keep: float, bits: int, template: Policy | None) -> tuple[Assignment, Policy]:
    """The assignment and policy nearest to one keep ratio and one bit-width inside each layer's choices."""
    def nearest(options: Sequence[float], target: float) -> Any:
        return min(options, key=lambda option: (abs(option - target), -option))

    pairs = {name: (nearest(choices.for_layer(name).w_bits, bits), nearest(choices.for_layer(name).a_bits, bits)) for name in costs.layers}
    keeps = {}
    for name, layer in costs.layers.items():
        if layer.out_group is not None and layer.out_group not in keeps:
            keeps[layer.out_group] = nearest(choices.for_layer(name).keep_ratio, keep)
    assignment = Assignment(bits=pairs, keep=keeps)
    layers = {
        name: LayerPolicy(keep_ratio=keeps.get(costs.layers[name].out_group, 1.0) if costs.layers[name].out_group else 1.0, w_bits=w, a_bits=a)
        for name, (w, a) in pairs.items()
    }
    return assignment, (template or Policy()).model_copy(update={"layers": layers})


def _read_cache(path: Path) -> dict[str, Any]:
    """The cached solutions by key; an unreadable file is solved again (the cache is ours, not the user's)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
