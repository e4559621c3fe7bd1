"""Objective specs: which metrics the study optimises, in which direction, under which constraints.

Every trial records all metrics whatever the objectives; the spec only picks the study's axes.
Constraints go to Optuna as ``constraints_func`` values (<= 0 is feasible), so infeasible trials never
enter the front.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

from autoprune.policy import load_mapping, parse_model

# metric -> the direction in which it improves
METRICS: dict[str, str] = {
    "accuracy": "maximize",
    "accuracy_drop": "minimize",
    "macs": "minimize",
    "bops": "minimize",
    "esn_a": "minimize",
    "esn_d": "minimize",
    "esn_d_prime": "minimize",
    "esn_a_comp": "minimize",
    "esn_d_comp": "minimize",
    "memory_mb": "minimize",
    "params": "minimize",
    "performance_density": "maximize",
}
COST_METRICS = ("macs", "bops", "esn_a", "esn_d", "esn_d_prime", "esn_a_comp", "esn_d_comp", "memory_mb", "params")
_CONSTRAINT = re.compile(r"^\s*([a-z_]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


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
        match = _CONSTRAINT.match(str(text))
        if not match:
            raise ValueError(f"constraint {text!r} is not of the form 'metric <= number' or 'metric >= number'")
        metric, op, bound = match.groups()
        if metric not in METRICS:
            raise ValueError(f"constraint {text!r} names no metric (metrics: {', '.join(METRICS)})")
        return cls(metric=metric, op=op, bound=float(bound))

    def violation(self, metrics: Mapping[str, float]) -> float:
        value = metrics[self.metric]
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


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
