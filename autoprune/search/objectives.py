"""Objective specs: which metrics the study optimises, in which direction, under which constraints.

Every trial records all metrics whatever the objectives; the spec only picks the study's axes.
Constraints go to Optuna as ``constraints_func`` values (<= 0 is feasible), so infeasible trials never
enter the front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

from autoprune.metrics import COST_METRICS, METRICS, parse_bound
from autoprune.policy import load_mapping, parse_model


class Objective(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    metric: str
    direction: Literal["maximize", "minimize"] | None = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in METRICS:
            raise ValueError(f"is not a metric (metrics: {', '.join(METRICS)})")
        return metric

    @property
    def resolved_direction(self) -> str:
        return self.direction or METRICS[self.metric]


class Constraint(BaseModel):
    """``metric <= bound`` or ``metric >= bound``; written in YAML as the string ``"accuracy_drop <= 1.5"``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    metric: str
    op: Literal["<=", ">="]
    bound: float

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        try:
            metric, op, bound = parse_bound(text, names=METRICS)
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

    def violations(self, metrics: Mapping[str, float]) -> list[float]:
        return [c.violation(metrics) for c in self.constraints]

    def to_dict(self) -> dict[str, Any]:
        return {
            "objectives": [{"metric": o.metric, "direction": o.resolved_direction} for o in self.objectives],
            "constraints": [str(c) for c in self.constraints],
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "objectives") -> "ObjectiveSpec":
        return parse_model(cls, data, source=source, shape="a mapping with an 'objectives' list")

    @classmethod
    def load(cls, path: str | Path) -> "ObjectiveSpec":
        return cls.from_dict(load_mapping(path), source=str(path))
