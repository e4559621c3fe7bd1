"""Export the chosen policies of a study: policy files, the front, and a replay report.

Each exported policy is read back from its own file and applied again to the base model, so the
report's accuracies prove that the file replays (fine-tuning is seeded: they match the trial's).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from autoprune.errors import AutopruneError
from autoprune.metrics import BY_NAME, front_csv, parse_bound
from autoprune.policy import Policy
from autoprune.search.pareto import front_trials, normalised_losses, study_spec_and_base
from autoprune.search.record import read_meta, read_trial
from autoprune.search.report import front_table, interval


@dataclass(frozen=True)
class Exported:
    policies: list[Path]
    report: Path


def select_trials(study: optuna.Study, select: str) -> list[FrozenTrial]:
    front = front_trials(study)
    if not front:
        raise AutopruneError("--study", study.study_name, "has no completed feasible trial to export")
    if select == "pareto":
        from autoprune.search.confirm import confirmed_front

        spec, _ = study_spec_and_base(study)
        confirmed = confirmed_front(study, spec)
        return [trial for trial, _ in confirmed] if confirmed else front
    if select == "knee":
        return [knee(study, front)]
    try:
        metric, op, bound = parse_bound(select, names=BY_NAME)
    except ValueError as exc:
        if "names no metric" in str(exc):
            raise AutopruneError("--select", select, f"names no metric (metrics: {', '.join(BY_NAME)})") from None
        raise AutopruneError("--select", select, 'must be pareto, knee, or "metric<=X" / "metric>=Y"') from None
    values = [(t, (read_trial(t).metrics or {})[metric]) for t in front]
    chosen = [t for t, v in values if (v <= bound if op == "<=" else v >= bound)]
    if not chosen:
        raise AutopruneError("--select", select, "matches no point of the Pareto front")
    return chosen


def knee(study: optuna.Study, front: list[FrozenTrial]) -> FrozenTrial:
    """The front point closest to the ideal point in the normalised objective space."""
    spec, base = study_spec_and_base(study)
    losses = np.array([normalised_losses(read_trial(t).metrics or {}, spec, base) for t in front])
    low, high = losses.min(axis=0), losses.max(axis=0)
    scaled = (losses - low) / np.where(high > low, high - low, 1.0)
    return front[int(np.argmin(np.linalg.norm(scaled, axis=1)))]


def export_study(study: optuna.Study, *, out: Path, select: str = "pareto", replay: bool = True) -> Exported:
    from autoprune.search.runner import context_from_study

    from autoprune.search.record import read_confirmations

    chosen = select_trials(study, select)
    confirmations = read_confirmations(study)
    meta = read_meta(study)
    name = meta.base.metric if meta and meta.base else "accuracy"
    ctx = context_from_study(study)
    evaluator = ctx.ensure_evaluator(progress=False) if replay else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written to a sibling folder first and swapped in at the end: an interrupted
    # export never leaves a half-written folder, and never destroys the previous one.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        policies, report_rows = [], []
        for trial in chosen:
            record = read_trial(trial)
            policy = Policy.from_dict(record.policy or {})
            stem = f"trial_{trial.number:04d}"
            policy.save(staging / "policies" / f"{stem}.yaml")
            json_path = policy.save(staging / "policies" / f"{stem}.json")
            policies.append(out / "policies" / f"{stem}.json")
            recorded = record.metrics or {}
            row: dict[str, Any] = {
                "trial": trial.number,
                "policy_file": f"policies/{stem}.json",
                "recorded_val_accuracy": recorded[name],
                "recorded_val_ci": interval(recorded, name),
                "val_samples": record.val_samples,
            }
            if evaluator is not None:
                from autoprune.compress import compress

                replayed = Policy.load(json_path)
                result = compress(evaluator.base.model, replayed, task=ctx.task)
                metrics = evaluator.score(result, test=True)
                row.update(
                    val_accuracy=metrics[name],
                    full_val_accuracy=metrics[f"full_val_{name}"],
                    test_accuracy=metrics[f"test_{name}"],
                    replay_matches=abs(metrics[name] - recorded[name]) < 1e-6,
                    bops=metrics["bops"],
                    bops_reduction=metrics["bops_reduction"],
                    memory_mb=metrics["memory_mb"],
                    esn_d_prime=metrics["esn_d_prime"],
                    gap=metrics[name] - metrics[f"test_{name}"],
                )
            confirmation = confirmations.get(trial.number)
            if confirmation is not None:
                mean, std = confirmation.mean, confirmation.std
                row["confirmed"] = {
                    "seeds": confirmation.seeds,
                    "val_mean": mean[name], "val_std": std[name],
                    "test_mean": mean[f"test_{name}"], "test_std": std[f"test_{name}"],
                    "gap": mean[name] - mean[f"test_{name}"],
                }
            report_rows.append(row)
        table = front_table(study)
        rows = [{"trial": r.trial, "prior": r.prior or "", **r.metrics, "policy": r.summary} for r in table]
        (staging / "front.json").write_text(json.dumps(rows, indent=2, default=str))
        (staging / "front.csv").write_text(front_csv(table, ctx.objectives.metrics))
        base = meta.base.model_dump() if meta and meta.base else None
        gaps = [abs(r["confirmed"]["gap"] if "confirmed" in r else r["gap"]) for r in report_rows if "confirmed" in r or "gap" in r]
        report = {
            "study": study.study_name, "select": select, "base": base, "task": meta.task if meta else None,
            "confirmed": bool(confirmations) and select == "pareto",
            "mean_abs_gap": sum(gaps) / len(gaps) if gaps else None,
            "exported": report_rows,
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (staging / "report.md").write_text(_markdown(report))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.replace(old)
            staging.replace(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(policies, out / "report.json")


def _markdown(report: dict[str, Any]) -> str:
    base = report.get("base") or {}
    nan = float("nan")
    ci = lambda pair: f"{pair[0]:.2f}-{pair[1]:.2f}" if pair else "-"  # noqa: E731
    confirmed = lambda r, key: f"{r['confirmed'][key + '_mean']:.2f} +- {r['confirmed'][key + '_std']:.2f}" if "confirmed" in r else "-"  # noqa: E731
    lines = [
        f"# Exported policies of study `{report['study']}` ({report['select']}" + (", front recomputed from the confirmation means" if report.get("confirmed") else "") + ")",
        "",
        f"Float base model: validation {base.get('val_accuracy', nan):.2f}%, test {base.get('test_accuracy', nan):.2f}%.",
        "Validation intervals: 95% Wilson score intervals on the validation samples scored; gap: validation - test (points).",
        "",
        "| trial | policy file | val acc (recorded) | val 95% CI | val acc (replayed) | test acc | gap | confirmed val (mean +- sd) | confirmed test | confirmed gap | BOPs reduction | memory (Mb) | replays |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["exported"]:
        gap = f"{r['confirmed']['gap']:+.2f}" if "confirmed" in r else "-"
        lines.append(
            f"| {r['trial']} | {r['policy_file']} | {r['recorded_val_accuracy']:.2f} | {ci(r.get('recorded_val_ci'))} | {r.get('val_accuracy', nan):.2f} | "
            f"{r.get('test_accuracy', nan):.2f} | {r.get('gap', nan):+.2f} | {confirmed(r, 'val')} | {confirmed(r, 'test')} | {gap} | "
            f"{r.get('bops_reduction', nan):.1f}x | {r.get('memory_mb', nan):.4f} | {r.get('replay_matches', '-')} |"
        )
    if report.get("mean_abs_gap") is not None:
        lines += ["", f"Mean |validation - test| over the exported points: {report['mean_abs_gap']:.2f} points" + (" (confirmation means)." if report.get("confirmed") else ".")]
    return "\n".join(lines) + "\n"
