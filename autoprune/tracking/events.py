"""What the search hands the tracker: plain data, so that tracking never imports (or calls back into) the search.

The search turns each told trial into a ``TrialEvent`` and, after it, a ``FrontSnapshot`` of the study's
front; the tracker mirrors them into MLflow. Nothing here knows Optuna or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

from autoprune.metrics import FrontRow


@dataclass(frozen=True)
class StudyInfo:
    """The study as its parent run shows it."""

    name: str
    objectives: tuple[tuple[str, str], ...]  # (metric, direction) per study value
    constraints: tuple[str, ...] = ()
    task: Mapping[str, Any] = field(default_factory=dict)
    space: Mapping[str, Any] = field(default_factory=dict)
    base: Mapping[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None  # the run a previous search of this study used

    @property
    def metric_names(self) -> list[str]:
        return [m for m, _ in self.objectives]


@dataclass(frozen=True)
class TrialEvent:
    """One trial, running or finished. ``state`` is Optuna's state name (RUNNING, COMPLETE, FAIL, PRUNED)."""

    number: int
    state: str
    values: tuple[float, ...] | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    policy: Mapping[str, Any] = field(default_factory=dict)
    layers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    prior: str | None = None
    strategy: str = "sampled"
    failure: str | None = None
    interrupted: bool = False
    feasible: bool = True
    started: datetime | None = None
    completed: datetime | None = None
    # the process that ran it, ``host:pid`` (autoprune.processes): its own tracker logs it
    owner: str | None = None


@dataclass(frozen=True)
class FrontSnapshot:
    """The front after one told trial. ``changed`` holds only the ranks this trial moved, so a consumer
    updates what changed; ``rows`` holds every scored trial (feasible and complete)."""

    ranks: Mapping[int, int]
    changed: Mapping[int, int]
    rows: Mapping[int, FrontRow]
    front: tuple[int, ...]  # trial numbers of rank 0, best first objective first
    hypervolume: float | None
    complete: int
    failed: int

    def front_rows(self) -> list[FrontRow]:
        return [self.rows[n] for n in self.front]


__all__ = ["StudyInfo", "TrialEvent", "FrontSnapshot"]
