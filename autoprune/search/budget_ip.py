"""The policy of least predicted loss for each of K cost budgets: one mixed-integer program per budget.

Pure: it reads a ``SensitivityTable`` (autoprune.sensitivity) and a ``CostModel`` (numbers per layer), never
a model. Every layer l picks one pair (w_bits, a_bits) of its allowed choices, every channel group g one keep
ratio r_g. With the sensitivities additive (HAWQ-V3's integer program):

    loss(assignment) = sum_l [dL_w(l, w_l) + dL_a(l, a_l)] + sum_g dL_keep(g, r_g)
    cost(assignment) = sum_l MACs_l(w_l) x f_out(l) x f_in(l) x w_l x a_l              (metric "bops")
                       sum_l MACs_l(w_l) x f_out(l) x f_in(l)                          (metric "macs")

MACs_l(w) is ``measure_cost``'s count at full width with every layer at w weight bits (nonzero mid-rise levels:
a filter below delta/2 vanishes at low bits), so the cost is exact for the bits choices at full width (DJPQ
eq. 15-16). Width enters as f = keep_count(r, C) / C of the group producing the layer's outputs (f_out) and of
the group producing its inputs (f_in), 1 for a layer outside any group: exact for dense convs and linears, whose
MACs are out x in x k_h x k_w x H x W; a depthwise conv is in its input's group, so its one factor counts once.
A layer reading the network input counts ``input_bits`` for a_l and has no activation sensitivity.

The product f_out x f_in x (bits term) makes the cost non-linear; it is linearised *exactly*. With binaries
x_{l,p} (pair p of layer l) and y_{g,r}, a layer touching the groups D_l has, for each pair p and each
combination k of their keep ratios, a variable z_{l,p,k} in [0, 1] (p chosen and the groups at k), tied by

    sum_k z_{l,p,k} = x_{l,p}  for every p,      sum_{p, k: k_g = r} z_{l,p,k} = y_{g,r}  for every g in D_l, r

For binary x and y these force z to 1 on the chosen (p, k) and 0 elsewhere (a joint distribution whose
marginals are unit vectors), so the budget row sum_l [sum_p c_{l,p} x_{l,p} if D_l is empty, else
sum_{p,k} c_{l,p} f(k) z_{l,p,k}] <= B is exactly the non-linear cost. Its LP relaxation is far tighter than
a big-M (McCormick) row per combination: on MNIST-1D's default space HiGHS closes each budget in 1-5 nodes,
where big-M rows took up to 1,600 (0.1-0.2 s per budget against 0.3-2.6 s).

Only undominated choices enter the program: a pair whose full-width cost and loss are both no less than
another pair's of the same layer is never needed (width scales every pair of a layer alike), nor a keep ratio
that keeps no fewer channels and loses no less than another of its group. On the default space that leaves
4-12 of a layer's 49 pairs. It is solved by scipy's ``milp`` (HiGHS) with a zero optimality gap, costs divided
by the most expensive assignment's and losses by the largest one so that the tolerances are relative. A solve
that reaches ``time_limit`` returns the best assignment found by then, or None when it found none (the budget
is then left out of ``solve_budgets``).

Predicted losses often tie (a measured increase of 0 at several bit-widths); after the solve, any choice that
can grow without raising the loss or leaving the budget grows (``spend_slack``), so ties go to the safer choice.

``solve_budgets`` spreads K budgets log-uniformly between the cheapest assignment (every least choice) and
the most expensive one (every largest), which are the cost range because cost grows with every choice.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from autoprune.errors import AutopruneError
from autoprune.policy import FLOAT_BITS, LayerPolicy, Policy
from autoprune.prune.structured import keep_count
from autoprune.sensitivity import SensitivityTable

METRICS = ("bops", "macs")
Metric = Literal["bops", "macs"]
# A budget equal to an assignment's cost must admit it despite float rounding, in the solver and in checks.
BUDGET_TOLERANCE = 1e-9
# Seconds per budget: MNIST-1D's and digits' default spaces solve to optimality in 0.1-0.3 s each (one thread,
# a loaded machine); the limit bounds the first search of a larger model, which then starts from incumbents.
TIME_LIMIT = 5.0


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayerChoices(_Frozen):
    """What a search space allows one layer; ``keep_ratio`` applies when the layer names a channel group."""

    w_bits: tuple[int, ...] = Field(min_length=1)
    a_bits: tuple[int, ...] = Field(min_length=1)
    keep_ratio: tuple[float, ...] = Field((1.0,), min_length=1)

    @model_validator(mode="after")
    def _valid(self) -> "LayerChoices":
        for bits in (*self.w_bits, *self.a_bits):
            if not 1 <= bits <= FLOAT_BITS:
                raise ValueError(f"bits {bits} are not in 1..{FLOAT_BITS}")
        for ratio in self.keep_ratio:
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"keep ratio {ratio} is not in (0, 1]")
        return self


class SpaceChoices(_Frozen):
    """Allowed choices per layer name (a pinned layer: one value each), ``default`` for the others."""

    default: LayerChoices
    layers: dict[str, LayerChoices] = Field(default_factory=dict)

    def for_layer(self, name: str) -> LayerChoices:
        return self.layers.get(name, self.default)

    @classmethod
    def of(
        cls, *, w_bits: Sequence[int], a_bits: Sequence[int], keep_ratio: Sequence[float] = (1.0,), pinned: Sequence[str] = ()
    ) -> "SpaceChoices":
        """The same choices for every layer, except ``pinned`` layers: float and full width (a space's ``pin``)."""
        float_layer = LayerChoices(w_bits=(FLOAT_BITS,), a_bits=(FLOAT_BITS,), keep_ratio=(1.0,))
        return cls(
            default=LayerChoices(w_bits=tuple(w_bits), a_bits=tuple(a_bits), keep_ratio=tuple(keep_ratio)),
            layers={name: float_layer for name in pinned},
        )


class LayerCostModel(_Frozen):
    macs: dict[int, float] = Field(description="MACs at full width with the weights at each w_bits")
    out_group: str | None = None
    in_group: str | None = None
    reads_input: bool = False


class CostModel(_Frozen):
    metric: Metric = "bops"
    input_bits: int = Field(8, ge=1, le=FLOAT_BITS)
    layers: dict[str, LayerCostModel]
    groups: dict[str, int] = Field(default_factory=dict, description="channels of each group")

    @model_validator(mode="after")
    def _known_groups(self) -> "CostModel":
        for name, layer in self.layers.items():
            for group in (layer.out_group, layer.in_group):
                if group is not None and group not in self.groups:
                    raise ValueError(f"layer {name} names group {group}, which is not in groups")
        return self


class Assignment(_Frozen):
    bits: dict[str, tuple[int, int]] = Field(description="layer -> (w_bits, a_bits)")
    keep: dict[str, float] = Field(default_factory=dict, description="group -> keep ratio")


class BudgetSolution(_Frozen):
    budget: float
    cost: float
    loss: float
    assignment: Assignment
    policy: Policy


def keep_fraction(ratio: float, channels: int) -> float:
    return keep_count(ratio, channels) / channels


def full_width_cost(costs: CostModel, name: str, w_bits: int, a_bits: int) -> float:
    layer = costs.layers[name]
    if w_bits not in layer.macs:
        raise AutopruneError(f"cost model: layers.{name}.macs", w_bits, f"are not measured (measured: {sorted(layer.macs)})")
    if costs.metric == "macs":
        return layer.macs[w_bits]
    return layer.macs[w_bits] * w_bits * (costs.input_bits if layer.reads_input else a_bits)


def width_groups(costs: CostModel, name: str) -> tuple[str, ...]:
    """The distinct groups whose keep ratio scales the layer's MACs (out first)."""
    layer = costs.layers[name]
    return tuple(dict.fromkeys(g for g in (layer.out_group, layer.in_group) if g is not None))


def width_factor(costs: CostModel, name: str, keep: Mapping[str, float]) -> float:
    return math.prod(keep_fraction(keep.get(g, 1.0), costs.groups[g]) for g in width_groups(costs, name))


def assignment_cost(costs: CostModel, assignment: Assignment) -> float:
    return math.fsum(
        full_width_cost(costs, name, w, a) * width_factor(costs, name, assignment.keep)
        for name, (w, a) in assignment.bits.items()
    )


def _sensitivity(kind: str, name: str, value: float, measured: Mapping) -> float:
    # Float bits and full width perturb nothing.
    if value >= (1.0 if kind == "keep" else FLOAT_BITS):
        return 0.0
    if value not in measured:
        raise AutopruneError(f"sensitivity table: {name}.{kind}", value, f"was not measured (measured: {sorted(measured)})")
    return measured[value]


def assignment_loss(table: SensitivityTable, assignment: Assignment) -> float:
    total = []
    for name, (w, a) in assignment.bits.items():
        layer = table.layers[name]
        total.append(_sensitivity("w_bits", name, w, layer.w_bits))
        if not layer.reads_input:
            total.append(_sensitivity("a_bits", name, a, layer.a_bits))
    for group, ratio in assignment.keep.items():
        total.append(_sensitivity("keep", group, ratio, table.groups[group].keep))
    return math.fsum(total)


class _Problem:
    """The choices of one (table, costs, space) triple, shared by every budget."""

    def __init__(self, table: SensitivityTable, costs: CostModel, choices: SpaceChoices) -> None:
        self.table, self.costs = table, costs
        missing = [name for name in costs.layers if name not in table.layers]
        if missing:
            raise AutopruneError("sensitivity table", missing, "has no entry for these layers of the cost model")
        self.layers = list(costs.layers)
        self.pairs: dict[str, list[tuple[int, int]]] = {}
        for name in self.layers:
            allowed = choices.for_layer(name)
            # The a_bits of a layer reading the network input is not used (input_bits is): one pair per w_bits.
            a_options = (max(allowed.a_bits),) if costs.layers[name].reads_input else allowed.a_bits
            self.pairs[name] = [(w, a) for w in sorted(set(allowed.w_bits)) for a in sorted(set(a_options))]
        self.groups = list(costs.groups)
        unmeasured = [g for g in self.groups if g not in table.groups]
        if unmeasured:
            raise AutopruneError("sensitivity table", unmeasured, "has no entry for these channel groups of the cost model")
        self.keeps = {g: sorted(set(choices.for_layer(g).keep_ratio)) for g in self.groups}
        # What the program chooses from: a choice costing no less than another of the same layer (group) at every
        # width and losing no less is never needed, and dropping it shrinks the program several-fold.
        self.candidates = {name: _undominated(self.pairs[name], lambda p, n=name: (full_width_cost(costs, n, *p), self.pair_loss(n, p))) for name in self.layers}
        self.keep_candidates = {
            g: _undominated(self.keeps[g], lambda r, g=g: (keep_count(r, costs.groups[g]), _sensitivity("keep", g, r, table.groups[g].keep)))
            for g in self.groups
        }

    def pair_loss(self, name: str, pair: tuple[int, int]) -> float:
        layer = self.table.layers[name]
        loss = _sensitivity("w_bits", name, pair[0], layer.w_bits)
        return loss if layer.reads_input else loss + _sensitivity("a_bits", name, pair[1], layer.a_bits)

    def least(self) -> Assignment:
        return Assignment(bits={n: min(p) for n, p in self.pairs.items()}, keep={g: k[0] for g, k in self.keeps.items()})

    def most(self) -> Assignment:
        return Assignment(bits={n: max(p) for n, p in self.pairs.items()}, keep={g: k[-1] for g, k in self.keeps.items()})

    def solve(self, budget: float, *, time_limit: float) -> Assignment | None:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_array

        scale = assignment_cost(self.costs, self.most()) or 1.0
        index: dict[tuple, int] = {}
        objective: list[float] = []
        integral: list[int] = []

        def add(key: tuple, loss: float, binary: bool) -> int:
            index[key] = len(objective)
            objective.append(loss)
            integral.append(1 if binary else 0)
            return index[key]

        for name in self.layers:
            for p in self.candidates[name]:
                add(("x", name, *p), self.pair_loss(name, p), True)
        for g in self.groups:
            for r in self.keep_candidates[g]:
                add(("y", g, r), _sensitivity("keep", g, r, self.table.groups[g].keep), True)
        rows: list[dict[int, float]] = []
        lows: list[float] = []
        highs: list[float] = []
        budget_row: dict[int, float] = {}
        for name in self.layers:
            cost = {p: full_width_cost(self.costs, name, *p) / scale for p in self.candidates[name]}
            rows.append({index[("x", name, *p)]: 1.0 for p in self.candidates[name]})
            lows.append(1.0)
            highs.append(1.0)
            touched = width_groups(self.costs, name)
            if not touched:
                for p, c in cost.items():
                    budget_row[index[("x", name, *p)]] = c
                continue
            combos = [dict(zip(touched, combo)) for combo in itertools.product(*(self.keep_candidates[g] for g in touched))]
            marginals: dict[tuple[str, float], dict[int, float]] = {(g, r): {index[("y", g, r)]: -1.0} for g in touched for r in self.keep_candidates[g]}
            for p, c in cost.items():
                link = {index[("x", name, *p)]: -1.0}
                for keep in combos:
                    z = add(("z", name, p, tuple(keep.values())), 0.0, False)
                    budget_row[z] = c * width_factor(self.costs, name, keep)
                    link[z] = 1.0
                    for g, r in keep.items():
                        marginals[(g, r)][z] = 1.0
                rows.append(link)
                lows.append(0.0)
                highs.append(0.0)
            for row in marginals.values():
                rows.append(row)
                lows.append(0.0)
                highs.append(0.0)
        for g in self.groups:
            rows.append({index[("y", g, r)]: 1.0 for r in self.keep_candidates[g]})
            lows.append(1.0)
            highs.append(1.0)
        rows.append(budget_row)
        lows.append(-np.inf)
        highs.append(budget / scale * (1 + BUDGET_TOLERANCE))
        entries = [(i, j, value) for i, row in enumerate(rows) for j, value in row.items()]
        row_index, column_index, values = (np.asarray(part) for part in zip(*entries))
        matrix = coo_array((values, (row_index, column_index)), shape=(len(rows), len(objective)))
        # HiGHS's absolute tolerances would see the loss of a confident model (1e-16 per layer is common) as 0.
        loss_scale = max(objective) or 1.0
        result = milp(
            c=np.asarray(objective) / loss_scale, integrality=np.asarray(integral),
            bounds=Bounds(0.0, 1.0),
            constraints=LinearConstraint(matrix, np.asarray(lows), np.asarray(highs)),
            options={"mip_rel_gap": 0.0, "time_limit": time_limit},
        )
        if result.x is None:
            return None
        chosen = [key for key, i in index.items() if key[0] != "z" and result.x[i] > 0.5]
        return Assignment(
            bits={key[1]: (key[2], key[3]) for key in chosen if key[0] == "x"},
            keep={key[1]: key[2] for key in chosen if key[0] == "y"},
        )

    def spend_slack(self, assignment: Assignment, budget: float) -> Assignment:
        """Raise choices whose loss does not grow while the budget allows: predicted losses tie (a measured 0 at
        several bit-widths), and among equals the solver's pick is arbitrary where the wider, finer one is safer."""
        limit = budget * (1 + BUDGET_TOLERANCE)
        improved = True
        while improved:
            improved = False
            for name in self.layers:
                layer = self.table.layers[name]
                loss = lambda p: _sensitivity("w_bits", name, p[0], layer.w_bits) + (  # noqa: E731
                    0.0 if layer.reads_input else _sensitivity("a_bits", name, p[1], layer.a_bits))
                current = assignment.bits[name]
                for pair in sorted(self.pairs[name], reverse=True):
                    if pair <= current or loss(pair) > loss(current):
                        continue
                    trial = assignment.model_copy(update={"bits": {**assignment.bits, name: pair}})
                    if assignment_cost(self.costs, trial) <= limit:
                        assignment, improved = trial, True
                        break
            for g in self.groups:
                measured = self.table.groups[g].keep
                current_keep = assignment.keep[g]
                for ratio in reversed(self.keeps[g]):
                    if ratio <= current_keep or _sensitivity("keep", g, ratio, measured) > _sensitivity("keep", g, current_keep, measured):
                        continue
                    trial = assignment.model_copy(update={"keep": {**assignment.keep, g: ratio}})
                    if assignment_cost(self.costs, trial) <= limit:
                        assignment, improved = trial, True
                        break
        return assignment

    def solution(self, budget: float, *, template: Policy | None, time_limit: float) -> BudgetSolution | None:
        assignment = self.solve(budget, time_limit=time_limit)
        if assignment is None:
            return None
        assignment = self.spend_slack(assignment, budget)
        return BudgetSolution(
            budget=budget, cost=assignment_cost(self.costs, assignment), loss=assignment_loss(self.table, assignment),
            assignment=assignment, policy=_policy(self.costs, assignment, template),
        )


def _undominated(choices: Sequence[Any], measure: Callable[[Any], tuple[float, float]]) -> list[Any]:
    """The choices that no other is at least as cheap and as good as, by ``measure`` -> (cost, loss); of equals,
    the first."""
    kept, least = [], math.inf
    for choice in sorted(choices, key=measure):
        loss = measure(choice)[1]
        if loss < least:
            kept.append(choice)
            least = loss
    return kept


def _policy(costs: CostModel, assignment: Assignment, template: Policy | None) -> Policy:
    layers = {}
    for name, (w, a) in assignment.bits.items():
        group = costs.layers[name].out_group
        ratio = assignment.keep.get(group, 1.0) if group is not None else 1.0
        layers[name] = LayerPolicy(keep_ratio=ratio, w_bits=w, a_bits=a)
    return (template or Policy()).model_copy(update={"layers": layers})


def cost_range(table: SensitivityTable, costs: CostModel, *, choices: SpaceChoices) -> tuple[float, float]:
    """The cheapest and the most expensive assignment's cost."""
    problem = _Problem(table, costs, choices)
    return assignment_cost(costs, problem.least()), assignment_cost(costs, problem.most())


def solve(
    table: SensitivityTable, costs: CostModel, *, choices: SpaceChoices, budget: float, template: Policy | None = None,
    time_limit: float = TIME_LIMIT,
) -> BudgetSolution | None:
    """The least-loss assignment of cost <= ``budget`` (None when no assignment is that cheap)."""
    return _Problem(table, costs, choices).solution(budget, template=template, time_limit=time_limit)


def budget_grid(low: float, high: float, count: int) -> list[float]:
    """``count`` budgets log-spaced from ``low`` to ``high``, both included (one budget: ``high``)."""
    if count < 1:
        raise AutopruneError("budgets", count, "must be at least 1")
    if count == 1 or high <= low or low <= 0:
        return [high]
    return [float(b) for b in np.geomspace(low, high, count)]


def solve_budgets(
    table: SensitivityTable, costs: CostModel, *, choices: SpaceChoices, budgets: int = 8, template: Policy | None = None,
    time_limit: float = TIME_LIMIT,
) -> list[BudgetSolution]:
    """One least-loss solution per budget of ``budget_grid`` over the cost range, cheapest budget first."""
    problem = _Problem(table, costs, choices)
    low, high = assignment_cost(costs, problem.least()), assignment_cost(costs, problem.most())
    solutions = (problem.solution(b, template=template, time_limit=time_limit) for b in budget_grid(low, high, budgets))
    return [s for s in solutions if s is not None]


__all__ = [
    "Assignment", "BudgetSolution", "CostModel", "LayerChoices", "LayerCostModel", "SpaceChoices", "assignment_cost",
    "assignment_loss", "budget_grid", "cost_range", "solve", "solve_budgets", "keep_fraction",
]
