"""The trial budget: which trials of a study count toward it. Read by every process of the study.

A trial counts when it is running or finished with a result or the policy's own failure, or judged on its
post-training rung alone (the ladder, ``search.ladder``); waiting, pruned by multi-fidelity (whose budget is
fine-tune steps) and interrupted trials (Ctrl-C, a dead process: run again on resume) do not.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from autoprune.search.record import TrialRecord, read_trial


def counts_toward_budget(state: TrialState, record: TrialRecord) -> bool:
    if state in (TrialState.COMPLETE, TrialState.RUNNING):
        return True
    if state == TrialState.PRUNED:
        return record.rung == "post_training"
    return state == TrialState.FAIL and record.failure is not None and not record.interrupted


def counted_before(study: optuna.Study, number: int) -> int:
    """Trials numbered below ``number`` that count toward the budget. Trial numbers are dense, so this
    reads only the trials that do not count (waiting, interrupted, pruned: few), not the whole study."""
    others = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.FAIL, TrialState.PRUNED))
    return number - sum(1 for t in others if t.number < number and not counts_toward_budget(t.state, read_trial(t)))


def spent(study: optuna.Study) -> int:
    """Trials of the whole study that count toward its budget."""
    return sum(counts_toward_budget(t.state, read_trial(t)) for t in study.get_trials(deepcopy=False))


def over_budget(study: optuna.Study, number: int, budget: int) -> bool:
    """Whether the budget was already taken by trials asked before trial ``number`` (by any process)."""
    return counted_before(study, number) >= budget


__all__ = ["counts_toward_budget", "counted_before", "spent", "over_budget"]
