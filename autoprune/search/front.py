"""The study's front, kept up to date one told trial at a time.

``Front.add`` inserts a scored trial into its non-domination layers (rank 0 is the front) and moves only
the points it dominates, so a trial costs time in the points it touches, not a re-ranking of the study;
the hypervolume is recomputed only when the front itself changed, and over the front alone (dominated
points add nothing to it). Each told trial yields one ``FrontSnapshot`` shared by the progress bar, the
tracker and the final report.
"""

from __future__ import annotations

import math
import time
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from optuna.trial import TrialState

from autoprune.metrics import FrontRow
from autoprune.search.objectives import ObjectiveSpec
from autoprune.search.pareto import hypervolume_of, normalised_losses
from autoprune.search.record import StudyMeta, TrialRecord, read_trial
from autoprune.tracking.events import FrontSnapshot, TrialEvent

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

# How often a process re-reads the trials other processes of the study told (a full read of the study).
SYNC_SECONDS = 10.0


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` dominates ``b`` (both as losses: lower is better)."""
    return bool(np.all(a <= b) and np.any(a < b))


class Ranking:
    """Non-domination layers of a growing set of points (losses, lower is better)."""

    def __init__(self) -> None:
        self.layers: list[list[int]] = []
        self.rank: dict[int, int] = {}
        self._loss: dict[int, np.ndarray] = {}

    def add(self, key: int, loss: Sequence[float]) -> dict[int, int]:
        """Insert a point; returns the ranks that changed (the new point's included)."""
        point = np.asarray(loss, dtype=float)
        self._loss[key] = point
        k = 0
        while k < len(self.layers) and self._dominated(point, self.layers[k]):
            k += 1
        moving, changed = [key], {}
        while moving:
            if k == len(self.layers):
                self.layers.append([])
            layer = self.layers[k]
            # points of this layer that a newcomer dominates go one layer down, and push theirs in turn
            pushed = [m for m in layer if any(dominates(self._loss[x], self._loss[m]) for x in moving)]
            layer[:] = [m for m in layer if m not in pushed] + moving
            for m in moving:
                self.rank[m] = k
                changed[m] = k
            moving, k = pushed, k + 1
        return changed

    def _dominated(self, point: np.ndarray, layer: list[int]) -> bool:
        if not layer:
            return False
        losses = np.stack([self._loss[m] for m in layer])
        return bool(np.any(np.all(losses <= point, axis=1) & np.any(losses < point, axis=1)))


def losses(values: Sequence[float], directions: Sequence[str]) -> list[float]:
    return [-v if d == "maximize" else v for v, d in zip(values, directions)]


def event_of(trial: "FrozenTrial | optuna.Trial", record: TrialRecord | None = None) -> TrialEvent:
    """The tracker's view of a trial (a live trial, not yet told, is RUNNING)."""
    record = record or read_trial(trial)
    state = trial.state.name if hasattr(trial, "state") else "RUNNING"
    return TrialEvent(
        number=trial.number,
        state=state,
        values=tuple(trial.values) if getattr(trial, "values", None) else None,
        metrics=record.metrics or {},
        policy=record.policy or {},
        layers=record.layers or {},
        prior=record.prior,
        strategy=record.strategy,
        failure=record.failure,
        interrupted=record.interrupted,
        feasible=record.feasible,
        started=getattr(trial, "datetime_start", None),
        completed=getattr(trial, "datetime_complete", None),
        owner=record.owner,
    )


def _summary(policy: dict[str, Any] | None, layers: dict[str, dict[str, Any]] | None = None) -> str:
    if not policy:
        return ""
    from autoprune.policy import Policy

    parsed = Policy.from_dict(policy)
    return parsed.summary(list(parsed.layers), applied=layers)


class Front:
    """Ranks, front and hypervolume of one study, updated by each told trial."""

    def __init__(self, study: "optuna.Study", meta: StudyMeta) -> None:
        self.study = study
        self.spec = ObjectiveSpec.from_dict(meta.objectives)
        self.directions = self.spec.directions
        self.base = meta.base.reference() if meta.base else None
        self.ranking = Ranking()
        self.rows: dict[int, FrontRow] = {}
        self._seen: set[int] = set()
        self._hv_points: dict[int, list[float]] = {}
        self._hypervolume: float | None = 0.0 if self.base is not None else None
        self.complete = 0
        self.failed = 0
        self._synced_at = -math.inf
        self.sync(force=True)

    def sync(self, *, force: bool = False) -> None:
        """Take in the finished trials other processes told (read from storage at most every SYNC_SECONDS)."""
        if not force and time.monotonic() - self._synced_at < SYNC_SECONDS:
            return
        self._synced_at = time.monotonic()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            if trial.number not in self._seen:
                self._add(trial, read_trial(trial))

    def add(self, trial: "FrozenTrial", record: TrialRecord | None = None) -> FrontSnapshot:
        """Take in one told trial and return the snapshot after it."""
        changed = self._add(trial, record or read_trial(trial)) if trial.number not in self._seen else {}
        self.sync()
        return self.snapshot(changed)

    def _add(self, trial: "FrozenTrial", record: TrialRecord) -> dict[int, int]:
        if trial.state == TrialState.FAIL:
            self._seen.add(trial.number)
            self.failed += 1
            return {}
        if trial.state != TrialState.COMPLETE:
            return {}
        self._seen.add(trial.number)
        self.complete += 1
        if trial.values is None or not record.feasible:
            return {}
        self.rows[trial.number] = FrontRow(
            trial.number, record.metrics or {}, record.prior, _summary(record.policy, record.layers), tuple(trial.values), record.policy, record.layers, record.strategy
        )
        changed = self.ranking.add(trial.number, losses(trial.values, self.directions))
        if self.base is not None and record.metrics:
            self._hv_points[trial.number] = normalised_losses(record.metrics, self.spec, self.base)
        if changed[trial.number] == 0:  # only a newcomer on the front changes the front
            self._refresh_hypervolume()
        return changed

    def _refresh_hypervolume(self) -> None:
        if self.base is None:
            return
        points = [self._hv_points[n] for n in self.front_numbers() if n in self._hv_points]
        self._hypervolume = hypervolume_of(points) if points else 0.0

    def front_numbers(self) -> tuple[int, ...]:
        layer = self.ranking.layers[0] if self.ranking.layers else []
        reverse = self.directions[0] == "maximize"
        return tuple(sorted(layer, key=lambda n: self.rows[n].values[0], reverse=reverse))

    def snapshot(self, changed: dict[int, int] | None = None) -> FrontSnapshot:
        return FrontSnapshot(
            ranks=MappingProxyType(dict(self.ranking.rank)),
            changed=MappingProxyType(dict(changed or {})),
            rows=MappingProxyType(dict(self.rows)),
            front=self.front_numbers(),
            hypervolume=self._hypervolume,
            complete=self.complete,
            failed=self.failed,
        )


__all__ = ["Front", "Ranking", "dominates", "event_of"]
