"""The Pareto table printed at the end of a search and by `autoprune pareto`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import optuna

from autoprune.metrics import COST_METRICS, TABLE_METRICS, FrontRow
from autoprune.search.pareto import front_trials, hypervolume, scored_trials
from autoprune.search.record import read_meta, read_trial


def front_table(study: optuna.Study) -> list[FrontRow]:
    """The front as rows, best first objective first: the one table behind the printed report,
    ``pareto --json`` and export's front.csv/front.json."""
    from autoprune.policy import Policy

    rows = []
    for trial in front_trials(study):
        record = read_trial(trial)
        policy = Policy.from_dict(record.policy or {})
        summary = policy.summary(list(policy.layers))
        rows.append(FrontRow(trial.number, record.metrics or {}, record.prior, summary, tuple(trial.values), record.policy, record.layers, record.strategy))
    return rows


def front_rows(study: optuna.Study) -> dict[str, Any]:
    rows = [
        {
            "trial": row.trial,
            "prior": row.prior,
            "strategy": row.strategy,
            **{m: row.metrics[m] for m in TABLE_METRICS if m in row.metrics},
            "bops_reduction": row.metrics.get("bops_reduction"),
            "accuracy_ci": interval(row.metrics),
            "val_samples": row.metrics.get("val_samples"),
            "policy": row.summary,
        }
        for row in front_table(study)
    ]
    meta = read_meta(study)
    return {
        "study": study.study_name,
        "objectives": meta.objectives if meta else None,
        "base": meta.base.model_dump() if meta and meta.base else None,
        "trials": len(study.trials),
        "scored": len(scored_trials(study)),
        "hypervolume": hypervolume(study) if meta and meta.base else None,
        "front": rows,
    }


def interval(metrics: Mapping[str, float], metric: str = "accuracy") -> tuple[float, float] | None:
    """The metric's recorded 95% confidence interval, when the evaluator estimated one."""
    low, high = metrics.get(f"{metric}_ci_low"), metrics.get(f"{metric}_ci_high")
    return (low, high) if low is not None and high is not None else None


def _fmt_interval(ci: Sequence[float] | None) -> str:
    return f"{ci[0]:.1f}-{ci[1]:.1f}" if ci else "-"


# short column headers where the metric's name would widen the table
_HEADERS = {"performance_density": "acc/Mb", "accuracy_drop": "drop"}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        magnitude = abs(value)
        for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if magnitude >= scale:
                return f"{value / scale:.3g}{unit}"
        return f"{value:.3g}" if magnitude < 100 else f"{value:.1f}"
    return str(value)


def wide_console() -> Any:
    """A rich console that does not squeeze tables to 80 columns when the output is a file or pipe."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def print_front(data: Mapping[str, Any], *, console: Any = None) -> None:
    """Print ``front_rows``' data as a table, with the hypervolume and the base model below it."""
    from rich.table import Table

    objectives = ", ".join(f"{o['direction'][:3]} {o['metric']}" for o in (data["objectives"] or {}).get("objectives", []))
    base = data["base"] or {}
    table = Table(title=f"Pareto front of study {data['study']!r} ({objectives})")
    table.add_column("trial", justify="right")
    table.add_column("strategy")
    for metric in TABLE_METRICS:
        table.add_column(_HEADERS.get(metric, metric), justify="right")
        if metric == "accuracy":
            table.add_column("acc 95% CI", justify="right")
    table.add_column("BOPs x", justify="right")
    table.add_column("policy (order, layer:k<keep>W<bits>A<bits>)", overflow="fold")
    for row in data["front"]:
        label = f"{row['trial']}" + ("*" if row["prior"] else "")
        cells = [c for m in TABLE_METRICS for c in ((_fmt(row.get(m)), _fmt_interval(row["accuracy_ci"])) if m == "accuracy" else (_fmt(row.get(m)),))]
        table.add_row(label, row["strategy"], *cells, _fmt(row.get("bops_reduction")), row["policy"])
    console = console or wide_console()
    console.print(table)
    hv = data["hypervolume"]
    base_line = ""
    if base:
        cost = base.get("cost", {})
        base_line = f"; float base model: accuracy {base['val_accuracy']:.2f}%, BOPs {_fmt(float(cost.get('bops', 0)))}"
    console.print(
        f"{len(data['front'])} Pareto-optimal of {data['scored']} feasible trials ({data['trials']} in all); "
        f"hypervolume {hv:.4f}{base_line}; * = warm-start prior" if hv is not None else f"{data['trials']} trials"
    )
    samples = sorted({int(r["val_samples"]) for r in data["front"] if r.get("val_samples")})
    if samples:
        console.print(f"acc 95% CI: Wilson score interval on the {'/'.join(map(str, samples))} validation samples each accuracy was scored on")


__all__ = ["front_rows", "front_table", "print_front", "wide_console", "COST_METRICS", "TABLE_METRICS"]
