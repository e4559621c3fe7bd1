"""Multi-fidelity trials for several objectives: a short fine-tune first, the full one only for a candidate
that could still reach the front.

A trial fine-tunes its policy for ``fraction`` x ``finetune_steps`` steps (the low fidelity). It is promoted
to the full fine-tune (from the base model again: the cosine schedule of a full run is not the first part
of a short run's) when the full-fidelity values its low-fidelity ones predict, moved by a margin toward
better, are dominated by no full-fidelity trial of the front. Per objective, in loss form (maximised
metrics negated, lower is better), over the (x_i, y_i) = (short-run, full-run) losses of the promoted trials:

    prediction     y(x) = a + b x                      least squares: b = Sxy / Sxx (0 when the x_i are equal)
    disagreement   r_i = y_{-i}(x_i) - y_i             y_{-i}: the line fitted without pair i
    margin         m = quantile_q(r_1 .. r_n)
    promoted  <=>  no full-fidelity point p with p dominating (y(x) - m, per objective)

Why a line and not |low - high|: a short fine-tune scores lower by an amount that depends on the policy
(on digits, 12 of 50 steps cost a wide 8-bit policy nothing and a 2-bit quarter-width one 24 points). The old
margin, the 0.9 quantile of |low - high|, measured that shift and not how the short run ranks candidates, so
it was larger than the whole front's accuracy range and promoted nearly every candidate. The line takes out
the shift and its dependence on the value; what remains, r_i, is the disagreement the short run's ranking
really has. High is regressed on low, not the reverse, because the pairs are selected on their low values
(only promoted trials have a full run), which does not bias a regression on low; and it is compared with
the front's full-fidelity values, so the front may hold trials that never ran short (a resumed study that
had no multi-fidelity). The r_i are leave-one-out residuals: in-sample residuals of a two-parameter fit to
a few pairs understate the error a new candidate meets, while a left-out pair is one: the margin starts
wide (with 3 pairs each r_i extrapolates from 2) and narrows as pairs accumulate, with no special case.
Until ``min_pairs`` trials were promoted the margin is infinite (every candidate is promoted). A cost
objective does not depend on fine-tuning: its pairs lie on y = x, so b = 1, a = 0 and every r_i = 0 (as
soon as the short-run values are not all equal), without a special case.

Why a quarter of the steps (``fraction`` 0.25): on digits at 50 steps, the margin learned over the same 45
policies was 1.4 points of accuracy whether the short run had 12, 20 or 25 steps (slope 0.27 to 0.42), so a
longer short run ranks no better and costs more; a shorter one saves little, because a short run also pays
what does not shrink with the steps (compression, calibration, scoring, the study's writes): a candidate
that stopped at 12 steps took 30 to 70% of the wall time of a whole 50-step trial (the more, the less loaded
the machine).

A candidate that is not promoted is told to Optuna as PRUNED, its low-fidelity metrics recorded with
``fidelity = fraction``. Why PRUNED and not COMPLETE with its low-fidelity values: every reader of COMPLETE
trials (the front snapshot, hypervolume, report, export, Optuna's ``best_trials``) stays full-fidelity with
no filter to forget, and TPE puts pruned trials in its worse group, which is what they are (no chance to
reach the front). A promoted trial is COMPLETE with its full-fidelity values and keeps its low-fidelity
metrics (``low_metrics``), which is where the line and the margin are learned.

The budget counts compute: fine-tune steps, ``steps`` recorded per trial (low + full when promoted). A study
with multi-fidelity stops when its trials have spent ``budget_steps`` (default: the trial budget converted,
``trials x finetune_steps``, so that --trials means the same compute with and without it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from autoprune.search.front import dominates, losses

if TYPE_CHECKING:
    import optuna

    from autoprune.policy import Policy
    from autoprune.search.record import TrialRecord


class FidelitySpec(BaseModel):
    """How a study runs multi-fidelity trials (kept in the study's metadata, so workers run the same)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    fraction: float = Field(0.25, gt=0.0, lt=1.0, description="share of finetune_steps of the low fidelity")
    budget_steps: int | None = Field(None, ge=1, description="fine-tune steps the study may spend; None: trials x finetune_steps")
    quantile: float = Field(0.9, gt=0.0, le=1.0, description="quantile of the leave-one-out disagreements taken as the margin")
    # a line and a pair left out of it: fewer than 3 pairs leave nothing to learn the disagreement from
    min_pairs: int = Field(3, ge=3, description="promoted trials before the margin is finite")


class Agreement(BaseModel):
    """What the promoted trials say of one objective, in loss form: a full run's loss is predicted as
    ``intercept + slope x`` the short run's, and comes out up to ``margin`` lower (at the quantile)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    intercept: float = 0.0
    slope: float = 1.0
    margin: float = math.inf

    def optimistic(self, low_loss: float) -> float:
        """The best full-fidelity loss still plausible for this short-run loss."""
        return self.intercept + self.slope * low_loss - self.margin


def low_fidelity(policy: "Policy", fraction: float) -> "Policy":
    """The policy with its fine-tune shortened to ``fraction`` (at least one step when it had any)."""
    steps = policy.finetune_steps
    short = max(1, round(fraction * steps)) if steps > 0 else 0
    return policy.model_copy(update={"finetune_steps": short})


def agreement(pairs: Sequence[tuple[float, float]], *, direction: str, quantile: float, min_pairs: int) -> Agreement:
    """The line and margin of one objective from its (low, high) value pairs; an infinite margin with fewer
    than ``min_pairs`` pairs."""
    if len(pairs) < min_pairs:
        return Agreement()
    x, y = (np.array(losses(column, [direction] * len(pairs))) for column in zip(*pairs))
    intercept, slope = _line(x, y)
    kept = ~np.eye(len(x), dtype=bool)
    left_out = np.array([_predict(x[keep], y[keep], x[i]) for i, keep in enumerate(kept)])
    return Agreement(intercept=intercept, slope=slope, margin=float(np.quantile(left_out - y, quantile)))


def could_reach_front(
    low: Sequence[float], front: Sequence[Sequence[float]], *, directions: Sequence[str], agreements: Sequence[Agreement]
) -> bool:
    """Whether the full-fidelity values predicted from the low-fidelity ones, moved by each margin toward
    better, are dominated by no front point."""
    optimistic = np.array([a.optimistic(v) for a, v in zip(agreements, losses(low, directions))])
    return not any(dominates(np.array(losses(point, directions)), optimistic) for point in front)


def promote(
    study: "optuna.Study", low_metrics: Mapping[str, float], *, metrics: Sequence[str], directions: Sequence[str], spec: FidelitySpec,
    low_of: Callable[["TrialRecord"], Mapping[str, float] | None] = lambda record: record.low_metrics,
) -> bool:
    """Whether a candidate with these low-fidelity metrics gets the full fine-tune: one read of the
    study's full-fidelity trials gives both the pairs (each one's ``low_of`` its record beside its metrics)
    and the front."""
    from autoprune.search.record import read_trial

    complete = [(t, read_trial(t)) for t in _complete(study)]
    paired = [(low, r.metrics) for _, r in complete if (low := low_of(r)) and r.metrics]
    agreements = [
        agreement([(low[m], high[m]) for low, high in paired], direction=d, quantile=spec.quantile, min_pairs=spec.min_pairs)
        for m, d in zip(metrics, directions)
    ]
    # dominated trials cannot change the answer, infeasible ones are on no front
    front = [t.values for t, r in complete if t.values is not None and r.feasible]
    return could_reach_front([float(low_metrics[m]) for m in metrics], front, directions=directions, agreements=agreements)


def steps_spent(study: "optuna.Study") -> int:
    """Fine-tune steps spent by the study's finished and running trials."""
    from autoprune.search.record import read_trial

    return sum(read_trial(t).steps for t in study.get_trials(deepcopy=False))


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares intercept and slope of y on x; slope 0 when x does not vary (y's mean then predicts)."""
    dx = x - x.mean()
    sxx = float(dx @ dx)
    slope = float(dx @ (y - y.mean())) / sxx if sxx > 0 else 0.0
    return float(y.mean()) - slope * float(x.mean()), slope


def _predict(x: np.ndarray, y: np.ndarray, at: float) -> float:
    intercept, slope = _line(x, y)
    return intercept + slope * at


def _complete(study: "optuna.Study") -> list["optuna.trial.FrozenTrial"]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


__all__ = ["FidelitySpec", "Agreement", "low_fidelity", "agreement", "could_reach_front", "promote", "steps_spent"]
