"""What follows every told trial, whichever executor told it: the front is updated once, and the MLflow
tracker and the progress bar read the same snapshot (``Reporter``). Also the tracker's view of a study
(``study_info``) and its start on its own thread (``open_tracker``): tracking is handed data, never the search.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.search.budget import counted_before, spent
from autoprune.search.front import Front, event_of
from autoprune.search.objectives import ObjectiveSpec
from autoprune.processes import this_process
from autoprune.search.record import read_meta, read_trial, study_lock, update_meta
from autoprune.search.study import SearchContext


def study_info(study: optuna.Study) -> Any:
    """The tracker's view of an autoprune study."""
    from autoprune.tracking import StudyInfo

    meta = read_meta(study)
    assert meta is not None, "tracking needs a study created by autoprune search"
    objectives = ObjectiveSpec.from_dict(meta.objectives)
    return StudyInfo(
        name=study.study_name,
        objectives=tuple(zip(objectives.metrics, objectives.directions)),
        constraints=tuple(str(c) for c in objectives.constraints),
        task=meta.task,
        space=meta.space,
        base=meta.base.model_dump() if meta.base else {},
        parent_run_id=meta.mlflow_parent_run_id,
    )


def start_tracker(tracker: Any, study: optuna.Study) -> None:
    """Start the tracker on the study and record its parent run, which a resume then reuses. Processes that
    start on one study at once take turns, so that the first makes the parent run and the others reuse it."""
    with study_lock(study, "mlflow-parent", owner=this_process()):
        info = study_info(study)
        tracker.start(study=info, on_parent=lambda parent: update_meta(study, mlflow_parent_run_id=parent))


def open_tracker(ctx: SearchContext, tracking_uri: str | None) -> Any:
    """The MLflow mirror of the study, on its own thread (``tracking.background``), started there and
    caught up with what it missed: opening the store (importing MLflow, creating or migrating its schema,
    about 2 s) overlaps the first trial instead of delaying it."""
    from autoprune.tracking import Tracker
    from autoprune.tracking.background import BackgroundTracker

    tracker = BackgroundTracker(Tracker(study_name=ctx.study.study_name, tracking_uri=tracking_uri))
    tracker.submit(start_tracker, ctx.study)
    tracker.submit(_catch_up, ctx.study)
    return tracker


def _catch_up(tracker: Any, study: optuna.Study) -> None:
    tracker.reconcile(finished_events(study))


def finished_events(study: optuna.Study) -> list[Any]:
    states = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return [event_of(t) for t in study.get_trials(deepcopy=False, states=states)]


class Reporter:
    """Takes every told trial once: updates the front, then the tracker and the progress bar from the
    same snapshot. Nothing here reads the whole study per trial. ``tracker``: ``open_tracker``'s (its calls
    run on its own thread), or None."""

    def __init__(self, ctx: SearchContext, *, tracker: Any, progress: bool) -> None:
        from tqdm.auto import tqdm

        self.ctx = ctx
        self.tracker = tracker
        self.front = Front(ctx.study, ctx.meta)
        self.snapshot = self.front.snapshot()
        self.bar = tqdm(total=ctx.budget, initial=min(spent(ctx.study), ctx.budget), desc="trials", disable=not progress, unit="trial")

    def told(self, frozen: FrozenTrial) -> None:
        record = read_trial(frozen)
        self.snapshot = self.front.add(frozen, record)
        if self.tracker is not None:
            self.tracker.log_trial(event_of(frozen, record), rank=self.snapshot.changed.get(frozen.number))
            self.tracker.refresh(self.snapshot)
        if not self.bar.disable:
            self.bar.n = min(counted_before(self.ctx.study, frozen.number + 1), self.ctx.budget)
            hv = self.snapshot.hypervolume
            self.bar.set_postfix(front=len(self.snapshot.front), hv=f"{hv:.4f}" if hv is not None else "-", failed=self.snapshot.failed)
            self.bar.refresh()

    def close(self, *, status: str | None) -> None:
        """Final state: MLflow reconciled with the study, every rank tagged; ``status`` ends the parent run."""
        self.bar.close()
        if self.tracker is None:
            return
        self.tracker.reconcile(finished_events(self.ctx.study))
        self.front.sync(force=True)
        full = self.front.snapshot()
        # every rank, so that trials other processes told get their tags too
        self.tracker.refresh(replace(full, changed=full.ranks))
        if status is not None:
            self.tracker.close(status=status)
        else:
            self.tracker.flush()
            self.tracker.drain()


__all__ = ["Reporter", "study_info", "start_tracker", "open_tracker", "finished_events"]
