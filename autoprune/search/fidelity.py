"""Multi-fidelity trials for several objectives: a short fine-tune first, the full one only for a candidate
that could still reach the front.

A trial fine-tunes its policy for ``fraction`` x ``finetune_steps`` steps (the low fidelity). It is promoted
to the full fine-tune (from the base model again: the cosine schedule of a full run is not the first part
of a short run's) when its low-fidelity objective values, moved by the margin in each objective's favourable
direction, are dominated by no full-fidelity trial of the front:

    promoted  <=>  no full-fidelity point p with p dominating (v_low + m x sign)

The margin m of each objective is learned from the low-to-high agreement seen so far: the ``quantile`` of
|v_low - v_high| over the promoted trials. Until ``min_pairs`` trials were promoted it is infinite (every
candidate is promoted: conservative at the start, when nothing says how far the short fine-tune misleads).
Cost objectives do not depend on fine-tuning, so their margin is learned as ~0 without a special case.

A candidate that is not promoted is told to Optuna as PRUNED, its low-fidelity metrics recorded with
``fidelity = fraction``. Why PRUNED and not COMPLETE with its low-fidelity values: every reader of COMPLETE
trials (the front snapshot, hypervolume, report, export, Optuna's ``best_trials``) stays full-fidelity with
no filter to forget, and TPE puts pruned trials in its worse group, which is what they are (no chance to
reach the front). A promoted trial is COMPLETE with its full-fidelity values and keeps its low-fidelity
metrics (``low_metrics``), which is where the margin is learned.

The budget counts compute: fine-tune steps, ``steps`` recorded per trial (low + full when promoted). A study
with multi-fidelity stops when its trials have spent ``budget_steps`` (default: the trial budget converted,
``trials x finetune_steps``, so that --trials means the same compute with and without it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from autoprune.search.front import dominates, losses

if TYPE_CHECKING:
    import optuna

    from autoprune.policy import Policy


class FidelitySpec(BaseModel):
    """How a study runs multi-fidelity trials (kept in the study's metadata, so workers run the same)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    fraction: float = Field(0.25, gt=0.0, lt=1.0, description="share of finetune_steps of the low fidelity")
    budget_steps: int | None = Field(None, ge=1, description="fine-tune steps the study may spend; None: trials x finetune_steps")
    quantile: float = Field(0.9, gt=0.0, le=1.0, description="quantile of |low - high| taken as the margin")
    min_pairs: int = Field(3, ge=1, description="promoted trials before the margin is finite")


def low_fidelity(policy: "Policy", fraction: float) -> "Policy":
    """The policy with its fine-tune shortened to ``fraction`` (at least one step when it had any)."""
    steps = policy.finetune_steps
    short = max(1, round(fraction * steps)) if steps > 0 else 0
    return policy.model_copy(update={"finetune_steps": short})


def margin(pairs: Sequence[tuple[float, float]], *, quantile: float, min_pairs: int) -> float:
    """The ``quantile`` of |low - high| over (low, high) pairs; infinite with fewer than ``min_pairs``."""
    if len(pairs) < min_pairs:
        return math.inf
    return float(np.quantile([abs(low - high) for low, high in pairs], quantile))


def could_reach_front(
    low: Sequence[float], front: Sequence[Sequence[float]], *, directions: Sequence[str], margins: Sequence[float]
) -> bool:
    """Whether the low-fidelity values, moved by each margin toward better, are dominated by no front point."""
    optimistic = np.array(losses(low, directions)) - np.array(margins)
    return not any(dominates(np.array(losses(point, directions)), optimistic) for point in front)


def margins_of(study: "optuna.Study", *, metrics: Sequence[str], spec: FidelitySpec) -> list[float]:
    """Per objective metric, the margin learned from the study's promoted trials."""
    from autoprune.search.record import read_trial

    pairs: dict[str, list[tuple[float, float]]] = {m: [] for m in metrics}
    for record in map(read_trial, _complete(study)):
        if record.low_metrics and record.metrics:
            for m in metrics:
                pairs[m].append((record.low_metrics[m], record.metrics[m]))
    return [margin(pairs[m], quantile=spec.quantile, min_pairs=spec.min_pairs) for m in metrics]


def full_front(study: "optuna.Study") -> list[Sequence[float]]:
    """Objective values of the feasible full-fidelity trials (dominated ones cannot change the answer)."""
    from autoprune.search.record import read_trial

    return [t.values for t in _complete(study) if t.values is not None and read_trial(t).feasible]


def promote(study: "optuna.Study", low_metrics: Mapping[str, float], *, metrics: Sequence[str], directions: Sequence[str], spec: FidelitySpec) -> bool:
    """Whether a candidate with these low-fidelity metrics gets the full fine-tune."""
    margins = margins_of(study, metrics=metrics, spec=spec)
    low = [float(low_metrics[m]) for m in metrics]
    return could_reach_front(low, full_front(study), directions=directions, margins=margins)


def steps_spent(study: "optuna.Study") -> int:
    """Fine-tune steps spent by the study's finished and running trials."""
    from autoprune.search.record import read_trial

    return sum(read_trial(t).steps for t in study.get_trials(deepcopy=False))


def _complete(study: "optuna.Study") -> list["optuna.trial.FrozenTrial"]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


__all__ = ["FidelitySpec", "low_fidelity", "margin", "could_reach_front", "margins_of", "full_front", "promote", "steps_spent"]
