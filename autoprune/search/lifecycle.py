"""One trial's life, the same under every executor: begin (owner, policy, heartbeat), evaluate somewhere,
finish (record the result or the failure, tell the study, fetch the told trial, notify).

Also failing the trials of processes that died (the budget itself is ``search.budget``).
"""

from __future__ import annotations

import math
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.policy import Policy
from autoprune.processes import owner_alive, this_process
from autoprune.search.evaluate import TrialFailed
from autoprune.search.fidelity import low_fidelity, promote, steps_spent
from autoprune.search.ladder import climbs
from autoprune.search.record import TrialRecord, read_trial, write_trial
from autoprune.search.strategies import TrialJob, run_job
from autoprune.search.study import GRACE_SECONDS, SearchContext

OWNER = this_process()
SKIPPED = "skipped: another worker took the last trial of the budget"


def failure_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


@dataclass(frozen=True)
class Outcome:
    """What an evaluation sends back, across a process or a Ray worker: metrics and layers, or a failure."""

    metrics: dict[str, float] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    failure: str | None = None
    interrupted: bool = False
    worker: str | None = None
    # TrialRecord fields the trial learned (a learned strategy's policy and model file)
    record: dict[str, Any] = field(default_factory=dict)
    # multi-fidelity (search.fidelity): below 1, a candidate judged on its short fine-tune alone (told PRUNED)
    fidelity: float = 1.0
    low_metrics: dict[str, float] | None = None
    steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        sent = {"failure": self.failure} if self.failure else {"metrics": self.metrics, "layers": self.layers, "record": self.record}
        return {**sent, "worker": self.worker, "fidelity": self.fidelity, "low_metrics": self.low_metrics, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Outcome":
        return cls(
            metrics=data.get("metrics", {}), layers=data.get("layers", {}), failure=data.get("failure"), worker=data.get("worker"),
            record=data.get("record", {}), fidelity=data.get("fidelity", 1.0), low_metrics=data.get("low_metrics"), steps=data.get("steps", 0),
        )

    @classmethod
    def of(cls, evaluate: Callable[[], tuple[dict[str, float], dict[str, Any], dict[str, Any]]], *, worker: str | None = None) -> "Outcome":
        """Run an evaluation (``strategies.run_job``); any failure of the policy becomes a failed outcome with its
        reason. ``worker``: where it ran, when not in the owner's process."""
        try:
            metrics, layers, record = evaluate()
        except Exception as exc:  # noqa: BLE001 - one trial's failure is recorded, the study goes on
            return cls(failure=failure_reason(exc), worker=worker)
        return cls(metrics=metrics, layers=layers, worker=worker, record=record)


@contextmanager
def heartbeat(ctx: SearchContext, trial: optuna.Trial) -> Iterator[None]:
    """The running trial's heartbeat, recorded every interval the storage asks for, so that any process
    (``fail_orphaned_trials``, another host) fails it once its owner has died silently. Optuna beats only
    inside Study.optimize; the search runs ask/tell, so it beats through the storage's own methods."""
    storage = ctx.study._storage
    # The study's storage is Optuna's cache around an RDBStorage, so this asks what it can do, not its type:
    # a test of isinstance(RDBStorage) here once left every trial without a heartbeat.
    interval = storage.get_heartbeat_interval() if hasattr(storage, "record_heartbeat") else None
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial._trial_id)
            except Exception:  # noqa: BLE001 - a storage hiccup (a lock) skips one beat; the grace period covers several
                pass
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"autoprune-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def begin(ctx: SearchContext, trial: optuna.Trial) -> TrialJob | None:
    """Own the trial and record its policy (a learned strategy: its run config, the policy comes with the
    result); a point the space cannot turn into a job fails the trial at once (returns None)."""
    write_trial(ctx.study, trial, owner=OWNER)
    try:
        job = ctx.space.job(trial.params, seed=ctx.seed + trial.number, study_name=ctx.study.study_name)
    except Exception as exc:  # noqa: BLE001 - a bad point is a failed trial, as any other
        finish(ctx, trial, Outcome(failure=failure_reason(exc)))
        return None
    if job.policy is not None:
        write_trial(ctx.study, trial, policy=job.policy)
    else:
        write_trial(ctx.study, trial, strategy=job.strategy, learn=job.learn)
    return job


def finish(ctx: SearchContext, trial: optuna.Trial, outcome: Outcome) -> FrozenTrial:
    """Record the outcome, tell the study, notify; returns the told trial. A result whose objective is
    not finite is a failure. ``interrupted``: cut short, not the policy's fault, run again on resume."""
    failure = outcome.failure
    if outcome.worker:
        write_trial(ctx.study, trial, worker=outcome.worker)
    if outcome.steps:
        write_trial(ctx.study, trial, steps=outcome.steps)
    if failure is None:
        values = ctx.objectives.values(outcome.metrics)
        bad = [m for m, v in zip(ctx.objectives.metrics, values) if not math.isfinite(v)]
        if bad:
            failure = failure_reason(TrialFailed(f"{bad[0]} is {outcome.metrics[bad[0]]}"))
    if failure is None:
        record = TrialRecord(metrics=outcome.metrics, layers=outcome.layers, constraints=ctx.objectives.violations(outcome.metrics))
        if isinstance(trial, optuna.Trial):
            # what the samplers read: <= 0 is feasible
            for constraint, violation in zip(ctx.objectives.constraints, record.constraints or []):
                trial.set_constraint(str(constraint), violation)
        write_trial(ctx.study, trial, metrics=record.metrics, layers=record.layers, constraints=record.constraints, **outcome.record, **interval_fields(outcome.metrics))
        if outcome.low_metrics is not None:
            write_trial(ctx.study, trial, low_metrics=outcome.low_metrics)
        if outcome.fidelity < 1.0:
            # judged on a lower rung alone: PRUNED keeps it off every front (search.fidelity, search.ladder)
            write_trial(ctx.study, trial, fidelity=outcome.fidelity)
            frozen = ctx.study.tell(trial, state=TrialState.PRUNED)
        else:
            frozen = ctx.study.tell(trial, values)
    else:
        fields: dict[str, Any] = {"failure": failure}
        if outcome.interrupted:
            fields["interrupted"] = True
        write_trial(ctx.study, trial, **fields)
        frozen = ctx.study.tell(trial, state=TrialState.FAIL)
    if ctx.notify is not None:
        ctx.notify(frozen)
    return frozen


def interval_fields(metrics: dict[str, float]) -> dict[str, Any]:
    """The record's typed interval fields from the evaluator's ``{metric}_ci_low/high`` and ``val_samples``."""
    lows = {k.removesuffix("_ci_low") for k in metrics if k.endswith("_ci_low")}
    interval = {m: (metrics[f"{m}_ci_low"], metrics[f"{m}_ci_high"]) for m in lows if f"{m}_ci_high" in metrics}
    if not interval:
        return {}
    samples = metrics.get("val_samples")
    return {"metric_interval": interval, **({"val_samples": int(samples)} if samples is not None else {})}


def run_in_process(ctx: SearchContext, trial: optuna.Trial) -> FrozenTrial | None:
    """The whole lifecycle in this process (the in-process and multi-process executors); the caller holds
    ``new_trial`` around it."""
    evaluator = ctx.ensure_evaluator(progress=False)
    with heartbeat(ctx, trial):
        job = begin(ctx, trial)
        if job is None:
            return None
        if job.strategy != "sampled" or (ctx.fidelity is None and not ctx.ladder):
            outcome = Outcome.of(lambda: run_job(evaluator, job))
        elif ctx.fidelity is not None:
            outcome = evaluate_fidelities(ctx, trial, evaluator, Policy.from_dict(job.policy or {}))
        else:
            # a prior was chosen on purpose (a budget's best predicted policy, a uniform baseline): it climbs
            climb = read_trial(trial).prior is not None
            outcome = evaluate_ladder(ctx, evaluator, Policy.from_dict(job.policy or {}), climb=climb)
        return finish(ctx, trial, outcome)


@contextmanager
def new_trial(ctx: SearchContext, distributions: dict[str, Any]) -> Iterator[optuna.Trial]:
    """A newly asked trial, failed as interrupted (a resume runs it again) if a Ctrl-C comes before it is
    told. Optuna creates the trial, RUNNING, before it samples, so a Ctrl-C during the ask would leave a
    trial nobody knows, with no owner for any orphan check, holding a slot of the budget for good: in the
    main thread that Ctrl-C waits until the ask has returned."""
    pending: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda number, _frame: pending.append(number)) if main else None
    try:
        trial = ctx.study.ask(distributions)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    try:
        if pending:
            raise KeyboardInterrupt
        yield trial
    except KeyboardInterrupt:
        if any(t.number == trial.number for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
            finish(ctx, trial, Outcome(failure="interrupted: Ctrl-C", interrupted=True))
        raise


def evaluate_ladder(ctx: SearchContext, evaluator: Any, policy: Policy, *, climb: bool = False) -> Outcome:
    """Rung 1 (post-training), then rung 2 (the fine-tune) only when the candidate's rung-1 values, predicted
    up, could still reach the rung-2 front (``search.ladder``), or ``climb`` says it climbs anyway; a candidate
    that stops is told PRUNED."""
    if policy.finetune_steps == 0 or not policy.keep_best:
        return Outcome.of(lambda: evaluator.climb(policy))
    try:
        post_training = evaluator.post_training(policy)
    except Exception as exc:  # noqa: BLE001 - one trial's failure is recorded, the study goes on
        return Outcome(failure=failure_reason(exc))
    result, metrics = post_training
    if not climb and not climbs(ctx.study, metrics, metrics=ctx.objectives.metrics, directions=ctx.objectives.directions):
        layers = {name: lp.model_dump() for name, lp in result.layers.items()}
        record = {"rungs": {"post_training": metrics}, "rung": "post_training", "checksum": result.checksum()}
        return Outcome(metrics=metrics, layers=layers, record=record, fidelity=0.0)
    return Outcome.of(lambda: evaluator.fine_tuned(policy, post_training=post_training))


def evaluate_fidelities(ctx: SearchContext, trial: optuna.Trial, evaluator: Any, policy: Policy) -> Outcome:
    """The short fine-tune, then the full one when the candidate could still reach the front and the step
    budget has room for it (search.fidelity). The steps are reserved on the trial before each fine-tune,
    so that other processes of the study see them spent."""
    spec = ctx.fidelity
    assert spec is not None
    short = low_fidelity(policy, spec.fraction)
    write_trial(ctx.study, trial, steps=short.finetune_steps)
    low = Outcome.of(lambda: (*evaluator.evaluate(short), {}))
    low = replace(low, steps=short.finetune_steps)
    if low.failure is not None:
        return low
    room = ctx.budget_steps is None or steps_spent(ctx.study) + policy.finetune_steps <= ctx.budget_steps
    directions = ctx.objectives.directions
    if not (room and promote(ctx.study, low.metrics, metrics=ctx.objectives.metrics, directions=directions, spec=spec)):
        return replace(low, fidelity=spec.fraction)
    spent_steps = short.finetune_steps + policy.finetune_steps
    write_trial(ctx.study, trial, steps=spent_steps)
    return replace(Outcome.of(lambda: (*evaluator.evaluate(policy), {})), low_metrics=low.metrics, steps=spent_steps)


# --- processes that died ---------------------------------------------------------------------------


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """RUNNING trials whose process is gone become FAIL (interrupted), so a resume redoes them.

    A trial owned by a dead process on this host is failed at once; one on another host waits for
    Optuna's heartbeat grace period. A trial with no owner was asked by a process that died before it could
    own it (the ask samples its parameters first, tens of milliseconds); it never beat either, so it is
    failed once it is GRACE_SECONDS old.
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _orphaned(trial)
        if reason is None:
            continue
        write_trial(study, trial, failure=reason, interrupted=True)
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another process failed it a moment ago
            continue
        failed.append(trial.number)
    try:
        failed += [t.number for t in optuna.storages.fail_stale_trials(study) or []]
    except Exception:  # noqa: BLE001 - fail_stale_trials is best effort on storages without heartbeats
        pass
    return failed


def _orphaned(trial: FrozenTrial) -> str | None:
    """Why a RUNNING trial is known to have lost its process, or None while it may still have one."""
    owner = read_trial(trial).owner
    if owner is None:
        return "interrupted: its process died while asking for it" if _age_seconds(trial) > GRACE_SECONDS else None
    return f"interrupted: process {owner} died" if owner_alive(owner) is False else None


def _age_seconds(trial: FrozenTrial) -> float:
    # datetime_start is the asking host's local time, as datetime.now() here: hosts' clocks must agree to
    # well within the grace period, as they must for Optuna's own heartbeats
    return (datetime.now() - trial.datetime_start).total_seconds() if trial.datetime_start else 0.0


def awaiting_owner(study: optuna.Study) -> bool:
    """Whether a RUNNING trial has no owner yet: being asked by a live process (it owns it in a moment), or
    left by one that died asking (failed once GRACE_SECONDS old). Until then it holds a slot of the budget."""
    return any(read_trial(t).owner is None for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


__all__ = [
    "awaiting_owner", "OWNER", "SKIPPED", "Outcome", "failure_reason", "begin", "finish", "heartbeat", "run_in_process", "new_trial", "evaluate_fidelities",
    "evaluate_ladder",
    "fail_orphaned_trials",
]
