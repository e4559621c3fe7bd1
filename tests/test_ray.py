"""The Ray Tune executor on a local Ray instance (2 CPUs): trials land in the study and in MLflow, a dead
worker fails (or retries) its trial, Ctrl-C leaves the study resumable, a bad cluster fails fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import pytest
from optuna.trial import TrialState

from autoprune.cli import main
from cli_support import PATIENCE, _no_leftover_processes, autoprune, storage_of, tracking_of, wait_for  # noqa: F401 (autouse fixture)

if TYPE_CHECKING:
    from autoprune.search.study import SearchContext

FAST_SPACE = "layers: {_default: {w_bits: {choices: [4, 8]}}}\npolicy: {finetune_steps: 20}\n"
# Trials of a few seconds, long enough to kill a worker or interrupt the driver in the middle of one.
SLOW_SPACE = "layers: {_default: {w_bits: {choices: [4, 8]}}}\npolicy: {finetune_steps: 600}\n"
TRAINING_PROC = "ray::ImplicitFunc.train"  # Ray's title for a trial actor while it runs a trial


def ray_search(tmp_path: Path, trials: int, space: str, *extra: str) -> list[str]:
    (tmp_path / "space.yaml").write_text(space)
    return [
        "search", "--executor", "ray", "--space", str(tmp_path / "space.yaml"), "--trials", str(trials), "--study", "s",
        "--storage", storage_of(tmp_path), "--tracking-uri", tracking_of(tmp_path), "--quiet", *extra,
    ]


def trials_of(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="s", storage=storage_of(tmp_path)).trials
    except KeyError:  # the driver has not created the study yet
        return []


def trial_process(driver: int) -> int | None:
    """The pid of a Ray worker process of this driver's local instance that is running a trial now."""
    parents: dict[int, int] = {}
    titles: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the command name in /proc/PID/stat may hold spaces: the ppid follows its closing parenthesis
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                titles[int(entry.name)] = (entry / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue
    for pid, title in titles.items():
        ancestor = pid
        while title.startswith(TRAINING_PROC.encode()) and ancestor > 1:
            ancestor = parents.get(ancestor, 1)
            if ancestor == driver:
                return pid
    return None


def mlflow_children(tmp_path: Path) -> dict[int, str]:
    """Trial number -> status of the child runs under the study's parent run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_of(tmp_path))
    experiment = client.get_experiment_by_name("s")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("autoprune.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if "autoprune.trial" in r.data.tags]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    numbers = [int(r.data.tags["autoprune.trial"]) for r in children]
    assert len(numbers) == len(set(numbers)), "a trial was logged twice"
    return {int(r.data.tags["autoprune.trial"]): r.info.status for r in children}


@pytest.mark.e2e
def test_small_search_lands_in_study_and_mlflow(tmp_path: Path) -> None:
    proc = autoprune(tmp_path, *ray_search(tmp_path, 4, FAST_SPACE, "--workers", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, err.decode()[-3000:]
    trials = trials_of(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert any("prior" in t.user_attrs for t in trials)  # the enqueued priors went through Ray too
    for trial in trials:
        assert {"policy", "metrics", "layers", "constraints", "owner"} <= set(trial.user_attrs)
        assert trial.values == [trial.user_attrs["metrics"]["accuracy"], trial.user_attrs["metrics"]["bops"]]
    assert mlflow_children(tmp_path) == {t.number: "FINISHED" for t in trials}
    assert b"Pareto front" in out
    # pareto reads the same study, unchanged
    pareto = autoprune(tmp_path, "pareto", "--study", "s", "--storage", storage_of(tmp_path), "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = pareto.communicate(timeout=PATIENCE)
    assert pareto.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["trials"] == 4 and report["front"]
    assert {row["trial"] for row in report["front"]} <= {t.number for t in trials}


@pytest.mark.e2e
@pytest.mark.parametrize("retries", [0, 1])
def test_killed_worker_fails_or_retries_its_trial(tmp_path: Path, retries: int) -> None:
    args = ray_search(tmp_path, 3, SLOW_SPACE, "--workers", "1", "--no-priors", "--retries", str(retries))
    proc = autoprune(tmp_path, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pid = wait_for("a trial to run", lambda: trial_process(proc.pid), proc)
    running = wait_for("the trial in the study", lambda: [t.number for t in trials_of(tmp_path) if t.state == TrialState.RUNNING], proc)
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, err.decode()[-3000:]
    trials = {t.number: t for t in trials_of(tmp_path)}
    killed = trials[running[0]]
    if retries:
        assert [t.state for t in trials.values()] == [TrialState.COMPLETE] * 3  # retried: the study saw one outcome
    else:
        assert killed.state == TrialState.FAIL
        assert "ActorDiedError" in killed.user_attrs["failure"] and not killed.user_attrs.get("interrupted")
        # a failed trial spends the budget like the local executor's: the search goes on to 3 in all
        assert len(trials) == 3 and sum(t.state == TrialState.COMPLETE for t in trials.values()) == 2
    children = mlflow_children(tmp_path)
    assert children == {n: ("FINISHED" if t.state == TrialState.COMPLETE else "FAILED") for n, t in trials.items()}


@pytest.mark.e2e
def test_interrupted_driver_leaves_the_study_resumable(tmp_path: Path) -> None:
    args = ray_search(tmp_path, 3, SLOW_SPACE, "--workers", "2", "--no-priors")
    proc = autoprune(tmp_path, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for("a trial to run", lambda: any(t.state == TrialState.RUNNING for t in trials_of(tmp_path)), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 130, err.decode()[-3000:]
    assert "run the same command to resume" in err.decode()
    trials = trials_of(tmp_path)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t.number for t in trials if t.state == TrialState.FAIL]
    assert interrupted and all(t.user_attrs.get("interrupted") for t in trials if t.state == TrialState.FAIL)
    assert trial_process(proc.pid) is None, "a Ray worker outlived the interrupted driver"

    rerun = autoprune(tmp_path, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = rerun.communicate(timeout=PATIENCE)
    assert rerun.returncode == 0, err.decode()[-3000:]
    trials = trials_of(tmp_path)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3  # interrupted trials did not spend the budget
    children = mlflow_children(tmp_path)
    assert {n for n, status in children.items() if status == "KILLED"} == set(interrupted)


@pytest.mark.parametrize(
    ("address", "storage", "needle"),
    [
        ("127.0.0.1:1", "sqlite", "error: --address: '127.0.0.1:1' cannot be reached"),
        ("nonsense", "sqlite", "error: --address: 'nonsense' must be auto, HOST:PORT or ray://HOST:PORT"),
        # without the Ray Client installed, the error says how to install it; with it, that nothing listens
        ("ray://127.0.0.1:1", "postgresql://nobody@127.0.0.1:1/none", "error: --address: 'ray://127.0.0.1:1'"),
        # through ray:// the Tune loop runs on the head node, which cannot open a SQLite file of this machine
        ("ray://127.0.0.1:1", "sqlite", "error: --storage"),
    ],
)
def test_unreachable_cluster_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str, storage: str, needle: str) -> None:
    start = time.monotonic()
    url = storage_of(tmp_path) if storage == "sqlite" else storage
    code = main(["search", "--executor", "ray", "--address", address, "--storage", url, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(needle), err
    assert time.monotonic() - start < 15
    assert not (tmp_path / "study.db").exists(), "the study was created before the cluster was checked"


def test_no_running_cluster_for_auto(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if any((p / "comm").read_text().strip() == "gcs_server" for p in Path("/proc").iterdir() if p.name.isdigit() and (p / "comm").exists()):
        pytest.skip("a Ray instance runs on this machine: `auto` would find it")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["search", "--executor", "ray", "--address", "auto", "--storage", storage_of(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--address: 'auto'" in err, err


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--workers", "0"), ("--cpus-per-trial", "0"), ("--gpus-per-trial", "-1"), ("--retries", "-1")],
)
def test_bad_ray_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str) -> None:
    code = main(["search", "--executor", "ray", flag, value, "--storage", storage_of(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {flag}"), err


# --- the searcher and the worker side, without a Ray instance ------------------------------------------


def prepared(tmp_path: Path, trials: int) -> "SearchContext":
    from autoprune.api import search_config
    from autoprune.search.study import prepare

    (tmp_path / "space.yaml").write_text(FAST_SPACE)
    return prepare(search_config(space_path=tmp_path / "space.yaml", study="s", storage=storage_of(tmp_path), trials=trials))


def outcome(**payload: object) -> dict[str, str]:
    from autoprune.search.ray_executor import RESULT_KEY

    return {RESULT_KEY: json.dumps(payload), "training_iteration": "1"}


def test_searcher_asks_and_tells_the_study_also_as_a_shipped_copy(tmp_path: Path) -> None:
    import ray.cloudpickle

    from autoprune.policy import Policy
    from autoprune.search.ray_executor import StudySearcher

    ctx = prepared(tmp_path, trials=4)
    told: list[optuna.trial.FrozenTrial] = []
    searcher = StudySearcher(ctx, storage=storage_of(tmp_path), tracking_uri=None, deadline=None, on_result=told.append)
    # Tune pickles its search algorithm, and runs it on the head node when the driver connects by ray://
    copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(searcher))

    config = copy.suggest("a")
    assert config["number"] == 0
    assert Policy.from_dict(config["job"]["policy"]).to_dict() == config["job"]["policy"]
    copy.on_trial_complete("a", outcome(metrics={"accuracy": 90.0, "bops": 1e6}, layers={}))
    assert searcher.suggest("b")["number"] == 1  # the original sees what the copy told: one study
    searcher.on_trial_complete("b", None, error=True)  # tells nothing: TrialErrors comes next with the reason
    assert ctx.study.trials[1].state == TrialState.RUNNING
    searcher.fail("b", "ActorDiedError: The actor died unexpectedly before finishing this task.")
    searcher.suggest("c")
    searcher.on_trial_complete("c", outcome(failure="TrialFailed: diverged: loss is nan"))
    searcher.suggest("d")
    searcher.on_trial_complete("d", outcome(metrics={"accuracy": float("nan"), "bops": 1e6}, layers={}))
    assert searcher.suggest("e") == StudySearcher.FINISHED  # four trials spent the budget

    trials = optuna.load_study(study_name="s", storage=storage_of(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 3
    assert trials[0].values == [90.0, 1e6] and trials[0].user_attrs["metrics"]["accuracy"] == 90.0
    assert trials[1].user_attrs["failure"].startswith("ActorDiedError")
    assert trials[2].user_attrs["failure"] == "TrialFailed: diverged: loss is nan"
    assert trials[3].user_attrs["failure"] == "TrialFailed: accuracy is nan"
    assert not any(t.user_attrs.get("interrupted") for t in trials)
    assert [t.number for t in told] == [1, 2, 3]


def test_searcher_stops_at_the_deadline_and_abandons_as_interrupted(tmp_path: Path) -> None:
    from autoprune.search.budget import spent
    from autoprune.search.ray_executor import StudySearcher

    ctx = prepared(tmp_path, trials=4)
    late = StudySearcher(ctx, storage=storage_of(tmp_path), tracking_uri=None, deadline=time.monotonic() - 1, on_result=lambda t: None)
    assert late.suggest("a") == StudySearcher.FINISHED
    assert not ctx.study.trials

    searcher = StudySearcher(ctx, storage=storage_of(tmp_path), tracking_uri=None, deadline=None, on_result=lambda t: None)
    searcher.suggest("a")
    searcher.abandon("interrupted: Ctrl-C")
    (trial,) = ctx.study.trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["interrupted"]
    assert spent(ctx.study) == 0  # a resume runs it again
    searcher.on_trial_complete("a", outcome(metrics={"accuracy": 90.0, "bops": 1e6}, layers={}))  # late news is ignored
    assert ctx.study.trials[0].state == TrialState.FAIL


def test_worker_on_a_node_without_the_cache_uses_the_shipped_base_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from autoprune.search import ray_executor
    from autoprune.search.study import RayOptions

    ctx = prepared(tmp_path, trials=1)
    job = ray_executor._worker_job(ctx, RayOptions())
    node_cache = tmp_path / "node-cache"
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(node_cache))  # restored after the test; the worker sets it
    monkeypatch.setattr(ray_executor, "_EVALUATORS", {})
    evaluator = ray_executor._evaluator(dataclasses.replace(job, cache_dir=str(node_cache)))
    assert evaluator.base.from_cache  # loaded, not trained again
    assert evaluator.base.val_accuracy == ctx.evaluator.base.val_accuracy
    assert sorted(p.name for p in evaluator.base.cache_path.iterdir()) == sorted(job.base_files)
    assert ray_executor._evaluator(dataclasses.replace(job, cache_dir=str(node_cache))) is evaluator  # one per process


def test_ray_address_from_the_environment_is_named_in_the_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # as `ray job submit` sets it; here nothing listens
    code = main(["search", "--executor", "ray", "--storage", storage_of(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: RAY_ADDRESS: '127.0.0.1:1' cannot be reached"), err
