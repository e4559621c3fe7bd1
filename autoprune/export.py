"""Export the chosen policies of a study: policy files, the front, and a replay report.

Each exported policy is read back from its own file and applied again to the base model, so the
report's accuracies prove that the file replays (fine-tuning is seeded: they match the trial's).

A trial of a learned strategy (DJPQ) exports its learned policy the same way (replayed with our quantizers,
fine-tuned: its accuracy is that of the replay, not the trial's), and beside it the exact DJPQ model the trial
kept (``djpq/trial_NNNN.safetensors``, ``DJPQModel.load(path, base_model)``); loaded again, that model gives
the trial's recorded metric (``replay_matches``). A model file that is gone (a trial run on another machine)
is learned again from the recorded config and seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from autoprune.errors import AutopruneError, FaultError
from autoprune.files import atomic_folder, write_atomic
from autoprune.metrics import BY_NAME, front_csv, parse_bound
from autoprune.policy import Policy
from autoprune.search.pareto import final_front, front_trials, normalised_losses, study_spec_and_base
from autoprune.search.record import FinalRecord, read_confirmations, read_meta, read_trial
from autoprune.search.report import front_table, interval
from autoprune.search.study import SearchContext


@dataclass(frozen=True)
class Exported:
    policies: list[Path]
    report: Path


def check_select(select: str) -> tuple[str, str, float] | None:
    """The bound a ``--select`` names (None for pareto and knee); anything else is refused before any work."""
    if select in ("pareto", "knee"):
        return None
    try:
        return parse_bound(select, names=BY_NAME)
    except ValueError as exc:
        if "names no metric" in str(exc):
            raise AutopruneError("--select", select, f"names no metric (metrics: {', '.join(BY_NAME)})") from None
        raise AutopruneError("--select", select, 'must be pareto, knee, or "metric<=X" / "metric>=Y"') from None


def select_trials(study: optuna.Study, select: str) -> list[FrozenTrial]:
    bound = check_select(select)
    front = front_trials(study)
    if not front:
        raise AutopruneError("--study", study.study_name, "has no completed feasible trial to export")
    if select == "knee":
        return [knee(study, front)]
    if bound is None:
        from autoprune.search.confirm import confirmed_front

        spec, _ = study_spec_and_base(study)
        confirmed = confirmed_front(study, spec)
        return [trial for trial, _ in confirmed] if confirmed else front
    metric, op, limit = bound
    values = [(t, (read_trial(t).metrics or {})[metric]) for t in front]
    chosen = [t for t, v in values if (v <= limit if op == "<=" else v >= limit)]
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


FORMATS = ("policy", "onnx")


def check_export(out: str | Path, *, select: str, format: str, register: str | None, tracking_uri: str | None) -> None:
    """Every argument of an export, checked before the study is read: the folder (a new one, an empty one or
    an earlier export, never a file or a folder of other files), the selection, the format, and for ONNX the
    MLflow store the models are logged to."""
    from autoprune.files import EXPORT_MARKER, check_writable

    check_writable("out", out, kind="folder", replaces=EXPORT_MARKER)
    check_select(select)
    if format not in FORMATS:
        raise AutopruneError("format", format, f"is not an export format ({', '.join(FORMATS)})")
    if register is not None and format != "onnx":
        raise AutopruneError("register", register, "needs --format onnx (the registry holds ONNX models)")
    if format == "onnx":
        from autoprune.tracking.store import check_writable_store

        check_writable_store(tracking_uri, field="tracking_uri")


def export_study(
    ctx: SearchContext, *, out: Path, select: str = "pareto", replay: bool = True, format: str = "policy",
    register: str | None = None, tracking_uri: str | None = None,
) -> Exported:
    """Policies, front and replay report of the study ``ctx`` holds (with its task and, once built, its
    evaluator); ``format="onnx"`` adds each point's ONNX file and packed weights (``points/trial_NNNN/``),
    measured in the report and logged as an MLflow model in the trial's run; ``register`` also registers
    them under that name in the Model Registry."""
    study = ctx.study
    if format not in FORMATS:
        raise AutopruneError("--format", format, f"is not an export format ({', '.join(FORMATS)})")
    if register is not None and format != "onnx":
        raise AutopruneError("--register", register, "needs --format onnx (the registry holds ONNX models)")
    if format == "onnx":
        from autoprune.deps import require

        for package in ("onnx", "onnxruntime"):  # a missing extra fails before the replay's minutes
            require(package)
        if not replay:
            raise AutopruneError("--format", format, "needs the replay: the ONNX file is the replayed compressed model")
    finals = final_front(study, ctx.objectives) if select == "pareto" else []
    trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    chosen = [trials[number] for number, _ in finals] if finals else select_trials(study, select)
    final_of = dict(finals)
    confirmations = read_confirmations(study)
    meta = read_meta(study)
    name = meta.base.metric if meta and meta.base else "accuracy"
    evaluator = ctx.ensure_evaluator(progress=False) if replay or finals else None
    onnx = format == "onnx" or (bool(finals) and _deploy_installed())
    # one latency model for every point: its table's points are measured once for the whole export
    latency = (evaluator.latency or _latency_model(evaluator, ctx)) if onnx and evaluator is not None else None
    out = Path(out)
    # Everything is written to a sibling folder first and swapped in at the end (files.atomic_folder): an
    # interrupted export never leaves a half-written folder, and never destroys the previous one.
    with atomic_folder(out) as staging:
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
            if record.learn is not None:
                row.update(strategy=record.strategy, **_export_learned(record, staging / "djpq" / f"{stem}.safetensors", evaluator, name))
            if trial.number in final_of:
                assert evaluator is not None
                result, fields = _export_final(final_of[trial.number], staging / "points" / stem, ctx=ctx, evaluator=evaluator, name=name)
                row.update(fields)
                if onnx:
                    from autoprune.deploy.point import deploy_point

                    point = deploy_point(
                        result, task=ctx.task, base_model=evaluator.base.model,
                        onnx_path=staging / "points" / stem / "model.onnx", packed_path=staging / "points" / stem / "model.apw", latency=latency,
                    )
                    row["deploy"] = {**point.model_dump(), "onnx_file": f"points/{stem}/model.onnx", "packed_file": f"points/{stem}/model.apw"}
            elif evaluator is not None and replay:
                from autoprune.compress import compress

                replayed = Policy.load(json_path)
                result = compress(evaluator.base.model, replayed, task=ctx.task)
                metrics = evaluator.score(result, test=True)
                row.update(
                    val_accuracy=metrics[name],
                    full_val_accuracy=metrics[f"full_val_{name}"],
                    test_accuracy=metrics[f"test_{name}"],
                    replay_matches=row.get("replay_matches", abs(metrics[name] - recorded[name]) < 1e-6),
                    bops=metrics["bops"],
                    bops_reduction=metrics["bops_reduction"],
                    memory_mb=metrics["memory_mb"],
                    esn_d_prime=metrics["esn_d_prime"],
                    gap=metrics[name] - metrics[f"test_{name}"],
                )
                if format == "onnx":
                    from autoprune.deploy.point import deploy_point

                    point = deploy_point(
                        result, task=ctx.task, base_model=evaluator.base.model,
                        onnx_path=staging / "points" / stem / "model.onnx", packed_path=staging / "points" / stem / "model.apw", latency=latency,
                    )
                    row["deploy"] = {**point.model_dump(), "onnx_file": f"points/{stem}/model.onnx", "packed_file": f"points/{stem}/model.apw"}
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
        rows = [{"trial": r.trial, "prior": r.prior or "", "strategy": r.strategy, **r.metrics, "policy": r.summary} for r in table]
        (staging / "front.json").write_text(json.dumps(rows, indent=2, default=str))
        (staging / "front.csv").write_text(front_csv(table, ctx.objectives.metrics))
        base = meta.base.model_dump() if meta and meta.base else None
        gaps = [abs(r["confirmed"]["gap"] if "confirmed" in r else r["gap"]) for r in report_rows if "confirmed" in r or "gap" in r]
        report = {
            "study": study.study_name, "select": select, "base": base, "task": meta.task if meta else None,
            "rung": "final" if finals else "finetune",
            "confirmed": bool(confirmations) and select == "pareto" and not finals,
            "mean_abs_gap": sum(gaps) / len(gaps) if gaps else None,
            "exported": report_rows,
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (staging / "report.md").write_text(_markdown(report))
    if format == "onnx":
        _log_models(study, out=out, rows=report_rows, task=ctx.task, register=register, tracking_uri=tracking_uri)
    return Exported(policies, out / "report.json")


def _latency_model(evaluator: Any, ctx: Any) -> Any:
    from autoprune.deploy.latency import LatencyModel

    return LatencyModel(evaluator.base.model, input_shape=ctx.task.input_shape)


def _deploy_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(package) is not None for package in ("onnx", "onnxruntime"))


def _export_final(final: FinalRecord, folder: Path, *, ctx: SearchContext, evaluator: Any, name: str) -> tuple[Any, dict[str, Any]]:
    """A finally trained point's model, copied into the export with its policy and loaded back from there:
    ``reloads_exactly`` says the loaded model scores what final training recorded for it."""
    from autoprune.compress import load_compressed

    source = Path(final.weights or "")
    if not source.is_file():
        raise AutopruneError("final model", str(source), "is gone (the cache was cleared or the study was finalized on another machine): run autoprune finalize again")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / "model.safetensors")
    shutil.copyfile(source.with_suffix(".policy.json"), folder / "model.policy.json")
    loaded = load_compressed(folder / "model.safetensors", task=ctx.task)
    value = ctx.task.evaluate(loaded.model, "val")
    metrics = evaluator.score(loaded, test=True, val=value)
    fields = {
        "rung": "final",
        "weights_file": f"points/{folder.name}/model.safetensors",
        "reloads_exactly": value == final.kept[name] and loaded.checksum() == final.checksum,
        "val_accuracy": metrics[name], "full_val_accuracy": metrics[f"full_val_{name}"], "test_accuracy": metrics[f"test_{name}"],
        "bops": metrics["bops"], "bops_reduction": metrics["bops_reduction"], "memory_mb": metrics["memory_mb"], "esn_d_prime": metrics["esn_d_prime"],
        "gap": metrics[name] - metrics[f"test_{name}"],
        "final": {
            "steps": final.steps, "seeds": final.seeds, "kept_seed": final.kept_seed,
            "val_mean": final.mean[name], "val_ci": final.interval.get(name),
            "test_mean": final.mean[f"test_{name}"], "test_ci": final.interval.get(f"test_{name}"),
            "full_val_mean": final.mean.get(f"full_val_{name}"),
            "start_checksum": final.start_checksum, "checksum": final.checksum,
        },
    }
    return loaded, fields


def _log_models(study: optuna.Study, *, out: Path, rows: list[dict[str, Any]], task: Any, register: str | None, tracking_uri: str | None) -> None:
    """Each point's ONNX file as an MLflow model of its trial's run; registered under ``register`` when given.

    A point whose trial has no run in the store (a search tracked elsewhere) is said so on stderr and, when
    it is to be registered, logged in a run of its own in the study's experiment.
    """
    from autoprune.tracking.store import resolve_store

    uri, _ = resolve_store(tracking_uri)
    try:
        _log_rows(study, out=out, rows=rows, task=task, register=register, uri=uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; the export itself is whole already
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise FaultError(
            f"MLflow at {uri} refused the ONNX models ({type(exc).__name__}: {reason}); the export in {out} is complete: "
            "fix the store and run the same export again to log" + (" and register" if register else "") + " them"
        ) from None


def _log_rows(study: optuna.Study, *, out: Path, rows: list[dict[str, Any]], task: Any, register: str | None, uri: str) -> None:
    import sys

    from autoprune.deploy.point import example_input
    from autoprune.deploy.verify import run_onnx
    from autoprune.tracking.models import log_onnx_model, register_onnx_model, registry_tags, trial_run_ids
    from autoprune.tracking.store import open_client

    meta = read_meta(study)
    parent = meta.mlflow_parent_run_id if meta else None
    example = example_input(task)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    runs = trial_run_ids(tracking_uri=uri, parent_run_id=parent)
    for row in rows:
        number = row["trial"]
        run_id = runs.get(number)
        if run_id is None:
            print(f"note: {uri} holds no MLflow run of trial {number} of study {study.study_name}; its ONNX model is not logged there", file=sys.stderr)
            if register is None:
                continue
            client = open_client(uri)
            experiment = client.get_experiment_by_name(study.study_name)
            run_id = client.create_run(experiment.experiment_id if experiment else client.create_experiment(study.study_name), run_name=f"export trial {number}").info.run_id
            client.set_terminated(run_id)
        onnx_file = out / row["deploy"]["onnx_file"]
        model_uri = log_onnx_model(tracking_uri=uri, run_id=run_id, onnx_path=onnx_file, input_example=example, output_example=run_onnx(onnx_file, example))
        row["deploy"]["mlflow_model_uri"] = model_uri
        if register is not None:
            record = read_trial(by_number[number])
            measured = {**(record.metrics or {}), **{k: v for k, v in row.items() if k.startswith("test_")}}
            metrics = {k: v for k, v in measured.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            tags = registry_tags(study=study.study_name, policy_json=json.dumps(record.policy or {}), metrics=metrics)
            row["deploy"]["registered"] = {"name": register, "version": register_onnx_model(tracking_uri=uri, model_uri=model_uri, name=register, tags=tags)}
    report = json.loads((out / "report.json").read_text())
    report["exported"] = rows
    write_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    write_atomic(out / "report.md", _markdown(report))


def _export_learned(record: Any, path: Path, evaluator: Any, name: str) -> dict[str, Any]:
    """Copy (or learn again) the trial's DJPQ model into the export and score it as loaded from there."""
    from autoprune.djpq import DJPQConfig, DJPQModel, learn_policy, learn_two_stage

    path.parent.mkdir(parents=True, exist_ok=True)
    relearned = not (record.artifact and Path(record.artifact).is_file())
    fields: dict[str, Any] = {"djpq_model_file": f"djpq/{path.name}", "djpq_model_relearned": relearned}
    if not relearned:
        shutil.copyfile(record.artifact, path)
    elif evaluator is None:
        return {"djpq_model_file": None, "djpq_model_missing": record.artifact}
    else:
        learn = learn_policy if record.strategy == "djpq" else learn_two_stage
        learn(evaluator.base.model, task=evaluator.task, config=DJPQConfig.from_dict(record.learn)).model.save(path)
    if evaluator is not None:
        loaded = DJPQModel.load(path, evaluator.base.model)
        fields["djpq_model_val_accuracy"] = evaluator.task.evaluate(loaded, "val")
        fields["djpq_model_test_accuracy"] = evaluator.task.evaluate(loaded, "test", full=True)
        fields["replay_matches"] = abs(fields["djpq_model_val_accuracy"] - (record.metrics or {})[name]) < 1e-6
    # DJPQModel.save writes its own policy file next to the model; the export's policy is under policies/
    path.with_suffix(".policy.json").unlink(missing_ok=True)
    return fields


def _markdown(report: dict[str, Any]) -> str:
    base = report.get("base") or {}
    nan = float("nan")
    ci = lambda pair: f"{pair[0]:.2f}-{pair[1]:.2f}" if pair else "-"  # noqa: E731
    confirmed = lambda r, key: f"{r['confirmed'][key + '_mean']:.2f} +- {r['confirmed'][key + '_std']:.2f}" if "confirmed" in r else "-"  # noqa: E731
    # the task's own metric is named as the task names it; "top-1" is only ever top-1 accuracy (the ONNX check)
    metric = base.get("metric", "accuracy")
    unit = "%" if metric == "accuracy" else ""
    lines = [
        f"# Exported policies of study `{report['study']}` ({report['select']}" + (", front recomputed from the confirmation means" if report.get("confirmed") else "") + ")",
        "",
        f"Float base model: validation {metric} {base.get('val_accuracy', nan):.2f}{unit}, test {metric} {base.get('test_accuracy', nan):.2f}{unit}.",
        ("Validation intervals: 95% Wilson score intervals on the validation samples scored; " if metric == "accuracy" else "")
        + f"gap: validation - test {metric}.",
        "",
        f"| trial | policy file | val {metric} (recorded) | val 95% CI | val {metric} (replayed) | test {metric} | gap | confirmed val (mean +- sd) | confirmed test | confirmed gap | BOPs reduction | memory (Mb) | replays |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    finals = [r for r in report["exported"] if "final" in r]
    if finals:
        lines[0] = f"# Finally trained models of study `{report['study']}` (the front after final training)"
        lines[3:7] = [
            "Final training continued each candidate's fine-tuned weights; val and test are means over the seeds with their 95% intervals "
            "(Student t over seeds, or Wilson over the samples with one seed); the model exported is the seed best on validation, "
            "its own scores beside; reloads: the exported weights loaded back score exactly what final training recorded.",
            "",
            "| trial | weights | steps | seeds | val (search) at the proxy rung | final val | val 95% CI | final test | test 95% CI | exported model: val / full val / test | BOPs reduction | memory (Mb) | reloads |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in finals:
            f = r["final"]
            lines.append(
                f"| {r['trial']} | {r['weights_file']} | {f['steps']} | {len(f['seeds'])} | {r['recorded_val_accuracy']:.2f} | {f['val_mean']:.2f} | {ci(f['val_ci'])} | "
                f"{f['test_mean']:.2f} | {ci(f['test_ci'])} | {r['val_accuracy']:.2f} / {r['full_val_accuracy']:.2f} / {r['test_accuracy']:.2f} | "
                f"{r['bops_reduction']:.1f}x | {r['memory_mb']:.4f} | {r['reloads_exactly']} |"
            )
    for r in [r for r in report["exported"] if "final" not in r]:
        gap = f"{r['confirmed']['gap']:+.2f}" if "confirmed" in r else "-"
        lines.append(
            f"| {r['trial']} | {r['policy_file']} | {r['recorded_val_accuracy']:.2f} | {ci(r.get('recorded_val_ci'))} | {r.get('val_accuracy', nan):.2f} | "
            f"{r.get('test_accuracy', nan):.2f} | {r.get('gap', nan):+.2f} | {confirmed(r, 'val')} | {confirmed(r, 'test')} | {gap} | "
            f"{r.get('bops_reduction', nan):.1f}x | {r.get('memory_mb', nan):.4f} | {r.get('replay_matches', '-')} |"
        )
    deployed = [r for r in report["exported"] if "deploy" in r]
    if deployed:
        lines += [
            "",
            "## Deployable files (ONNX with QDQ, packed weights)",
            "",
            "Test split, top-1 accuracy of the class outputs (whatever the task's metric); latency is the median CPU time per batch, onnxruntime and PyTorch's float base model timed side by side (1 thread each), "
            "beside the latency model's estimate of the same file (a per-layer table measured on this machine), the file timed as that model times its layers (median CPU time, 1 thread), and the cost model's BOPs.",
            "",
            "| trial | ONNX file | PyTorch top-1 acc | onnxruntime top-1 acc | top-1 agreement | packed weights (Mb) | cost model weights (Mb) | packed / cost | cost model memory (Mb) | BOPs | onnxruntime ms | latency model ms | onnxruntime CPU ms | PyTorch float base ms | MLflow model |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in deployed:
            d = r["deploy"]
            lines.append(
                f"| {r['trial']} | {d['onnx_file']} | {d['torch_test_accuracy']:.2f} | {d['onnx_test_accuracy']:.2f} | {d['top1_agreement']:.2f} | "
                f"{d['packed_weight_mbit']:.4f} | {d['cost_weight_mbit']:.4f} | {d['packed_over_cost_weight']:.3f} | {d['cost_memory_mbit']:.4f} | "
                f"{d['bops']:.4g} | {d['onnx_ms']:.3f} | {d['latency_model_ms']:.3f} | {d['latency_measured_ms']:.3f} | {d['torch_float_base_ms']:.3f} | {d.get('mlflow_model_uri', '-')} |"
            )
        lines += [
            "",
            "onnxruntime's kernels per point (its integer kernels are 8-bit: weights or activations below 8 bits run their values on 8-bit kernels, or in float):",
            "",
        ]
        for r in deployed:
            d = r["deploy"]
            kernels = ", ".join(f"{name} {op}" for name, op in d.get("runtime_kernels", {}).items())
            narrow = d.get("sub8_on_integer_kernels", [])
            lines.append(
                f"- trial {r['trial']}: {len(d.get('integer_kernel_layers', []))} of {len(d.get('runtime_kernels', {}))} layers on integer kernels"
                + (f" ({', '.join(narrow)} with sub-8-bit values)" if narrow else "") + f": {kernels}"
            )
    learned = [r for r in report["exported"] if r.get("djpq_model_file")]
    if learned:
        lines += ["", "Learned (DJPQ) trials: the policy row is its replay with our quantizers; the exact DJPQ model, loaded again:", ""]
        lines += [f"| trial | strategy | model file | val {metric} (loaded) | test {metric} (loaded) | reproduces the trial |", "|---|---|---|---|---|---|"]
        for r in learned:
            lines.append(
                f"| {r['trial']} | {r['strategy']} | {r['djpq_model_file']} | {r.get('djpq_model_val_accuracy', float('nan')):.2f} | "
                f"{r.get('djpq_model_test_accuracy', float('nan')):.2f} | {r.get('replay_matches', '-')} |"
            )
    if report.get("mean_abs_gap") is not None:
        lines += ["", f"Mean |validation - test| {metric} over the exported points: {report['mean_abs_gap']:.2f}" + (" (confirmation means)." if report.get("confirmed") else ".")]
    return "\n".join(lines) + "\n"
