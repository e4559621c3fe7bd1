"""The ask/tell loop that runs trials in this process until the study's budget is spent by all its processes
together (the in-process executor, each process of the multi-process one, ``autoprune worker``)."""

from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState

from autoprune.search.budget import counted_before
from autoprune.search.fidelity import low_fidelity, steps_spent
from autoprune.search.lifecycle import OWNER, SKIPPED, Outcome, awaiting_owner, fail_orphaned_trials, failure_reason, finish, new_trial, run_in_process
from autoprune.search.record import write_trial
from autoprune.search.study import SearchContext

# how often a process whose budget looks spent looks again while a trial there has no owner yet
ORPHAN_POLL_SECONDS = 1.0


def run_trials(ctx: SearchContext, *, deadline: float | None) -> int:
    """Ask/tell until the budget is spent (by every process of the study) or the deadline passes."""
    if ctx.fidelity is not None:
        return _run_fidelity_trials(ctx, deadline=deadline)
    distributions = ctx.space.distributions()
    ran = 0
    # ``asked`` bounds the trials that count toward the budget from above (counted_before(n) <= n: trial
    # numbers are dense), so the study is read to count them exactly only once the bound reaches the budget.
    asked = _next_number(ctx.study)
    while deadline is None or time.monotonic() < deadline:
        if asked >= ctx.budget:
            asked = counted_before(ctx.study, _next_number(ctx.study))
            if asked < ctx.budget:
                continue
            # A worker process that died mid-trial left it RUNNING, holding a slot of the budget: fail it
            # (as interrupted) so that a trial runs in its place. That changes nothing until the slots look
            # spent, so the study is read for orphans then, not before every trial. One killed while it
            # was being asked has no owner to tell by: the loop waits out its grace period.
            if not fail_orphaned_trials(ctx.study):
                if not awaiting_owner(ctx.study):
                    break
                time.sleep(ORPHAN_POLL_SECONDS)
            continue  # ``asked`` still bounds at the budget: the top of the loop counts again
        with new_trial(ctx, distributions) as trial:
            if trial.number >= ctx.budget and counted_before(ctx.study, trial.number) >= ctx.budget:
                skip(ctx, trial)
                break
            _run(ctx, trial)
        ran += 1
        asked = trial.number + 1
    return ran


def _run_fidelity_trials(ctx: SearchContext, *, deadline: float | None) -> int:
    """Ask/tell until the next short fine-tune would overrun the step budget (search.fidelity): the budget is
    compute, so the number of trials is whatever it buys."""
    assert ctx.fidelity is not None and ctx.budget_steps is not None
    distributions = ctx.space.distributions()
    ran = 0
    while deadline is None or time.monotonic() < deadline:
        fail_orphaned_trials(ctx.study)
        with new_trial(ctx, distributions) as trial:
            try:
                short = low_fidelity(ctx.space.policy(trial.params), ctx.fidelity.fraction).finetune_steps
            except Exception:  # noqa: BLE001 - a point the space cannot turn into a policy fails in begin, spending nothing
                short = 0
            if steps_spent(ctx.study) + short > ctx.budget_steps:
                skip(ctx, trial)
                break
            _run(ctx, trial)
        ran += 1
    return ran


def _run(ctx: SearchContext, trial: optuna.Trial) -> None:
    """The trial's lifecycle; when the process itself fails under it (a full disk, a store gone), the trial is
    failed as interrupted on the way out, so it is run again rather than left RUNNING until the next start.
    Best effort: the failure may keep that write from landing too, and then the next start fails it (its
    process is gone)."""
    try:
        run_in_process(ctx, trial)
    except Exception as exc:
        try:
            if any(t.number == trial.number for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
                finish(ctx, trial, Outcome(failure=f"interrupted: {failure_reason(exc)}", interrupted=True))
        except Exception:  # noqa: BLE001 - the first failure is the one to report
            pass
        raise


def skip(ctx: SearchContext, trial: optuna.Trial) -> None:
    """Record a trial asked past the budget as skipped. It is owned first, like every trial this process
    tells: its tracker alone logs it, and another process's reconcile leaves it alone (one child run each)."""
    write_trial(ctx.study, trial, owner=OWNER)
    finish(ctx, trial, Outcome(failure=SKIPPED, interrupted=True))


def _next_number(study: optuna.Study) -> int:
    """The number the next asked trial would get: one read of the study, once per process."""
    trials = study.get_trials(deepcopy=False)
    return max((t.number for t in trials), default=-1) + 1


__all__ = ["run_trials", "ORPHAN_POLL_SECONDS"]
