"""Several processes on one SQLite study: `autoprune worker`s share the budget with no trial lost or run
twice, a worker that dies mid-trial has that trial failed and redone, a finished study sends workers home."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from cli_support import PATIENCE, _no_leftover_processes, autoprune, storage_of, tracking_of, wait_for  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.e2e


def space(steps: int) -> str:
    """A space whose trials last about ``steps`` / 250 seconds on digits, once the first is done."""
    return f"layers: {{_default: {{w_bits: {{choices: [4, 8]}}}}}}\npolicy: {{finetune_steps: {steps}}}\n"


def search_args(tmp_path: Path, trials: int, *extra: str, steps: int = 150) -> list[str]:
    (tmp_path / "space.yaml").write_text(space(steps))
    return [
        # every trial fine-tuned (no ladder): the budget is then this many complete trials
        "search", "--space", str(tmp_path / "space.yaml"), "--trials", str(trials), "--study", "s", "--no-priors", "--no-ladder",
        "--storage", storage_of(tmp_path), "--tracking-uri", tracking_of(tmp_path), "--quiet", *extra,
    ]


def worker_args(tmp_path: Path) -> list[str]:
    return ["worker", "--study", "s", "--storage", storage_of(tmp_path), "--tracking-uri", tracking_of(tmp_path), "--quiet", "--threads", "1"]


def trials_of(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="s", storage=storage_of(tmp_path)).trials
    except KeyError:
        return []


def mlflow_children(tmp_path: Path) -> dict[int, str]:
    """Trial number -> status of the child runs under the study's one parent run; no number twice."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_of(tmp_path))
    experiment = client.get_experiment_by_name("s")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("autoprune.role") == "parent"]
    assert len(parents) == 1
    children = [r for r in runs if "autoprune.trial" in r.data.tags]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    numbers = [int(r.data.tags["autoprune.trial"]) for r in children]
    assert len(numbers) == len(set(numbers)), "a trial was logged twice"
    return {int(r.data.tags["autoprune.trial"]): r.info.status for r in children}


def assert_budget_spent_once(tmp_path: Path, budget: int) -> list[optuna.trial.FrozenTrial]:
    trials = trials_of(tmp_path)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], "a trial was lost"
    assert sum(t.state == TrialState.COMPLETE for t in trials) == budget
    # every other trial was cut short (Ctrl-C, a dead process, a race for the last slot) and spent nothing
    assert all(t.user_attrs.get("interrupted") for t in trials if t.state != TrialState.COMPLETE)
    policies = [t.user_attrs["policy"] for t in trials if t.state == TrialState.COMPLETE]
    assert all(policies)
    children = mlflow_children(tmp_path)
    assert {n for n, status in children.items() if status == "FINISHED"} == {t.number for t in trials if t.state == TrialState.COMPLETE}
    return trials


def test_two_workers_finish_the_budget_of_an_interrupted_search(tmp_path: Path) -> None:
    # 150-step trials took 0.6 s once the first was done: a loaded machine's poll sent the Ctrl-C after all 8
    driver = autoprune(tmp_path, *search_args(tmp_path, 8, steps=600), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for("a complete trial", lambda: any(t.state == TrialState.COMPLETE for t in trials_of(tmp_path)), driver)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=PATIENCE)
    assert driver.returncode == 130, err.decode()[-2000:]
    done_by_driver = {t.number for t in trials_of(tmp_path) if t.state == TrialState.COMPLETE}
    assert 1 <= len(done_by_driver) < 8

    workers = [autoprune(tmp_path, *worker_args(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in workers:
        out, err = proc.communicate(timeout=PATIENCE)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"ran" in out
    trials = assert_budget_spent_once(tmp_path, 8)
    owners = {t.user_attrs["owner"] for t in trials if t.state == TrialState.COMPLETE and t.number not in done_by_driver}
    assert owners == {f"{socket.gethostname()}:{proc.pid}" for proc in workers}, "both workers ran trials"

    late = autoprune(tmp_path, *worker_args(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = late.communicate(timeout=PATIENCE)
    assert late.returncode == 0, err.decode()
    assert b"nothing to do" in out
    assert len(trials_of(tmp_path)) == len(trials)


def worker_children(driver: int) -> list[int]:
    """The worker processes that a `search --jobs N` started (the API's ``worker_process`` entry point)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if ppid == driver and any(b"worker_process" in part for part in cmdline):
                found.append(int(entry.name))
    return found


def test_a_worker_killed_mid_trial_has_its_trial_failed_and_redone(tmp_path: Path) -> None:
    # Trials of a few seconds: a worker takes about as long as five short ones to start, and must get one.
    driver = autoprune(tmp_path, *search_args(tmp_path, 5, "--jobs", "2", steps=800), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    (worker,) = wait_for("the worker process", lambda: worker_children(driver.pid), driver)
    owner = f"{socket.gethostname()}:{worker}"
    (victim,) = wait_for(
        "a trial of the worker", lambda: [t.number for t in trials_of(tmp_path) if t.state == TrialState.RUNNING and t.user_attrs.get("owner") == owner], driver
    )
    os.kill(worker, signal.SIGKILL)
    _, err = driver.communicate(timeout=PATIENCE)
    assert driver.returncode == 0, err.decode()[-2000:]
    trials = assert_budget_spent_once(tmp_path, 5)
    killed = next(t for t in trials if t.number == victim)
    assert killed.state == TrialState.FAIL and f"process {owner} died" in killed.user_attrs["failure"]
    assert mlflow_children(tmp_path)[victim] == "KILLED"
