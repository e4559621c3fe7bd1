"""The confirmation stage (``search --confirm R``): each front candidate re-run with R fine-tuning seeds.

A front picked on one validation measurement per policy keeps the policies that were lucky on it, so its
validation accuracies overstate what a policy gives on new data (the winner's curse). Re-running each
candidate with seeds ``policy.seed + 0 .. R-1`` and ranking the means removes the fine-tuning seed's
share of that luck; the test split, never searched on, shows what is left (export reports the gap).
"""

from __future__ import annotations

from typing import Any

import optuna

from autoprune.errors import AutopruneError
from autoprune.intervals import mean_spread
from autoprune.search.pareto import front_of_means, front_trials
from autoprune.search.record import Confirmation, read_confirmations, read_trial, write_confirmations


def confirm_front(ctx: Any, evaluator: Any, *, repeats: int) -> dict[int, Confirmation]:
    """Re-run every front trial ``repeats`` times (val and test scored) and record mean and spread per metric.
    Trials confirmed earlier with as many seeds are not run again (a resumed search)."""
    from autoprune.compress import compress
    from autoprune.policy import Policy

    if repeats < 1:
        raise AutopruneError("--confirm", repeats, "must be at least 1 seed")
    done = read_confirmations(ctx.study)
    for trial in front_trials(ctx.study):
        if trial.number in done and len(done[trial.number].seeds) >= repeats:
            continue
        policy = Policy.from_dict(read_trial(trial).policy or {})
        seeds = [policy.seed + i for i in range(repeats)]
        runs = [evaluator.score(compress(evaluator.base.model, policy.model_copy(update={"seed": s}), task=ctx.task), test=True) for s in seeds]
        names = sorted(set.intersection(*(set(r) for r in runs)))
        stats = {m: mean_spread([r[m] for r in runs]) for m in names}
        done[trial.number] = Confirmation(seeds=seeds, mean={m: v[0] for m, v in stats.items()}, std={m: v[1] for m, v in stats.items()})
        write_confirmations(ctx.study, done)
    return done


def confirmed_front(study: optuna.Study, objectives: Any) -> list[tuple[optuna.trial.FrozenTrial, Confirmation]]:
    """The front recomputed from the confirmation means (feasible ones), best first objective first;
    empty unless every trial of the current front was confirmed (a search resumed without --confirm
    may have moved the front past its confirmations)."""
    confirmations = read_confirmations(study)
    front = front_trials(study)
    if not front or any(t.number not in confirmations for t in front):
        return []
    return front_of_means([(t, confirmations[t.number]) for t in front], objectives)


__all__ = ["confirm_front", "confirmed_front"]
