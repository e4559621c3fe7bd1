"""Issue 16 wired into the search: sensitivity priors enqueued into a real study, multi-fidelity trials."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoprune.search import fidelity
from autoprune.search.front import Front
from autoprune.search.pareto import front_trials
from autoprune.search.record import read_meta, read_trial
from autoprune.search.loop import run_trials
from autoprune.api import search_config
from autoprune.search.study import prepare, record_base
from autoprune.search.space import SpaceSpec

SPACE = {
    "layers": {"_default": {"w_bits": {"choices": [2, 4, 8]}, "a_bits": 8, "keep_ratio": {"choices": [0.5, 1.0]}}},
    "policy": {"finetune_steps": 8},
}


def _ctx(tmp_path: Path, **config):  # noqa: ANN202
    cfg = search_config(storage=f"sqlite:///{tmp_path / 'study.db'}", progress=False, priors=False, **config)
    return prepare(cfg, space=SpaceSpec.from_dict(SPACE))


# --- sensitivity priors --------------------------------------------------------------------------


def test_sensitivity_kind_enqueues_the_budget_policies_with_their_tags_into_a_real_study(tmp_path: Path) -> None:
    from autoprune.search.priors import enqueue_priors, sensitivity_policies

    ctx = _ctx(tmp_path, trials=8)  # room for every budget's policy (a smaller budget gets them spread)
    evaluator = ctx.ensure_evaluator(progress=False)
    record_base(ctx, evaluator)
    expected = sensitivity_policies(ctx, evaluator, budgets=8)
    assert len(expected) >= 2  # the budgets span more than one policy on digits

    enqueued = enqueue_priors(ctx, evaluator, kinds=("sensitivity",))
    waiting = ctx.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(enqueued) == len(waiting) == len(expected)
    tags = [read_trial(t).prior for t in waiting]
    assert tags == [tag.removeprefix("prior=") for _, tag in expected]
    assert all(t.startswith("sensitivity:budget=") for t in tags) and tags[0] == "sensitivity:budget=0"
    dims = ctx.space.dimensions()
    points = [t.system_attrs["fixed_params"] for t in waiting]  # what Optuna will hand each enqueued trial
    for trial, params, (policy, _) in zip(waiting, points, expected):
        assert read_trial(trial).strategy == "prior"
        assert set(params) == set(dims)
        for name, value in params.items():
            assert value in dims[name].values()  # clipped into the bound space
        assert params == ctx.space.params_for(policy)
    # cheapest first: the cheapest budget's policy has the fewest weight bits of all
    bits = [sum(v for n, v in p.items() if n.endswith("w_bits")) for p in points]
    assert bits[0] == min(bits) and bits[0] < max(bits)


# --- multi-fidelity: the margin rule -------------------------------------------------------------


def test_a_systematic_shift_is_no_disagreement_the_margin_is_zero_and_the_front_decides_to_the_point() -> None:
    """Issue 16 point 3: short runs scoring 10 points lower than full ones, always, used to give a 10-point
    margin (|low - high|) that promoted everything; the line takes the shift out and leaves no disagreement."""
    pairs = [(80.0, 90.0), (85.0, 95.0), (90.0, 100.0), (75.0, 85.0)]
    accuracy = fidelity.agreement(pairs, direction="maximize", quantile=0.9, min_pairs=3)
    # losses: y = x - 10 exactly -> intercept -10, slope 1, every left-out residual 0
    assert (accuracy.intercept, accuracy.slope, accuracy.margin) == (-10.0, 1.0, 0.0)
    bops = fidelity.agreement([(4.0, 4.0), (9.0, 9.0), (1.0, 1.0)], direction="minimize", quantile=0.9, min_pairs=3)
    assert (bops.intercept, bops.slope, bops.margin) == (0.0, 1.0, 0.0)  # cost: no fine-tune, no margin
    front = [[95.0, 5.0]]  # its short run scored 85
    directions = ["maximize", "minimize"]
    agreements = [accuracy, bops]
    assert not fidelity.could_reach_front([84.0, 5.0], front, directions=directions, agreements=agreements)  # predicts 94
    assert fidelity.could_reach_front([86.0, 5.0], front, directions=directions, agreements=agreements)  # predicts 96
    assert fidelity.could_reach_front([84.0, 4.0], front, directions=directions, agreements=agreements)  # cheaper
    assert not fidelity.could_reach_front([84.0, 5.5], front, directions=directions, agreements=agreements)


def test_a_gap_that_grows_as_accuracy_falls_is_learned_as_a_line_not_a_margin() -> None:
    """What digits measured: 12 of 50 steps cost a good policy 0 points and a poor one 24 (high = 70 + 0.3 low)."""
    pairs = [(60.0, 88.0), (80.0, 94.0), (90.0, 97.0), (100.0, 100.0)]
    learned = fidelity.agreement(pairs, direction="maximize", quantile=0.9, min_pairs=3)
    assert learned.slope == pytest.approx(0.3) and learned.intercept == pytest.approx(-70.0)
    assert learned.margin == pytest.approx(0.0, abs=1e-9)  # the old rule: 0.9 quantile of |gap| 28, 14, 7, 0 = 23.8
    # 70 % on the short run predicts 91 %: dominated by 92 % at the same cost, not by 90 %
    assert not fidelity.could_reach_front([70.0, 5.0], [[92.0, 5.0]], directions=["maximize", "minimize"], agreements=[learned, fidelity.Agreement(margin=0.0)])
    assert fidelity.could_reach_front([70.0, 5.0], [[90.0, 5.0]], directions=["maximize", "minimize"], agreements=[learned, fidelity.Agreement(margin=0.0)])


def test_the_margin_is_the_quantile_of_left_out_residuals_and_infinite_below_min_pairs() -> None:
    # losses x = 0, -1, -2 and y = 0, -2, -2. Each pair left out of the line through the other two:
    #   (0, 0): flat line y = -2 predicts -2, r = -2 - 0 = -2;  (-1, -2): y = x predicts -1, r = -1 + 2 = 1;
    #   (-2, -2): y = 2x predicts -4, r = -4 + 2 = -2.  Sorted -2 -2 1: quantile 0.9 at index 1.8 -> -2 + 0.8 x 3
    pairs = [(0.0, 0.0), (1.0, 2.0), (2.0, 2.0)]
    learned = fidelity.agreement(pairs, direction="maximize", quantile=0.9, min_pairs=3)
    assert learned.margin == pytest.approx(0.4)
    assert learned.slope == pytest.approx(1.0) and learned.intercept == pytest.approx(-1 / 3)  # full fit: dx 1 0 -1, dy 4/3 -2/3 -2/3
    assert fidelity.agreement(pairs, direction="maximize", quantile=0.5, min_pairs=3).margin == pytest.approx(-2.0)
    too_few = fidelity.agreement(pairs[:2], direction="maximize", quantile=0.9, min_pairs=3)
    assert too_few.margin == math.inf
    assert fidelity.could_reach_front([0.0, 1e9], [[100.0, 1.0]], directions=["maximize", "minimize"], agreements=[too_few, too_few])
    assert fidelity.could_reach_front([1.0, 1e9], [], directions=["maximize", "minimize"], agreements=[learned, learned])


# --- multi-fidelity: the lifecycle with a stub evaluator -----------------------------------------


class StubEvaluator:
    """A front known in closed form: full-fidelity accuracy 60 + 8 x the keep ratios summed over layers, BOPs
    the weight bits summed, squared: bits cost and buy nothing, so a candidate is dominated by any one as wide
    with no more bits. The short run scores 2 x full - 100: lower by a gap that grows as accuracy falls, as on
    digits, and ranks exactly like the full run."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def evaluate(self, policy):  # noqa: ANN001, ANN201
        bits = sum(layer.w_bits for layer in policy.layers.values())
        steps = policy.finetune_steps
        self.calls.append((bits, steps))
        full = 60.0 + 8.0 * sum(layer.keep_ratio for layer in policy.layers.values())
        return {"accuracy": full if steps == 8 else 2.0 * full - 100.0, "bops": float(bits) ** 2, "trial_seconds": 0.0}, {}


def test_low_fidelity_trials_never_enter_the_front_promoted_ones_are_full_and_the_step_budget_holds(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, trials=16, fidelity=0.25, sampler="random")
    ctx.evaluator = StubEvaluator()
    spec = read_meta(ctx.study).fidelity
    assert spec == {"fraction": 0.25, "budget_steps": 128, "quantile": 0.9, "min_pairs": 3}  # 16 trials x 8 steps

    run_trials(ctx, deadline=None)

    trials = sorted(ctx.study.get_trials(deepcopy=False), key=lambda t: t.number)
    records = {t.number: read_trial(t) for t in trials}
    low_only = [t for t in trials if t.state == TrialState.PRUNED]
    promoted = [t for t in trials if t.state == TrialState.COMPLETE]
    assert low_only and promoted
    assert len(trials) > 16  # the compute of 16 full trials bought more candidates
    for t in low_only:
        assert records[t.number].fidelity == 0.25 and records[t.number].steps == 2 and records[t.number].metrics
    for t in promoted:
        record = records[t.number]
        assert record.fidelity == 1.0 and record.steps == 2 + 8
        assert record.low_metrics["accuracy"] == pytest.approx(2 * record.metrics["accuracy"] - 100)
        assert t.values[0] == record.metrics["accuracy"]  # told the full-fidelity value
    # the rule to the point: the first 3 are promoted whatever they score (infinite margin); then the line
    # predicts the full run exactly (margin 0), so a candidate is promoted iff the budget has room and no
    # earlier full-fidelity trial dominates its full value (the old |low - high| margin promoted them all)
    pruned_by_rule = 0
    for i, t in enumerate(trials):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue  # the last ask, skipped: its short run would overrun the budget
        before = trials[:i]
        low = records[t.number].low_metrics or records[t.number].metrics
        point = ((low["accuracy"] + 100) / 2, low["bops"])
        earlier = [tuple(p.values) for p in before if p.state == TrialState.COMPLETE]
        if point in earlier:
            continue  # an equal point: a rounding of the line decides
        room = sum(records[p.number].steps for p in before) + 2 + 8 <= 128
        dominated = any(acc >= point[0] and bops <= point[1] for acc, bops in earlier)
        expected = room and (len(earlier) < 3 or not dominated)
        assert (t.state == TrialState.COMPLETE) == expected, (t.number, point, earlier)
        pruned_by_rule += room and dominated and len(earlier) >= 3
    assert pruned_by_rule >= 3  # the rule, not the budget, pruned them (6 with this seed)
    # every evaluation at full steps belongs to a promoted trial
    assert sum(steps == 8 for _, steps in ctx.evaluator.calls) == len(promoted)
    # compute budget: the steps spent never exceed it
    assert fidelity.steps_spent(ctx.study) <= 128
    assert sum(steps for _, steps in ctx.evaluator.calls) == fidelity.steps_spent(ctx.study)
    # the fronts (Optuna's, the incremental snapshot) hold full-fidelity trials only
    numbers = {t.number for t in promoted}
    assert {t.number for t in front_trials(ctx.study)} <= numbers
    assert set(Front(ctx.study, read_meta(ctx.study)).snapshot().front) <= numbers
    assert {t.number for t in optuna.Study.best_trials.fget(ctx.study)} <= numbers  # type: ignore[attr-defined]


def test_config_accepts_the_sensitivity_kind_and_refuses_a_bad_fidelity() -> None:
    from autoprune.cli import build_parser
    from autoprune.errors import AutopruneError

    args = build_parser().parse_args(["search", "--priors", "sensitivity,snr", "--fidelity", "0.25", "--budget-steps", "600"])
    assert (args.priors, args.fidelity, args.budget_steps) == (("sensitivity", "snr"), 0.25, 600)
    assert search_config(priors=("sensitivity",), fidelity=0.25).priors == ("sensitivity",)
    for bad in ({"fidelity": 1.0}, {"fidelity": 0.25, "executor": "ray"}, {"budget_steps": 0}, {"priors": ("sensitivty",)}):
        with pytest.raises(AutopruneError):
            search_config(**bad)
