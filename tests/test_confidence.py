"""Confidence intervals through the front (record, plots, table, export) and the --confirm stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autoprune import plots
from autoprune.search.evaluate import Evaluator
from autoprune.search.lifecycle import interval_fields
from autoprune.task import Task


def _task(metric=None) -> Task:
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3))
    data = TensorDataset(torch.randn(100, 1, 8), torch.randint(0, 3, (100,)))
    return Task.from_model(model, train=data, val=data, metric=metric, signal_steps=0)


def test_accuracy_gets_the_wilson_interval_of_the_samples_scored():
    task = _task()
    assert task.scored_samples("val") == 100 and task.metric_is_accuracy
    metrics = Evaluator.interval(SimpleNamespace(task=task), 95.0)  # type: ignore[arg-type]
    assert metrics["val_samples"] == 100
    assert (metrics["accuracy_ci_low"], metrics["accuracy_ci_high"]) == pytest.approx((88.825, 97.846), abs=0.005)
    task.configure(val_samples=40)
    assert task.scored_samples("val") == 40 and task.scored_samples("val", full=True) == 100


def test_a_metric_that_is_not_an_accuracy_gets_no_interval():
    task = _task(metric=lambda model, loader: 0.5)
    assert not task.metric_is_accuracy
    assert Evaluator.interval(SimpleNamespace(task=task), 0.5) == {}  # type: ignore[arg-type]


def test_record_fields_come_from_the_evaluator_metrics():
    fields = interval_fields({"accuracy": 95.0, "accuracy_ci_low": 88.8, "accuracy_ci_high": 97.8, "val_samples": 100.0})
    assert fields == {"metric_interval": {"accuracy": (88.8, 97.8)}, "val_samples": 100}
    assert interval_fields({"accuracy": 95.0}) == {}


def test_front_plots_draw_error_bars(tmp_path: Path):
    point = lambda n, acc: plots.TrialPoint(n, {"accuracy": acc, "bops": 10.0**n, "accuracy_ci_low": acc - 2, "accuracy_ci_high": acc + 1}, rank=0)  # noqa: E731
    points = [point(1, 90.0), point(2, 95.0)]
    assert plots.error_bars(points, "accuracy") == ([2.0, 2.0], [1.0, 1.0])
    assert plots.error_bars(points, "bops") is None
    assert plots.error_bars([*points, plots.TrialPoint(3, {"accuracy": 80.0, "bops": 1.0}, rank=0)], "accuracy") is None
    html = plots.pareto_html(points, ["accuracy", "bops"], tmp_path / "front.html").read_text()
    assert '"arrayminus":[2.0,2.0]' in html.replace(" ", "")
    assert plots.pareto_png(points, ["accuracy", "bops"], tmp_path / "front.png").stat().st_size > 0


SPACE = """
layers:
  _default:
    keep_ratio: {choices: [0.5, 1.0]}
    w_bits: {choices: [2, 8]}
    a_bits: 8
policy:
  finetune_steps: 20
"""


@pytest.mark.e2e
def test_search_with_confirmation_records_intervals_and_exports_the_gap(tmp_path: Path):
    (tmp_path / "space.yaml").write_text(SPACE)
    storage, tracking = f"sqlite:///{tmp_path / 'study.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    args = ["search", "--space", str(tmp_path / "space.yaml"), "--trials", "3", "--no-priors", "--study", "s", "--storage", storage,
            "--tracking-uri", tracking, "--quiet", "--confirm", "2", "--export", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-m", "autoprune.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "acc 95% CI" in done.stdout

    import optuna

    from autoprune.search.record import read_confirmations, read_trial

    study = optuna.load_study(study_name="s", storage=storage)
    records = [read_trial(t) for t in study.trials]
    assert all(r.val_samples == 360 and r.metric_interval["accuracy"][0] < r.metrics["accuracy"] < r.metric_interval["accuracy"][1] for r in records)
    confirmations = read_confirmations(study)
    assert confirmations and all(c.seeds == [0, 1] and "test_accuracy" in c.mean for c in confirmations.values())

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["confirmed"] and report["mean_abs_gap"] is not None
    rows = report["exported"]
    assert {r["trial"] for r in rows} <= set(confirmations)
    assert all(r["confirmed"]["gap"] == pytest.approx(r["confirmed"]["val_mean"] - r["confirmed"]["test_mean"]) for r in rows)
    assert "confirmed gap" in (tmp_path / "out" / "report.md").read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id], filter_string="metrics.accuracy_ci_low > 0")
    assert len(runs) == 3
