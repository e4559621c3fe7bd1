"""DJPQ and its two-stage baseline as strategies of the study: the spec, a trial's job and its result, and (e2e)
`autoprune search --space <djpq spec>` through pareto, MLflow, export and apply."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn
from torch.utils.data import TensorDataset

from autoprune.errors import AutopruneError
from autoprune.search.space import SpaceSpec
from autoprune.search.strategies import run_job
from autoprune.specs import shipped
from cli_support import autoprune, storage_of, tracking_of

SHAPE = (1, 8, 8)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
    )


def test_shipped_djpq_space_samples_the_strengths_on_a_log_scale() -> None:
    space = SpaceSpec.load(shipped("search_spaces", "djpq")).bind(tiny(), input_shape=SHAPE)
    dims = space.distributions()
    assert set(dims) == {"djpq.beta", "djpq.gamma"}
    assert dims["djpq.beta"].log and dims["djpq.gamma"].log
    job = space.job({"djpq.beta": 1e-7, "djpq.gamma": 1e-4}, seed=5, study_name="s/1")
    assert (job.strategy, job.learn["beta"], job.learn["gamma"], job.learn["seed"], job.learn["steps"]) == ("djpq", 1e-7, 1e-4, 5, 300)
    assert job.replay == {"finetune_steps": 150} and job.policy is None
    assert Path(job.artifact).parent.name == "s_1"


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"strategy": "djpq", "djpq": {"betta": 1.0}}, "space.djpq"),
        ({"strategy": "djpq", "djpq": {"seed": 3}}, "space.djpq"),
        ({"strategy": "djpq", "djpq": {"beta": -1.0}}, "space.djpq.beta"),
        ({"strategy": "djpq", "djpq": {"steps": {"low": 10, "high": 5}}}, "space.djpq.steps"),
        ({"strategy": "djpq", "layers": {"_default": {"w_bits": 4}}}, "space.layers"),
        ({"strategy": "two_stage", "policy": {"finetune_steps": {"choices": [10, 20]}}}, "space.policy.finetune_steps"),
        ({"djpq": {"beta": 1e-6}}, "space.djpq"),
        ({"strategy": "anneal"}, "space.strategy"),
    ],
)
def test_bad_learned_specs_name_their_field(spec: dict, field: str) -> None:
    with pytest.raises(AutopruneError) as info:
        SpaceSpec.from_dict(spec)
    assert info.value.field == field


@pytest.mark.parametrize("strategy", ["djpq", "two_stage"])
def test_a_learned_trial_is_scored_as_learned_and_keeps_its_model(strategy: str, tmp_path: Path) -> None:
    from autoprune.djpq import DJPQModel
    from autoprune.search.evaluate import Evaluator
    from autoprune.search.strategies import TrialJob, learned_config
    from autoprune.task import Task

    torch.set_num_threads(1)
    data = TensorDataset(torch.randn(64, *SHAPE), torch.randint(0, 4, (64,)))
    model = tiny()
    task = Task.from_model(model, train=data, val=data, signal_steps=0, device="cpu")
    evaluator = Evaluator(task, task.base(progress=False))
    # alpha_th far above every alpha: every group is pruned down to one channel, so the cost must fall
    config = learned_config({"steps": 3, "batch_size": 16, "alpha_th": 1e6}, seed=0)
    job = TrialJob(strategy=strategy, learn=config, artifact=str(tmp_path / "m.safetensors"), replay={"finetune_steps": 7})
    metrics, layers, record = run_job(evaluator, job)

    assert record["artifact"] == job.artifact and Path(job.artifact).is_file()
    assert record["policy"]["finetune_steps"] == 7
    assert {n: lp["keep_ratio"] for n, lp in layers.items()} == {"0": 1 / 8, "3": 1 / 8, "7": 1.0}
    assert metrics["bops"] < evaluator.base_cost.total.bops and metrics["bops_reduction"] > 1
    # the metric is the learned model's own: loaded back from its file, it scores the same
    loaded = DJPQModel.load(job.artifact, model)
    assert task.evaluate(loaded, "val") == pytest.approx(metrics["accuracy"], abs=1e-9)


# --- end to end: the CLI on digits ------------------------------------------------------------------------------

TINY_DJPQ = """
strategy: djpq
djpq:
  beta: {low: 1.0e-8, high: 1.0e-5, log: true}
  gamma: {low: 1.0e-6, high: 1.0e-2, log: true}
  steps: 15
  quant_lr_scale: 1.0
policy:
  finetune_steps: 10
"""


@pytest.mark.e2e
def test_djpq_search_lands_in_pareto_mlflow_export_and_apply(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(TINY_DJPQ)
    storage, tracking = storage_of(tmp_path), tracking_of(tmp_path)
    (tmp_path / "mlruns").mkdir()
    common = ["--study", "s", "--storage", storage]
    proc = autoprune(tmp_path, "search", "--space", "space.yaml", "--trials", "3", *common, "--tracking-uri", tracking, "--quiet", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-2000:]

    study = optuna.load_study(study_name="s", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3
    for trial in complete:
        attrs = trial.user_attrs
        assert attrs["strategy"] == "djpq" and attrs["learn"]["steps"] == 15 and attrs["learn"]["seed"] == trial.number
        assert Path(attrs["artifact"]).is_file()
        assert set(attrs["policy"]["layers"]) == set(attrs["layers"]) and attrs["policy"]["finetune_steps"] == 10

    pareto = autoprune(tmp_path, "pareto", *common, "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = pareto.communicate(timeout=120)
    assert pareto.returncode == 0, err.decode()[-2000:]
    front = json.loads(out)["front"]
    assert front and all(row["strategy"] == "djpq" for row in front)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("s")
    children = client.search_runs([experiment.experiment_id], filter_string="tags.strategy = 'djpq'", max_results=100)
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in children) == [0, 1, 2]
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.`autoprune.role` = 'parent'", max_results=1)
    plotted = json.loads(Path(client.download_artifacts(parent[0].info.run_id, "pareto_front.json", str(tmp_path))).read_text())
    assert plotted and all(row["strategy"] == "djpq" for row in plotted)

    export = autoprune(tmp_path, "export", *common, "--out", "out", "--select", "knee", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = export.communicate(timeout=300)
    assert export.returncode == 0, err.decode()[-2000:]
    row = json.loads((tmp_path / "out" / "report.json").read_text())["exported"][0]
    assert row["strategy"] == "djpq" and not row["djpq_model_relearned"]
    assert (tmp_path / "out" / row["djpq_model_file"]).is_file() and (tmp_path / "out" / row["policy_file"]).is_file()
    # the exact DJPQ model, loaded from the export, reproduces the trial's metric
    assert row["replay_matches"] and row["djpq_model_val_accuracy"] == pytest.approx(row["recorded_val_accuracy"], abs=1e-9)
    assert "strategy" in (tmp_path / "out" / "front.csv").read_text().splitlines()[0].split(",")

    # a study moved without its artifacts: export learns the model again from the recorded run config and seed
    artifact = Path(study.trials[row["trial"]].user_attrs["artifact"])
    artifact.unlink()
    again = autoprune(tmp_path, "export", *common, "--out", "out2", "--select", "knee", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-2000:]
    relearned = json.loads((tmp_path / "out2" / "report.json").read_text())["exported"][0]
    assert relearned["trial"] == row["trial"] and relearned["djpq_model_relearned"]
    assert (tmp_path / "out2" / relearned["djpq_model_file"]).is_file()
    # same config, same seed, same CPU kernels: the same model, to the last sample
    assert relearned["replay_matches"]

    # the learned policy replays with our quantizers at the learned bits and widths, fine-tuned, as export scored it
    apply = autoprune(tmp_path, "apply", str(tmp_path / "out" / row["policy_file"]), "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = apply.communicate(timeout=300)
    assert apply.returncode == 0, err.decode()[-2000:]
    assert json.loads(out)["metrics"]["accuracy"] == pytest.approx(row["val_accuracy"], abs=1e-9)
