"""The metric table: every metric a trial records, with its direction, label and unit, in one place.

Objective specs, constraints, plots, the front's CSV, the printed report and the CLI all read this
table, so a new metric is one row here. Pure data, no heavy imports: tracking and plots import it
without importing the search.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Direction
    label: str
    unit: str = ""
    # an objective the search may optimise (else only recorded, like the reduction ratio)
    objective: bool = True
    # a cost of the ideal-hardware model, read on a log scale against the float model
    cost: bool = False


METRIC_TABLE: tuple[Metric, ...] = (
    Metric("accuracy", "maximize", "accuracy", "%"),
    Metric("accuracy_drop", "minimize", "accuracy drop", "points"),
    Metric("macs", "minimize", "MACs", cost=True),
    Metric("bops", "minimize", "BOPs", cost=True),
    Metric("esn_a", "minimize", "ESN_a", cost=True),
    Metric("esn_d", "minimize", "ESN_d", cost=True),
    Metric("esn_d_prime", "minimize", "ESN'_d", cost=True),
    Metric("esn_a_comp", "minimize", "ESN_a (c = computations)", cost=True),
    Metric("esn_d_comp", "minimize", "ESN_d (c = computations)", cost=True),
    Metric("memory_mb", "minimize", "memory", "Mb", cost=True),
    Metric("params", "minimize", "parameters", cost=True),
    Metric("performance_density", "maximize", "performance density", "%/Mb"),
    # measured on this machine with onnxruntime: the latency model's estimate per batch (autoprune.deploy.latency)
    Metric("latency_ms", "minimize", "latency", "ms"),
    Metric("bops_reduction", "maximize", "BOPs reduction", "x", objective=False),
    # the accuracy's 95% Wilson interval on the validation samples it was scored on (autoprune.intervals)
    Metric("accuracy_ci_low", "maximize", "accuracy 95% CI low", "%", objective=False),
    Metric("accuracy_ci_high", "maximize", "accuracy 95% CI high", "%", objective=False),
    Metric("val_samples", "maximize", "validation samples", objective=False),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRIC_TABLE}
# metric -> the direction in which it improves, for the metrics a spec may name as objectives
METRICS: dict[str, str] = {m.name: m.direction for m in METRIC_TABLE if m.objective}
COST_METRICS: tuple[str, ...] = tuple(m.name for m in METRIC_TABLE if m.cost)
# the columns of the printed front and of front.csv, in this order
TABLE_METRICS: tuple[str, ...] = ("accuracy", "accuracy_drop", "bops", "macs", "esn_a", "esn_d", "esn_d_prime", "memory_mb", "performance_density")


def label(name: str) -> str:
    """Axis label: ``memory (Mb)``; a name outside the table is its own label."""
    metric = BY_NAME.get(name)
    if metric is None:
        return name
    return f"{metric.label} ({metric.unit})" if metric.unit and metric.unit != "x" else metric.label


_BOUND = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


def parse_bound(text: str, *, names: Sequence[str] | Mapping[str, Any] | None = BY_NAME) -> tuple[str, str, float]:
    """``"accuracy_drop <= 1.5"`` -> ("accuracy_drop", "<=", 1.5): constraints and ``export --select``.

    ``names=None`` takes any metric name (a task's own metric, checked against the task later). Raises
    ValueError naming what is wrong; callers turn it into their field's error.
    """
    match = _BOUND.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not of the form 'metric <= number' or 'metric >= number'")
    metric, op, bound = match.groups()
    if names is not None and metric not in names:
        raise ValueError(f"{text!r} names no metric (metrics: {', '.join(names)})")
    try:
        value = float(bound)
    except ValueError:
        raise ValueError(f"{text!r} has no number after {op}") from None
    return metric, op, value


@dataclass(frozen=True)
class FrontRow:
    """One trial of the front as every table of it shows it (CSV, JSON, printed report, MLflow)."""

    trial: int
    metrics: Mapping[str, float]
    prior: str | None
    summary: str
    values: tuple[float, ...] = ()
    policy: Mapping[str, Any] | None = None
    layers: Mapping[str, Mapping[str, Any]] | None = None
    # how the trial got its policy (TrialRecord.strategy): sampled, prior, djpq, two_stage
    strategy: str = "sampled"
    # the rung of the fidelity ladder the metrics come from: post_training, finetune, final
    rung: str = "finetune"


def front_csv(rows: Sequence[FrontRow], objectives: Sequence[str]) -> str:
    """The front as CSV: trial, the objectives, every other recorded metric, prior, strategy, policy summary.

    Export's ``front.csv`` and the tracker's ``pareto_front.csv`` are this same text; the MLflow run id
    of each row is in the tracker's ``pareto_front.json``."""
    names = list(objectives) + sorted({m for row in rows for m in row.metrics} - set(objectives))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", *names, "prior", "strategy", "policy"])
    for row in rows:
        writer.writerow([row.trial, *(row.metrics.get(m, "") for m in names), row.prior or "", row.strategy, row.summary])
    return buffer.getvalue()


__all__ = ["Metric", "METRIC_TABLE", "BY_NAME", "METRICS", "COST_METRICS", "TABLE_METRICS", "label", "parse_bound", "FrontRow", "front_csv"]
