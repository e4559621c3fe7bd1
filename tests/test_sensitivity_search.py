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
from autoprune.search.runner import SearchConfig, prepare, record_base, run_trials
from autoprune.search.space import SpaceSpec

SPACE = {
    "layers": {"_default": {"w_bits": {"choices": [2, 4, 8]}, "a_bits": 8, "keep_ratio": {"choices": [0.5, 1.0]}}},
    "policy": {"finetune_steps": 8},
}


def _ctx(tmp_path: Path, **config):  # noqa: ANN202
    cfg = SearchConfig(storage=f"sqlite:///{tmp_path / 'study.db'}", progress=False, priors=False, **config)
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


def test_margin_is_infinite_until_enough_pairs_then_the_quantile_of_the_disagreement() -> None:
    assert fidelity.margin([(90.0, 92.0), (80.0, 81.0)], quantile=0.9, min_pairs=3) == math.inf
    pairs = [(90.0, 92.0), (80.0, 81.0), (70.0, 74.0), (60.0, 60.0), (50.0, 53.0)]
    # |low - high| = 2, 1, 4, 0, 3 -> sorted 0 1 2 3 4; numpy's linear quantile: 0.5 -> 2, 0.9 -> 3.6
    assert fidelity.margin(pairs, quantile=0.5, min_pairs=3) == pytest.approx(2.0)
    assert fidelity.margin(pairs, quantile=0.9, min_pairs=3) == pytest.approx(3.6)


def test_could_reach_front_moves_each_objective_by_its_margin_toward_better() -> None:
    directions = ["maximize", "minimize"]
    front = [[95.0, 10.0], [90.0, 5.0]]
    # 89 % at 6 BOPs is dominated by (90, 5): out with no margin, in with 1.5 points of accuracy margin
    assert not fidelity.could_reach_front([89.0, 6.0], front, directions=directions, margins=[0.0, 0.0])
    assert fidelity.could_reach_front([89.0, 6.0], front, directions=directions, margins=[1.5, 0.0])
    assert fidelity.could_reach_front([89.0, 6.0], front, directions=directions, margins=[0.0, 1.5])
    assert fidelity.could_reach_front([1.0, 1e9], [], directions=directions, margins=[0.0, 0.0])


# --- multi-fidelity: the lifecycle with a stub evaluator -----------------------------------------


class StubEvaluator:
    """Accuracy grows with fine-tune steps and weight bits (low fidelity: 10 points below the full one), BOPs
    with bits: a front that is known in closed form."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def evaluate(self, policy):  # noqa: ANN001, ANN201
        bits = sum(layer.w_bits for layer in policy.layers.values())
        steps = policy.finetune_steps
        self.calls.append((bits, steps))
        accuracy = 50.0 + bits - (10.0 if steps < 8 else 0.0)
        return {"accuracy": accuracy, "bops": float(bits) ** 2, "trial_seconds": 0.0}, {}


def test_low_fidelity_trials_never_enter_the_front_promoted_ones_are_full_and_the_step_budget_holds(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, trials=6, fidelity=0.25, sampler="random")
    ctx.evaluator = StubEvaluator()
    spec = read_meta(ctx.study).fidelity
    assert spec == {"fraction": 0.25, "budget_steps": 48, "quantile": 0.9, "min_pairs": 3}  # 6 trials x 8 steps

    run_trials(ctx, deadline=None)

    trials = ctx.study.get_trials(deepcopy=False)
    records = {t.number: read_trial(t) for t in trials}
    low_only = [t for t in trials if t.state == TrialState.PRUNED]
    promoted = [t for t in trials if t.state == TrialState.COMPLETE]
    assert low_only and promoted  # the margin became finite and pruned some candidates
    assert len(trials) > 6  # the compute of 6 full trials bought more candidates
    for t in low_only:
        assert records[t.number].fidelity == 0.25 and records[t.number].steps == 2 and records[t.number].metrics
    for t in promoted:
        record = records[t.number]
        assert record.fidelity == 1.0 and record.steps == 2 + 8
        assert record.low_metrics["accuracy"] == pytest.approx(record.metrics["accuracy"] - 10.0)
        assert t.values[0] == record.metrics["accuracy"]  # told the full-fidelity value
    # the first min_pairs trials are promoted whatever they score (infinite margin)
    assert [t.state for t in sorted(trials, key=lambda t: t.number)[:3]] == [TrialState.COMPLETE] * 3
    # every evaluation at full steps belongs to a promoted trial
    assert sum(steps == 8 for _, steps in ctx.evaluator.calls) == len(promoted)
    # compute budget: the steps spent never exceed it
    assert fidelity.steps_spent(ctx.study) <= 48
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
    assert SearchConfig(priors=("sensitivity",), fidelity=0.25).priors == ("sensitivity",)
    for bad in ({"fidelity": 1.0}, {"fidelity": 0.25, "executor": "ray"}, {"budget_steps": 0}, {"priors": ("sensitivty",)}):
        with pytest.raises(AutopruneError):
            SearchConfig(**bad)
