"""The Pareto table printed at the end of a search and by `autoprune pareto`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import optuna

from autoprune.metrics import COST_METRICS, TABLE_METRICS, FrontRow
from autoprune.search.objectives import ObjectiveSpec
from autoprune.search.pareto import final_front, front_trials, hypervolume, hypervolume_of, normalised_losses, scored_trials
from autoprune.search.record import FinalRecord, read_meta, read_trial


def front_table(study: optuna.Study) -> list[FrontRow]:
    """The front at the highest rung the study reached, as rows, best first objective first: the final front
    once candidates were finally trained (``search.finalize``), else the search's front. The one table behind
    the printed report, ``pareto --json`` and export's front.csv/front.json."""
    meta = read_meta(study)
    front = final_front(study, ObjectiveSpec.from_dict(meta.objectives)) if meta is not None else []
    return final_rows(study, front) if front else proxy_table(study)


def proxy_table(study: optuna.Study) -> list[FrontRow]:
    """The search's front (its trials' told values: fine-tuned, or post-training where the space does not fine-tune)."""
    from autoprune.policy import Policy

    rows = []
    for trial in front_trials(study):
        record = read_trial(trial)
        policy = Policy.from_dict(record.policy or {})
        summary = policy.summary(list(policy.layers))
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
            number, metrics, record.prior, policy.summary(list(policy.layers)), tuple(objectives.values(final.mean)), record.policy, record.layers,
            record.strategy, "final",
        ))
    return rows


def front_rows(study: optuna.Study) -> dict[str, Any]:
    """The front at the highest rung reached, with the study's objectives, base model and hypervolume."""
    table = front_table(study)
    rows = [
        {
            "trial": row.trial,
            "prior": row.prior,
            "strategy": row.strategy,
            **{m: row.metrics[m] for m in TABLE_METRICS if m in row.metrics},
            "bops_reduction": row.metrics.get("bops_reduction"),
            "accuracy_ci": interval(row.metrics),
            "test_accuracy": row.metrics.get("test_accuracy"),
            "test_accuracy_ci": interval(row.metrics, "test_accuracy"),
            "val_samples": row.metrics.get("val_samples"),
            "rung": row.rung,
            "policy": row.summary,
        }
        for row in table
    ]
    meta = read_meta(study)
    return {
        "study": study.study_name,
        "objectives": meta.objectives if meta else None,
        "base": meta.base.model_dump() if meta and meta.base else None,
        "trials": len(study.trials),
        "scored": len(scored_trials(study)),
        "rung": table[0].rung if table else None,
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
    final = data.get("rung") == "final"
    where = "after final training (mean over seeds)" if final else "of the search's fine-tuned trials"
    table = Table(title=f"Pareto front of study {data['study']!r} ({objectives}), {where}")
    table.add_column("trial", justify="right")
    table.add_column("strategy")
    for metric in TABLE_METRICS:
        table.add_column(_HEADERS.get(metric, metric), justify="right")
        if metric == "accuracy":
            table.add_column("acc 95% CI", justify="right")
            if final:
                table.add_column("test acc", justify="right")
                table.add_column("test 95% CI", justify="right")
    table.add_column("BOPs x", justify="right")
    table.add_column("policy (order, layer:k<keep>W<bits>A<bits>)", overflow="fold")
    for row in data["front"]:
        label = f"{row['trial']}" + ("*" if row["prior"] else "")
        cells = []
        for m in TABLE_METRICS:
            cells.append(_fmt(row.get(m)))
            if m == "accuracy":
                cells.append(_fmt_interval(row["accuracy_ci"]))
                if final:
                    cells += [_fmt(row.get("test_accuracy")), _fmt_interval(row.get("test_accuracy_ci"))]
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


__all__ = ["front_rows", "front_table", "proxy_table", "final_rows", "print_front", "print_predicted", "wide_console", "COST_METRICS", "TABLE_METRICS"]
