"""The user's model through the command line: --weights, --task, --device, a worker joining, ONNX export and
the MLflow Model Registry, and the CLI steps of the README and docs/deploy.md, each run as a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from autoprune.search.record import read_meta
from autoprune.files import cache_root
from autoprune.task import weights_task

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from own_model import WEIGHTS_ENV, small_cnn, train_and_save  # noqa: E402

pytestmark = pytest.mark.e2e


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``autoprune ARGS`` with the tests folder on PYTHONPATH (``own_model`` imports as a user's package would)."""
    path = os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])
    full = {**os.environ, "PYTHONPATH": path, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "autoprune.cli", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def load(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_and_save(tmp_path_factory.mktemp("own") / "model.safetensors")


@pytest.fixture(scope="module")
def weights_study(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-trial search of the user's factory with its weights, on the CPU; its folder holds study.db and mlflow.db."""
    folder = tmp_path_factory.mktemp("weights-study")
    ok(cli(folder, "search", "--model", "own_model:small_cnn", "--weights", str(weights), "--trials", "3", "--device", "cpu",
           "--study", "own", "--storage", "sqlite:///study.db", "--tracking-uri", "sqlite:///mlflow.db", "--quiet"))
    return folder


def test_search_with_weights_records_the_metric_of_the_given_weights(weights: Path, weights_study: Path) -> None:
    study = load(weights_study, "own")
    meta = read_meta(study)
    assert meta is not None and meta.base is not None
    # the base model is the given weights, not retrained: its recorded metric is theirs, to the last digit
    given = weights_task("own_model:small_cnn", weights=weights, device="cpu")
    model = small_cnn()
    from autoprune.weights import load_weights

    load_weights(model, weights)
    assert meta.base.val_accuracy == pytest.approx(given.evaluate(model, "val"), abs=1e-9)
    assert meta.task["weights"] == str(weights.resolve()) and meta.task["model"] == "own_model:small_cnn"
    assert completed(study) == 3


def test_signals_of_your_own_weights_show_the_s_n_and_the_sensitivity_measured_with_its_task(weights: Path, tmp_path: Path) -> None:
    proc = ok(cli(tmp_path, "signals", "--model", "own_model:small_cnn", "--weights", str(weights), "--device", "cpu", "--json"))
    shown = json.loads(proc.stdout)
    assert shown["layers"] and shown["sensitivity"]["method"] == "direct"
    layers = shown["sensitivity"]["layers"]
    assert set(layers) == {row["name"] for row in shown["layers"]}
    assert all(min(layer["w_bits"].values()) >= 0.0 for layer in layers.values())
    assert sum(layer["w_bits"]["2"] for layer in layers.values()) > sum(layer["w_bits"]["8"] for layer in layers.values())
    assert list((cache_root() / "sensitivity").glob("*.json")), "cached under the cache root, keyed by task and weights"


def test_signals_of_a_task_without_an_s_n_fine_tune_is_one_line(weights: Path, tmp_path: Path) -> None:
    proc = cli(tmp_path, "signals", "--task", "own_model:task_without_signals", "--device", "cpu", env={WEIGHTS_ENV: str(weights)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: --task: 'own_model:task_without_signals' gives a task with signal_steps=0: it has no training-time S/N record to show"


def test_task_reference_study_is_widened_by_a_worker(weights: Path, tmp_path: Path) -> None:
    env = {WEIGHTS_ENV: str(weights)}
    # a deadline already past: the search sets the study up (base metric, priors) and runs no trial itself
    ok(cli(tmp_path, "search", "--task", "own_model:task", "--trials", "3", "--timeout", "0.001", "--val-samples", "200",
           "--device", "cpu", "--study", "ref", "--storage", "sqlite:///study.db", "--tracking-uri", "sqlite:///mlflow.db", "--quiet", env=env))
    study = load(tmp_path, "ref")
    assert completed(study) == 0
    meta = read_meta(study)
    assert meta is not None and meta.task["reference"] == "own_model:task" and meta.task["val_samples"] == 200
    proc = ok(cli(tmp_path, "worker", "--study", "ref", "--storage", "sqlite:///study.db", "--tracking-uri", "sqlite:///mlflow.db",
                  "--device", "cpu", "--quiet", env=env))
    assert "ran 3 trials" in proc.stdout
    assert completed(load(tmp_path, "ref")) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
@pytest.mark.parametrize("command", [
    ["search", "--trials", "2", "--storage", "sqlite:///study.db"],
    ["search", "--model", "own_model:small_cnn", "--weights", "missing.safetensors"],
    ["apply", "policy.json", "--out", "model.onnx"],
    ["signals"],
    ["worker", "--study", "s", "--storage", "sqlite:///study.db"],
])
def test_cuda_where_there_is_none_is_one_line_before_any_work(command: list[str], tmp_path: Path) -> None:
    proc = cli(tmp_path, *command, "--device", "cuda")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --device: 'cuda' asks for CUDA, which this machine does not have (use cpu)"
    assert list(tmp_path.iterdir()) == []  # no study, no MLflow store, no cache


def test_export_onnx_logs_each_point_and_registers_it(weights_study: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from autoprune.tracking.models import load_registered_onnx

    out = tmp_path / "onnx"
    uri = f"sqlite:///{weights_study / 'mlflow.db'}"
    ok(cli(weights_study, "export", "--study", "own", "--storage", "sqlite:///study.db", "--out", str(out), "--format", "onnx",
           "--register", "own-cnn", "--tracking-uri", uri))
    report = json.loads((out / "report.json").read_text())
    assert report["exported"] and "| BOPs | onnxruntime ms | latency model ms | onnxruntime CPU ms |" in (out / "report.md").read_text()
    client = MlflowClient(tracking_uri=uri)
    for row in report["exported"]:
        deployed = row["deploy"]
        assert (out / deployed["onnx_file"]).is_file() and (out / deployed["packed_file"]).is_file()
        assert deployed["top1_agreement"] >= 99.0
        assert deployed["onnx_test_accuracy"] == pytest.approx(row["test_accuracy"], abs=1.0)
        assert 0.99 <= deployed["packed_over_cost_weight"] <= 1.2
        assert deployed["onnx_ms"] > 0 and deployed["torch_float_base_ms"] > 0
        # the latency model's estimate and the cost model's BOPs beside the measured latency
        assert deployed["latency_model_ms"] > 0 and deployed["latency_measured_ms"] > 0 and deployed["bops"] == pytest.approx(row["bops"])
        version = client.get_model_version("own-cnn", str(deployed["registered"]["version"]))
        assert version.tags["autoprune.study"] == "own" and json.loads(version.tags["autoprune.policy"]) == json.loads((out / row["policy_file"]).read_text())
        assert float(version.tags["autoprune.metric.accuracy"]) == pytest.approx(row["recorded_val_accuracy"])
        # the model was logged in the trial's own run, with a signature
        run = client.get_run(version.run_id)
        assert run.data.tags["autoprune.trial"] == str(row["trial"])
    proto = load_registered_onnx(tracking_uri=uri, name="own-cnn", version=report["exported"][0]["deploy"]["registered"]["version"])
    assert any(node.op_type == "DequantizeLinear" for node in proto.graph.node)
    assert "| onnxruntime top-1 acc |" in (out / "report.md").read_text()


def test_apply_out_onnx_writes_the_model_and_its_packed_weights(weights: Path, weights_study: Path, tmp_path: Path) -> None:
    study = load(weights_study, "own")
    trial = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))[0]
    from autoprune.search.record import read_trial

    (tmp_path / "policy.json").write_text(json.dumps(read_trial(trial).policy))
    proc = ok(cli(tmp_path, "apply", "policy.json", "--model", "own_model:small_cnn", "--weights", str(weights), "--device", "cpu",
                  "--out", "model.onnx", "--json"))
    deployed = json.loads(proc.stdout)["deploy"]
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.apw").is_file()
    assert deployed["top1_agreement"] >= 99.0


def test_the_cli_variant_of_the_readme_own_model_section_runs(weights: Path, tmp_path: Path) -> None:
    section = (REPO / "README.md").read_text().split("## Your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert blocks, "the section has a CLI variant"
    (tmp_path / "my_models.py").write_text("from own_model import small_cnn, task  # noqa: F401\n")
    (tmp_path / "model.safetensors").write_bytes(weights.read_bytes())
    env = {WEIGHTS_ENV: str(weights), "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), str(TESTS)])}
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    commands = [line for line in lines if line]
    assert any("--weights" in c for c in commands) and any("--task" in c for c in commands) and any(c.startswith("autoprune worker") for c in commands)
    for command in commands:
        # the README's budget is a real one; the test keeps each search to two trials
        args = command.replace("--trials 60", "--trials 2").split()
        assert args[0] == "autoprune"
        ok(cli(tmp_path, *args[1:], "--quiet", env=env))


def test_the_cli_steps_of_docs_deploy_md_run(tmp_path: Path) -> None:
    text = (REPO / "docs" / "deploy.md").read_text()
    block = re.search(r"## With the command line\n.*?```sh\n(.*?)```", text, flags=re.S)
    assert block is not None
    commands = [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert [c.split()[1] for c in commands] == ["search", "export", "apply"]
    for command in commands:
        # the page's budget is a real one; the test keeps the search to three trials
        proc = subprocess.run(command.replace("--trials 20", "--trials 3").replace("autoprune ", f"{sys.executable} -m autoprune.cli ", 1),
                              shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"})
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    report = json.loads((tmp_path / "exports" / "onnx" / "report.json").read_text())
    assert all(r["deploy"]["registered"]["name"] == "digits-cnn" for r in report["exported"])
    assert (tmp_path / "model.onnx").is_file()


@pytest.mark.parametrize("gpus, device", [(0.0, "cpu"), (0.5, "cuda")])
def test_a_ray_trial_runs_on_cuda_when_given_a_gpu(gpus: float, device: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprune.search import ray_executor
    from autoprune.api import search_config
    from autoprune.search.study import RayOptions, prepare
    from autoprune.task import Task

    task = Task(device="cpu", val_samples=100)
    ctx = prepare(search_config(storage=f"sqlite:///{tmp_path / 'study.db'}", trials=1), task=task)
    job = ray_executor._worker_job(ctx, RayOptions(gpus_per_trial=gpus))
    assert job.device == device and job.task["val_samples"] == 100
    if device == "cuda" and not torch.cuda.is_available():
        return  # Ray gives such a trial a GPU only where there is one
    monkeypatch.setattr(ray_executor, "_EVALUATORS", {})
    evaluator = ray_executor._evaluator(job)
    assert evaluator.task.device.type == device and evaluator.task.val_samples == 100
