"""Objective specs: which metrics the study optimises, in which direction, under which constraints.

Every trial records all metrics whatever the objectives; the spec only picks the study's axes.
Constraints go to Optuna as ``constraints_func`` values (<= 0 is feasible), so infeasible trials never
enter the front.

A task may name its own metric (``miou``): objectives and constraints may then name it and ``miou_drop``,
checked against the task by ``for_metric`` before any work; ``accuracy`` in a shipped spec means the task's
metric, whatever its name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

from autoprune.metrics import COST_METRICS, METRICS, parse_bound
from autoprune.policy import load_mapping, parse_model

LATENCY = "latency_ms"
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def direction_of(metric: str) -> str:
    """A task's own metric is higher-is-better and its drop lower-is-better; the rest are in the metric table."""
    return METRICS.get(metric) or ("minimize" if metric.endswith("_drop") else "maximize")


class Objective(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    metric: str
    direction: Literal["maximize", "minimize"] | None = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if not _NAME.match(metric):
            raise ValueError(f"is not a metric (metrics: {', '.join(METRICS)}, or the task's metric)")
        return metric

    @property
    def resolved_direction(self) -> str:
        return self.direction or direction_of(self.metric)


class Constraint(BaseModel):
    """``metric <= bound`` or ``metric >= bound``; written in YAML as the string ``"accuracy_drop <= 1.5"``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    metric: str
    op: Literal["<=", ">="]
    bound: float

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        try:
            metric, op, bound = parse_bound(text, names=None)
        except ValueError as exc:
            raise ValueError(f"constraint {exc}") from None
        return cls(metric=metric, op=op, bound=bound)

    def violation(self, metrics: Mapping[str, float]) -> float:
        value = metrics[self.metric]
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


__all__ = ["Objective", "Constraint", "ObjectiveSpec", "METRICS", "COST_METRICS"]


class ObjectiveSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    objectives: list[Objective] = Field(min_length=1)
    constraints: list[Constraint] = Field(default_factory=list)

    @field_validator("constraints", mode="before")
    @classmethod
    def _parse_constraints(cls, raw: Any) -> Any:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise ValueError("must be a list of 'metric <= number' strings")
        return [Constraint.parse(c) if isinstance(c, str) else c for c in raw]

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, objectives: list[Objective]) -> list[Objective]:
        names = [o.metric for o in objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"lists a metric twice ({names})")
        return objectives

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o.resolved_direction for o in self.objectives]

    def values(self, metrics: Mapping[str, float]) -> list[float]:
        return [float(metrics[m]) for m in self.metrics]

    @property
    def needs_latency(self) -> bool:
        """Whether an objective or a constraint reads ``latency_ms``, which the trials then measure."""
        return LATENCY in self.metrics or any(c.metric == LATENCY for c in self.constraints)

    def violations(self, metrics: Mapping[str, float]) -> list[float]:
        return [c.violation(metrics) for c in self.constraints]

    def to_dict(self) -> dict[str, Any]:
        return {
            "objectives": [{"metric": o.metric, "direction": o.resolved_direction} for o in self.objectives],
            "constraints": [str(c) for c in self.constraints],
        }

    def for_metric(self, name: str) -> "ObjectiveSpec":
        """This spec for a task whose metric is ``name``: ``accuracy[_drop]`` become ``name[_drop]``, and any
        metric neither built in nor the task's is an error."""
        from autoprune.errors import AutopruneError

        renamed = {"accuracy": name, "accuracy_drop": f"{name}_drop"}
        known = {*METRICS, name, f"{name}_drop"} - ({"accuracy", "accuracy_drop"} - {name, f"{name}_drop"})
        spec = self.model_copy(update={
            "objectives": [o.model_copy(update={"metric": renamed.get(o.metric, o.metric)}) for o in self.objectives],
            "constraints": [c.model_copy(update={"metric": renamed.get(c.metric, c.metric)}) for c in self.constraints],
        })
        for metric in [*spec.metrics, *(c.metric for c in spec.constraints)]:
            if metric not in known:
                raise AutopruneError("objectives", metric, f"is not a metric (metrics: {', '.join(sorted(known))})")
        return spec

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "objectives") -> "ObjectiveSpec":
        return parse_model(cls, data, source=source, shape="a mapping with an 'objectives' list")

    @classmethod
    def load(cls, path: str | Path) -> "ObjectiveSpec":
        return cls.from_dict(load_mapping(path), source=str(path))
