"""A real search on digits: resume after SIGKILL, export replays, priors first. Marked e2e (about a minute)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from cli_support import PATIENCE, _no_leftover_processes, autoprune, wait_for  # noqa: F401 (autouse fixture)
from optuna.trial import TrialState

pytestmark = pytest.mark.e2e

SPACE = """
layers:
  _default:
    keep_ratio: {choices: [0.5, 0.75, 1.0]}
    w_bits: {choices: [2, 4, 8]}
    a_bits: {choices: [4, 8]}
policy:
  order: {choices: [prune_then_quantize, joint]}
  finetune_steps: 40
"""


def search_args(tmp_path: Path, trials: int, *extra: str) -> list[str]:
    return [
        # every trial fine-tuned (no ladder): the budget is then this many complete trials
        "search", "--space", str(tmp_path / "space.yaml"), "--trials", str(trials), "--study", "s", "--no-ladder",
        "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        "--quiet", *extra,
    ]


def complete_trials(storage: str) -> dict[int, tuple[float, ...]]:
    try:
        study = optuna.load_study(study_name="s", storage=storage)
    except KeyError:
        return {}
    return {t.number: tuple(t.values) for t in study.get_trials(states=(TrialState.COMPLETE,))}


def test_sigkill_then_rerun_finishes_with_earlier_trials_intact(tmp_path: Path) -> None:
    # longer trials: the kill must land before the search has finished all 8
    (tmp_path / "space.yaml").write_text(SPACE.replace("finetune_steps: 40", "finetune_steps: 300"))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = autoprune(tmp_path, *search_args(tmp_path, 8, "--no-priors"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for("three complete trials", lambda: len(complete_trials(storage)) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = complete_trials(storage)
    assert 3 <= len(before) < 8

    rerun = autoprune(tmp_path, *search_args(tmp_path, 8, "--no-priors"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = rerun.communicate(timeout=PATIENCE)
    assert rerun.returncode == 0, err.decode()[-2000:]
    after = complete_trials(storage)
    assert len(after) == 8
    assert {n: after[n] for n in before} == before
    study = optuna.load_study(study_name="s", storage=storage)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert b"Pareto front" in out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("s")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_priors_come_first_and_exported_policies_replay(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = autoprune(tmp_path, *search_args(tmp_path, 6, "--export", str(tmp_path / "out")), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, err.decode()[-2000:]
    study = optuna.load_study(study_name="s", storage=storage)
    priors = [t.number for t in study.trials if "prior" in t.user_attrs]
    assert priors and priors == list(range(len(priors)))

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["exported"]
    for row in report["exported"]:
        assert row["replay_matches"], row
        assert (tmp_path / "out" / row["policy_file"]).is_file()
        assert (tmp_path / "out" / row["policy_file"].replace(".json", ".yaml")).is_file()
    assert (tmp_path / "out" / "front.csv").read_text().startswith("trial,")

    # the exported file replays through `autoprune apply` to its trial's validation accuracy
    first = report["exported"][0]
    apply = autoprune(tmp_path, "apply", str(tmp_path / "out" / first["policy_file"]), "--json", "--out", str(tmp_path / "m.safetensors"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = apply.communicate(timeout=PATIENCE)
    assert apply.returncode == 0, err.decode()[-2000:]
    applied = json.loads(out)
    assert applied["metrics"]["accuracy"] == pytest.approx(first["recorded_val_accuracy"], abs=1e-9)
    assert (tmp_path / "m.safetensors").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("s")
    tagged = client.search_runs([experiment.experiment_id], filter_string="tags.prior != ''", max_results=100)
    assert len(tagged) == len(priors)


def test_no_priors_flag_enqueues_none(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    proc = autoprune(tmp_path, *search_args(tmp_path, 2, "--no-priors"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, err.decode()[-2000:]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert not [t for t in study.trials if "prior" in t.user_attrs]
