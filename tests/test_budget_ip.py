"""The budget integer program against brute force, its cost against measure_cost, and the priors it yields."""

from __future__ import annotations

import itertools

import pytest
import torch

from autoprune.cost import LayerQuant, measure_cost
from autoprune.models import DigitsCNN
from autoprune.policy import LayerPolicy, Policy
from autoprune.prune import prune_structured
from autoprune.search.budget_ip import (
    BUDGET_TOLERANCE, Assignment, CostModel, LayerChoices, LayerCostModel, SpaceChoices, assignment_cost, assignment_loss,
    budget_grid, cost_range, full_width_cost, solve, solve_budgets,
)
from autoprune.search.sensitivity_priors import cost_model, sensitivity_priors
from autoprune.sensitivity import GroupSensitivity, LayerSensitivity, SensitivityTable

W_BITS, A_BITS, KEEPS = (2, 4, 8), (2, 8), (0.5, 1.0)


def _instance(loss_scale: float = 1.0) -> tuple[SensitivityTable, CostModel, SpaceChoices]:
    """Three chained layers (a reads the input), 3 weight x 2 activation bits, two groups of 2 keep ratios."""
    g = torch.Generator().manual_seed(0)
    r = lambda: loss_scale * float(torch.rand(1, generator=g))  # noqa: E731
    layers = {}
    for name in "abc":
        w = {2: loss_scale + 3 * r(), 4: 0.3 * r(), 8: 0.01 * r()}
        a = {2: loss_scale + 2 * r(), 8: 0.02 * r()}
        layers[name] = LayerSensitivity(params=10, trace=1.0, reads_input=name == "a", w_bits=w, a_bits={} if name == "a" else a)
    groups = {
        "a": GroupSensitivity(layers=("a",), channels=4, keep={0.5: 2 * r(), 1.0: 0.0}),
        "b": GroupSensitivity(layers=("b",), channels=6, keep={0.5: 2 * r(), 1.0: 0.0}),
    }
    table = SensitivityTable(method="hessian", batches=1, samples=1, probes=1, seconds=0.0, model_digest="-", layers=layers, groups=groups)
    costs = CostModel(
        metric="bops", input_bits=8, groups={"a": 4, "b": 6},
        layers={
            "a": LayerCostModel(macs={2: 900.0, 4: 1000.0, 8: 1000.0}, out_group="a", reads_input=True),
            "b": LayerCostModel(macs={2: 5000.0, 4: 6000.0, 8: 6000.0}, out_group="b", in_group="a"),
            "c": LayerCostModel(macs={2: 300.0, 4: 300.0, 8: 300.0, 32: 300.0}, in_group="b"),
        },
    )
    choices = SpaceChoices(default=LayerChoices(w_bits=W_BITS, a_bits=A_BITS, keep_ratio=KEEPS))
    return table, costs, choices


def _every_assignment() -> list[Assignment]:
    # Layer a reads the input: its a_bits is not a choice (the program reports the largest allowed).
    pairs = list(itertools.product(W_BITS, A_BITS))
    return [
        Assignment(bits={"a": (wa, 8), "b": pb, "c": pc}, keep={"a": ka, "b": kb})
        for wa, pb, pc, ka, kb in itertools.product(W_BITS, pairs, pairs, KEEPS, KEEPS)
    ]


def test_assignment_cost_by_hand() -> None:
    _, costs, _ = _instance()
    assignment = Assignment(bits={"a": (4, 8), "b": (2, 2), "c": (8, 8)}, keep={"a": 0.5, "b": 1.0})
    # a: 1000 x 1/2 x 4 x 8 (input bits); b: 5000 x 1 x 1/2 x 2 x 2; c: 300 x 1 x 8 x 8.
    assert assignment_cost(costs, assignment) == 16000 + 10000 + 19200


def _noisy(table: SensitivityTable) -> SensitivityTable:
    """Measured increases are noisy: b's 4-bit weights lose more than its 2-bit ones, c's 8-bit activations more
    than its 2-bit ones, and halving group a loses nothing; each makes a choice dominated."""
    b, c = table.layers["b"], table.layers["c"]
    return table.model_copy(update={
        "layers": {**table.layers, "b": b.model_copy(update={"w_bits": {**b.w_bits, 4: b.w_bits[2] + 0.1}}),
                   "c": c.model_copy(update={"a_bits": {2: c.a_bits[8], 8: c.a_bits[2]}})},
        "groups": {**table.groups, "a": table.groups["a"].model_copy(update={"keep": {0.5: 0.0, 1.0: 0.0}})},
    })


def test_dominated_choices_leave_the_program() -> None:
    from autoprune.search.budget_ip import _Problem

    table, costs, choices = _instance()
    for problem in (_Problem(table, costs, choices), _Problem(_noisy(table), costs, choices)):
        for name in "abc":
            measured = {p: (full_width_cost(costs, name, *p), problem.pair_loss(name, p)) for p in problem.pairs[name]}
            # kept: the pairs no other pair is at least as cheap and as good as (no exact ties in this instance)
            kept = [p for p, (c, l) in measured.items() if not any(q != p and mc <= c and ml <= l for q, (mc, ml) in measured.items())]
            assert sorted(problem.candidates[name]) == sorted(kept), name
    noisy = _Problem(_noisy(table), costs, choices)
    assert not [p for p in noisy.candidates["b"] if p[0] == 4]
    assert noisy.candidates["c"] == [(2, 2), (4, 2), (8, 2)]
    assert noisy.keep_candidates["a"] == [0.5]


# 1e-16: a confident model's Hessian gives losses far below the solver's absolute tolerances.
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("loss_scale", [1.0, 1e-16])
def test_program_matches_brute_force_at_every_budget(loss_scale: float, noisy: bool) -> None:
    table, costs, choices = _instance(loss_scale)
    table = _noisy(table) if noisy else table
    every = [(assignment_cost(costs, a), assignment_loss(table, a), a) for a in _every_assignment()]
    low, high = cost_range(table, costs, choices=choices)
    assert low == min(c for c, _, _ in every) and high == max(c for c, _, _ in every)
    # The optimum changes only at an assignment's cost: every 4th distinct cost (ties exactly at the budget),
    # and the log grid in between.
    budgets = sorted(set(sorted({c for c, _, _ in every})[::4]) | set(budget_grid(low, high, 12)))
    for budget in budgets:
        best = min(loss for cost, loss, _ in every if cost <= budget * (1 + BUDGET_TOLERANCE))
        solution = solve(table, costs, choices=choices, budget=budget)
        assert solution is not None
        assert solution.cost <= budget * (1 + BUDGET_TOLERANCE)
        assert solution.loss == pytest.approx(best, rel=1e-9, abs=0.0), budget
    assert solve(table, costs, choices=choices, budget=low * 0.99) is None


def test_solutions_span_the_range_and_become_policies() -> None:
    table, costs, choices = _instance()
    template = Policy(finetune_steps=7)
    solutions = solve_budgets(table, costs, choices=choices, budgets=5, template=template)
    low, high = cost_range(table, costs, choices=choices)
    assert [s.budget for s in solutions] == pytest.approx(budget_grid(low, high, 5))
    most = Assignment(bits={"a": (8, 8), "b": (8, 8), "c": (8, 8)}, keep={"a": 1.0, "b": 1.0})
    assert solutions[0].cost == low and solutions[-1].assignment == most
    assert all(s.cost <= s.budget * (1 + BUDGET_TOLERANCE) for s in solutions)
    losses = [s.loss for s in solutions]
    assert losses == sorted(losses, reverse=True)
    first = solutions[0]
    assert first.policy.finetune_steps == 7
    assert first.policy.layers["a"].keep_ratio == 0.5 and first.policy.layers["c"].keep_ratio == 1.0
    assert (first.policy.layers["b"].w_bits, first.policy.layers["b"].a_bits) == (2, 2)


def test_ties_at_zero_loss_take_the_larger_choice_the_budget_allows() -> None:
    # Measured increases are often 0 at several bit-widths; the largest budget must then buy the largest choices.
    table, costs, choices = _instance()
    flat = table.model_copy(update={"layers": {
        name: layer.model_copy(update={"w_bits": {b: 0.0 for b in layer.w_bits}, "a_bits": {b: 0.0 for b in layer.a_bits}})
        for name, layer in table.layers.items()
    }})
    solutions = solve_budgets(flat, costs, choices=choices, budgets=3)
    assert solutions[-1].assignment == Assignment(bits={"a": (8, 8), "b": (8, 8), "c": (8, 8)}, keep={"a": 1.0, "b": 1.0})
    assert all(s.cost <= s.budget * (1 + BUDGET_TOLERANCE) for s in solutions)


def test_pinned_layer_keeps_its_one_choice() -> None:
    table, costs, _ = _instance()
    choices = SpaceChoices(
        default=LayerChoices(w_bits=W_BITS, a_bits=A_BITS, keep_ratio=KEEPS),
        layers={"c": LayerChoices(w_bits=(8,), a_bits=(8,)), "b": LayerChoices(w_bits=(2, 4), a_bits=(2,), keep_ratio=(1.0,))},
    )
    for solution in solve_budgets(table, costs, choices=choices, budgets=4):
        assert solution.assignment.bits["c"] == (8, 8)
        assert solution.assignment.bits["b"][1] == 2 and solution.assignment.keep["b"] == 1.0
    pinned = SpaceChoices.of(w_bits=W_BITS, a_bits=A_BITS, keep_ratio=KEEPS, pinned=["c"])
    solutions = solve_budgets(table, costs, choices=pinned, budgets=3)
    assert [s.policy.layers["c"] for s in solutions] == [LayerPolicy()] * 3
    assert solutions[0].cost == assignment_cost(costs, Assignment(bits={"a": (2, 8), "b": (2, 2), "c": (32, 32)}, keep={"a": 0.5, "b": 0.5}))


def test_cost_model_is_exact_for_a_pruned_quantized_digits_cnn() -> None:
    # Dense convs and a linear: MACs scale with keep_out x keep_in, so the program's cost is measure_cost's.
    torch.manual_seed(0)
    model = DigitsCNN()
    costs = cost_model(model, input_shape=(1, 8, 8), w_bits=(2, 4, 8), input_bits=8)
    assert costs.layers["features.3"].in_group == "features.0" and costs.layers["classifier"].in_group == "features.7"
    assert costs.layers["features.0"].reads_input and costs.layers["classifier"].out_group is None
    bits = {"features.0": (4, 8), "features.3": (2, 4), "features.7": (8, 2), "classifier": (4, 4)}
    keep = {"features.0": 0.5, "features.3": 0.75, "features.7": 0.25}
    predicted = assignment_cost(costs, Assignment(bits=bits, keep=keep))
    prune_structured(model, keep={**keep}, example_input=torch.zeros(1, 1, 8, 8))
    report = measure_cost(model, input_shape=(1, 8, 8), layers={n: LayerQuant(w_bits=w, a_bits=a) for n, (w, a) in bits.items()}, input_bits=8)
    assert predicted == pytest.approx(report.total.bops, rel=1e-12)


def test_sensitivity_priors_are_inside_the_space_and_tagged() -> None:
    from autoprune.task import Task

    task = Task()
    model = task.build()
    choices = SpaceChoices(
        default=LayerChoices(w_bits=(2, 4, 8), a_bits=(4, 8), keep_ratio=(0.5, 1.0)),
        layers={"classifier": LayerChoices(w_bits=(8,), a_bits=(8,))},
    )
    priors = sensitivity_priors(model, task, space_choices=choices, budgets=4, method="fisher", batches=1)
    assert 1 <= len(priors) <= 4
    assert priors[0][1] == "prior=sensitivity:budget=0"
    assert all(tag.startswith("prior=sensitivity:budget=") for _, tag in priors)
    assert len({p.to_json() for p, _ in priors}) == len(priors)
    for policy, _ in priors:
        assert policy.layers["classifier"].w_bits == 8 and policy.layers["classifier"].keep_ratio == 1.0
        for layer in policy.layers.values():
            assert layer.w_bits in (2, 4, 8) and layer.a_bits in (4, 8) and layer.keep_ratio in (0.5, 1.0)
    (task.cache_dir() / "sensitivity.json").unlink()
