"""The Pareto table printed at the end of a search and by `autoprune pareto`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import optuna

from autoprune.metrics import COST_METRICS, TABLE_METRICS, FrontRow
from autoprune.search.objectives import ObjectiveSpec
from autoprune.search.pareto import final_front, front_trials, hypervolume, hypervolume_of, normalised_losses, scored_trials
from autoprune.search.record import FinalRecord, read_finals, read_meta, read_trial


def front_table(study: optuna.Study) -> list[FrontRow]:
    """The front at the highest rung the study reached, as rows, best first objective first: the final front
    once candidates were finally trained (``search.finalize``), else the search's front. The one table behind
    the printed report, ``pareto --json`` and export's front.csv/front.json."""
    meta = read_meta(study)
    front = final_front(study, ObjectiveSpec.from_dict(meta.objectives)) if meta is not None else []
    return final_rows(study, front) if front else proxy_table(study)


def earlier_finals_note(study: optuna.Study) -> str | None:
    """A line saying which stored final points the final front leaves out (trained for other steps by an
    earlier finalize); None when there are none."""
    meta = read_meta(study)
    if meta is None or meta.final_steps is None:
        return None
    other: dict[int, int] = {}
    for final in read_finals(study).values():
        if final.steps != meta.final_steps:
            other[final.steps] = other.get(final.steps, 0) + 1
    if not other:
        return None
    counts = ", ".join(f"{n} at {steps:,} steps" for steps, n in sorted(other.items()))
    return (
        f"note: this front is of the points trained for {meta.final_steps:,} steps; points finalized before with other steps stay "
        f"stored but off it ({counts}); finalizing again with their steps brings them back"
    )


def proxy_table(study: optuna.Study) -> list[FrontRow]:
    """The search's front (its trials' told values: fine-tuned, or post-training where the space does not fine-tune)."""
    from autoprune.policy import Policy

    rows = []
    for trial in front_trials(study):
        record = read_trial(trial)
        policy = Policy.from_dict(record.policy or {})
        summary = policy.summary(list(policy.layers), applied=record.layers)
        rung = record.rung or "finetune"
        rows.append(FrontRow(trial.number, record.metrics or {}, record.prior, summary, tuple(trial.values), record.policy, record.layers, record.strategy, rung))
    return rows


def final_rows(study: optuna.Study, front: Sequence[tuple[int, FinalRecord]]) -> list[FrontRow]:
    """Rows of finally trained points: the mean metrics over their seeds, with their 95% intervals as the
    ``{metric}_ci_low/high`` every table reads."""
    from autoprune.policy import Policy

    meta = read_meta(study)
    assert meta is not None, "a finalized study was created by autoprune search"
    objectives = ObjectiveSpec.from_dict(meta.objectives)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows = []
    for number, final in front:
        record = read_trial(trials[number])
        policy = Policy.from_dict(record.policy or {})
        bounds = {f"{m}_ci_{side}": value for m, pair in final.interval.items() for side, value in zip(("low", "high"), pair)}
        metrics = {**final.mean, **bounds}
        rows.append(FrontRow(
            number, metrics, record.prior, policy.summary(list(policy.layers), applied=record.layers), tuple(objectives.values(final.mean)), record.policy, record.layers,
            record.strategy, "final",
        ))
    return rows


def metric_name(study: optuna.Study) -> str:
    """The task's metric as the study records it (``accuracy`` for the built-in tasks; a user task's own name)."""
    meta = read_meta(study)
    return meta.base.metric if meta and meta.base else "accuracy"


def table_metrics(metric: str, *, latency: bool = False) -> tuple[str, ...]:
    """The printed front's metric columns: the task's metric and its drop where accuracy's stand; ``latency_ms``
    after them when the trials measured it."""
    swap = {"accuracy": metric, "accuracy_drop": f"{metric}_drop"}
    return tuple(swap.get(m, m) for m in TABLE_METRICS) + (("latency_ms",) if latency else ())


def front_rows(study: optuna.Study) -> dict[str, Any]:
    """The front at the highest rung reached, with the study's objectives, base model and hypervolume."""
    table = front_table(study)
    name = metric_name(study)
    columns = table_metrics(name, latency=any("latency_ms" in row.metrics for row in table))
    rows = [
        {
            "trial": row.trial,
            "prior": row.prior,
            "strategy": row.strategy,
            **{m: row.metrics[m] for m in columns if m in row.metrics},
            "bops_reduction": row.metrics.get("bops_reduction"),
            f"{name}_ci": interval(row.metrics, name),
            f"test_{name}": row.metrics.get(f"test_{name}"),
            f"test_{name}_ci": interval(row.metrics, f"test_{name}"),
            "val_samples": row.metrics.get("val_samples"),
            "rung": row.rung,
            "policy": row.summary,
        }
        for row in table
    ]
    meta = read_meta(study)
    return {
        "study": study.study_name,
        "metric": name,
        "objectives": meta.objectives if meta else None,
        "base": meta.base.model_dump() if meta and meta.base else None,
        "trials": len(study.trials),
        "scored": len(scored_trials(study)),
        "rung": table[0].rung if table else None,
        "failed": failure_counts(study),
        "hypervolume": _hypervolume(study, table) if meta and meta.base else None,
        "front": rows,
    }


def _hypervolume(study: optuna.Study, table: Sequence[FrontRow]) -> float:
    """The hypervolume at the rung the table shows: the final points' own, else the search's."""
    if not table or table[0].rung != "final":
        return hypervolume(study)
    meta = read_meta(study)
    assert meta is not None and meta.base is not None
    spec = ObjectiveSpec.from_dict(meta.objectives)
    return hypervolume_of([normalised_losses(row.metrics, spec, meta.base.reference()) for row in table])


def failure_counts(study: optuna.Study) -> dict[str, int]:
    """Why trials failed (their recorded reason, cut at its first colon), most frequent first: interrupted
    and skipped trials, which are run again, are left out."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        record = read_trial(trial)
        if record.interrupted:
            continue
        reason = (record.failure or "no reason recorded").strip()
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def interval(metrics: Mapping[str, float], metric: str = "accuracy") -> tuple[float, float] | None:
    """The metric's recorded 95% confidence interval, when the evaluator estimated one."""
    low, high = metrics.get(f"{metric}_ci_low"), metrics.get(f"{metric}_ci_high")
    return (low, high) if low is not None and high is not None else None


def _fmt_interval(ci: Sequence[float] | None) -> str:
    return f"{ci[0]:.1f}-{ci[1]:.1f}" if ci else "-"


# short column headers where the metric's name would widen the table
_HEADERS = {"performance_density": "acc/Mb", "accuracy_drop": "drop", "latency_ms": "ms (model)"}


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
    """Print ``front_rows``' data as a table, with the hypervolume and the base model below it; a search
    whose trials all failed says so, with their most frequent reason, instead of an empty table alone."""
    from rich.table import Table

    name = data.get("metric", "accuracy")
    objectives = ", ".join(f"{o['direction'][:3]} {o['metric']}" for o in (data["objectives"] or {}).get("objectives", []))
    base = data["base"] or {}
    final = data.get("rung") == "final"
    where = "after final training (mean over seeds)" if final else "of the search's fine-tuned trials"
    with_ci = any(row.get(f"{name}_ci") for row in data["front"])
    table = Table(title=f"Pareto front of study {data['study']!r} ({objectives}), {where}")
    table.add_column("trial", justify="right")
    table.add_column("strategy")
    columns = table_metrics(name, latency=any("latency_ms" in row for row in data["front"]))
    short = "acc" if name == "accuracy" else name
    for metric in columns:
        table.add_column(_HEADERS.get(metric, "drop" if metric == f"{name}_drop" else metric), justify="right")
        if metric == name and with_ci:
            table.add_column(f"{short} 95% CI", justify="right")
        if metric == name and final:
            table.add_column(f"test {short}", justify="right")
            table.add_column(f"test {short} 95% CI", justify="right")
    table.add_column("BOPs x", justify="right")
    table.add_column("policy (order, layer:k<keep>W<bits>A<bits>)", overflow="fold")
    for row in data["front"]:
        label = f"{row['trial']}" + ("*" if row["prior"] else "")
        cells = []
        for m in columns:
            cells.append(_fmt(row.get(m)))
            if m == name and with_ci:
                cells.append(_fmt_interval(row.get(f"{name}_ci")))
            if m == name and final:
                cells += [_fmt(row.get(f"test_{name}")), _fmt_interval(row.get(f"test_{name}_ci"))]
        table.add_row(label, row["strategy"], *cells, _fmt(row.get("bops_reduction")), row["policy"])
    console = console or wide_console()
    console.print(table)
    hv = data["hypervolume"]
    base_line = ""
    if base:
        cost = base.get("cost", {})
        unit = "%" if name == "accuracy" else ""
        base_line = f"; float base model: {name} {base['val_accuracy']:.2f}{unit}, BOPs {_fmt(float(cost.get('bops', 0)))}"
        if "latency_ms" in cost:
            base_line += f", latency {float(cost['latency_ms']):.3f} ms"
    console.print(
        f"{len(data['front'])} Pareto-optimal of {data['scored']} feasible trials ({data['trials']} in all); "
        f"hypervolume {hv:.4f}{base_line}; * = warm-start prior" if hv is not None else f"{data['trials']} trials"
    )
    failed = data.get("failed") or {}
    if not data["front"] and failed:
        reason, count = next(iter(failed.items()))
        console.print(f"no trial reached the front: {sum(failed.values())} failed, {count} of them with: {reason}")
    samples = sorted({int(r["val_samples"]) for r in data["front"] if r.get("val_samples")})
    if samples and with_ci:
        console.print(f"{name} 95% CI: Wilson score interval on the {'/'.join(map(str, samples))} validation samples each {name} was scored on")


def print_predicted(points: Sequence[Any], *, console: Any = None) -> None:
    """Rung 0 before any trial: the integer program's policy per cost budget, its cost and predicted loss increase."""
    from rich.table import Table

    if not points:
        return
    table = Table(title="Predicted front (rung 0: the integer program over the sensitivity table, one policy per cost budget)")
    for column in ("prior", points[0].metric, "predicted loss increase", "policy"):
        table.add_column(column, justify="left" if column in ("prior", "policy") else "right", overflow="fold")
    for point in points:
        table.add_row(point.tag, _fmt(point.cost), f"{point.predicted_loss:.4g}", point.summary)
    (console or wide_console()).print(table)


__all__ = [
    "front_rows", "front_table", "proxy_table", "earlier_finals_note", "final_rows", "print_front", "print_predicted", "metric_name", "table_metrics", "failure_counts",
    "wide_console", "COST_METRICS", "TABLE_METRICS",
]
