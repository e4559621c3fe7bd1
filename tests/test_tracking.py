"""MLflow tracking against a real SQLite store: run layout, params/metrics, Pareto tags, artifacts, faults."""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from autoprune import plots
from autoprune.files import CACHE_ENV
from autoprune.search.front import Front, event_of
from autoprune.search.pareto import front_trials, pareto_ranks
from autoprune.search.record import StudyMeta, read_meta, write_meta
from autoprune.search.progress import finished_events, start_tracker
from autoprune.tracking import (
    FAILED_REASON,
    FAILURE_TAG,
    PARENT_TAG,
    TRIAL_TAG,
    Tracker,
    default_tracking_uri,
    resolve_store,
    serve_ui,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
LAYERS = {"conv1": 36_864, "conv2": 147_456, "conv3": 73_728, "fc": 1_280}  # MACs of a toy CNN
BITS = (2, 3, 4, 6, 8)
OBJECTIVES = {
    "objectives": [{"metric": "accuracy", "direction": "maximize"}, {"metric": "bops", "direction": "minimize"}],
    "constraints": ["accuracy_drop <= 20"],
}
SPACE = {"layers": {"_default": {"w_bits": {"choices": list(BITS)}, "a_bits": {"choices": list(BITS)}, "keep_ratio": {"low": 0.25, "high": 1.0}}}}
BASE_COST = {"macs": float(sum(LAYERS.values())), "bops": 1024.0 * sum(LAYERS.values()), "esn_a": 1e6, "esn_d": 2e6, "esn_d_prime": 3e6, "memory_mb": 8.0, "params": 60_000.0}
BASE = {"val_accuracy": 97.5, "test_accuracy": 97.0, "cost": BASE_COST}


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the module: creating MLflow's schema costs ~1.5 s; each test uses its own study name."""
    return tmp_path_factory.mktemp("store") / "mlruns"


def client_of(folder: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve_store(str(folder))[0])


def new_study(name: str, storage: str | None = None) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    write_meta(study, StudyMeta(task={"dataset": "digits", "model": "tiny_cnn", "seed": 0}, space=SPACE, objectives=OBJECTIVES, budget=12, base=BASE))
    return study


def start(tracker: Tracker, study: optuna.Study) -> None:
    start_tracker(tracker, study)


def refresh(tracker: Tracker, study: optuna.Study) -> None:
    """What the search's Reporter hands the tracker after a trial: the front, here rebuilt from the study."""
    front = Front(study, read_meta(study))
    snapshot = front.snapshot()
    tracker.refresh(dataclasses.replace(snapshot, changed=snapshot.ranks))


def parent_of(study: optuna.Study) -> str | None:
    return read_meta(study).mlflow_parent_run_id


def toy_evaluate(layers: dict[str, dict[str, float]]) -> dict[str, float]:
    """Accuracy falls with fewer bits and channels; BOPs = sum MACs x keep x w_bits x a_bits (DJPQ eq. 16)."""
    penalty = sum(3.0 / s["w_bits"] + 2.0 / s["a_bits"] + 2.0 * (1 - s["keep_ratio"]) for s in layers.values())
    accuracy = BASE["val_accuracy"] - penalty
    macs = sum(LAYERS[n] * s["keep_ratio"] for n, s in layers.items())
    bops = sum(LAYERS[n] * s["keep_ratio"] * s["w_bits"] * s["a_bits"] for n, s in layers.items())
    return {
        "accuracy": accuracy,
        "accuracy_drop": BASE["val_accuracy"] - accuracy,
        "macs": macs,
        "bops": bops,
        "esn_a": bops / 10,
        "esn_d": bops / 5,
        "esn_d_prime": bops / 4,
        "memory_mb": bops / 1e6,
        "performance_density": accuracy / (bops / 1e6),
        "params": 60_000.0,
        "compress_seconds": 0.01,
    }


def policy_of(layers: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {"version": 1, "layers": layers, "order": "prune_then_quantize"}


def run_trial(study: optuna.Study, tracker: Tracker | None, rng: random.Random, *, fail: bool = False, prior: str | None = None) -> optuna.trial.FrozenTrial:
    """What the search runner does for one trial, with a toy evaluation instead of compressing a model."""
    trial = study.ask()
    layers = {name: {"keep_ratio": rng.choice([0.5, 0.75, 1.0]), "w_bits": rng.choice(BITS), "a_bits": rng.choice(BITS), "w_sparsity": 0.0, "f_sparsity": 0.0} for name in LAYERS}
    trial.set_user_attr("policy", policy_of(layers))
    trial.set_user_attr("layers", layers)
    if prior:
        trial.set_user_attr("prior", prior)
    if tracker:
        tracker.log_trial(event_of(trial))
    if fail:
        trial.set_user_attr("failure", "RuntimeError: loss became NaN")
        frozen = study.tell(trial, state=TrialState.FAIL)
    else:
        metrics = toy_evaluate(layers)
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("constraints", [metrics["accuracy_drop"] - 20])
        frozen = study.tell(trial, [metrics["accuracy"], metrics["bops"]])
    if tracker:
        tracker.log_trial(event_of(frozen))
        refresh(tracker, study)
    return frozen


def children(client: Any, tracker: Tracker) -> dict[int, Any]:
    runs = client.search_runs([tracker.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{tracker.parent_run_id}'", max_results=1000)
    numbers = [int(r.data.tags[TRIAL_TAG]) for r in runs]
    assert len(numbers) == len(set(numbers)), "one child run per trial"
    return {int(r.data.tags[TRIAL_TAG]): r for r in runs}


def parents(client: Any, tracker: Tracker) -> list[Any]:
    return client.search_runs([tracker.experiment_id], filter_string="tags.`autoprune.role` = 'parent'")


def artifact_names(client: Any, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def test_a_small_search_is_mirrored_in_mlflow(store: Path) -> None:
    study = new_study("small-search")
    tracker = Tracker(study_name="small-search", tracking_uri=str(store))
    start(tracker, study)
    rng = random.Random(0)
    for i in range(12):
        run_trial(study, tracker, rng, fail=i == 5, prior="kappa=1" if i == 0 else None)
    tracker.close()
    assert not tracker.offline

    client = client_of(store)
    experiment = client.get_experiment_by_name("small-search")
    assert experiment.artifact_location == (store / "artifacts" / "small-search").resolve().as_uri()
    assert [p.info.run_id for p in parents(client, tracker)] == [tracker.parent_run_id]
    assert parent_of(study) == tracker.parent_run_id
    runs = children(client, tracker)
    assert sorted(runs) == [t.number for t in study.trials]

    for trial in study.trials:
        run = runs[trial.number]
        assert run.info.run_name == f"trial-{trial.number:04d}"
        assert run.data.tags["autoprune.state"] == trial.state.name
        assert run.data.params["layers.conv2.w_bits"] == str(trial.user_attrs["policy"]["layers"]["conv2"]["w_bits"])
        assert run.data.params["order"] == "prune_then_quantize"
        if trial.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            for metric, value in trial.user_attrs["metrics"].items():
                assert run.data.metrics[metric] == pytest.approx(value)
            assert run.data.metrics["trial"] == trial.number
        else:
            assert run.info.status == "FAILED"
            assert run.data.tags[FAILURE_TAG] == "RuntimeError: loss became NaN"
            assert run.data.tags["pareto"] == "false"
    assert runs[0].data.tags["prior"] == "kappa=1"

    front = {t.number for t in front_trials(study)}
    assert front == {t.number for t in study.best_trials}  # the study's own front (every trial here is feasible)
    tagged = {n for n, r in runs.items() if r.data.tags.get("pareto") == "true"}
    assert tagged == front
    filtered = client.search_runs([tracker.experiment_id], filter_string='tags.pareto = "true"')
    assert {int(r.data.tags[TRIAL_TAG]) for r in filtered} == front
    assert {n: int(runs[n].data.tags["pareto_rank"]) for n in pareto_ranks(study)} == pareto_ranks(study)

    policy_path = client.download_artifacts(runs[3].info.run_id, "policy.json")
    assert json.loads(Path(policy_path).read_text()) == study.trials[3].user_attrs["policy"]

    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["base.val_accuracy"] == 97.5
    assert parent.data.metrics["base.bops"] == BASE_COST["bops"]
    assert parent.data.metrics["front_size"] == len(front)
    assert parent.data.metrics["hypervolume"] > 0
    assert parent.data.params["objectives"] == "accuracy (maximize), bops (minimize)"
    assert parent.data.params["task.model"] == "tiny_cnn"
    names = artifact_names(client, tracker.parent_run_id)
    assert {"pareto_front.png", "pareto_front.html", "pareto_front.csv", "pareto_front.json", "pareto_layers.png", "base.json", "search_space.yaml", "objectives.yaml"} <= names
    folder = Path(client.download_artifacts(tracker.parent_run_id, ""))
    assert (folder / "pareto_front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (folder / "pareto_front.html").read_text()
    assert "<script src=" not in html and "Plotly.newPlot" in html, "plotly.js must be inline: the machine is offline"
    table = json.loads((folder / "pareto_front.json").read_text())
    assert {row["trial"] for row in table} == front
    assert all(row["mlflow_run_id"] == runs[row["trial"]].info.run_id for row in table)
    assert len((folder / "pareto_front.csv").read_text().strip().splitlines()) == len(front) + 1


def test_pareto_tags_follow_the_front(store: Path) -> None:
    study = new_study("moving-front")
    tracker = Tracker(study_name="moving-front", tracking_uri=str(store))
    start(tracker, study)
    weak = {name: {"keep_ratio": 1.0, "w_bits": 8, "a_bits": 8, "w_sparsity": 0.0, "f_sparsity": 0.0} for name in LAYERS}
    for accuracy, bops in ((90.0, 1e6), (95.0, 5e5)):
        metrics = {**toy_evaluate(weak), "accuracy": accuracy, "bops": bops}
        frozen = optuna.trial.create_trial(values=[accuracy, bops], user_attrs={"policy": policy_of(weak), "layers": weak, "metrics": metrics})
        study.add_trial(frozen)
        tracker.log_trial(event_of(study.trials[-1]))
        refresh(tracker, study)
        runs = children(client_of(store), tracker)
        assert {n: r.data.tags["pareto"] for n, r in runs.items()} == {t.number: str(t.number == len(study.trials) - 1).lower() for t in study.trials}
    assert runs[0].data.tags["pareto_rank"] == "1"


def test_a_told_trial_is_tagged_with_its_rank_in_its_own_write(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Reporter hands log_trial the told trial's rank: the refresh after it writes nothing more for it."""
    study = new_study("rank-in-one-write")
    tracker = Tracker(study_name="rank-in-one-write", tracking_uri=str(store))
    start(tracker, study)
    weak = {name: {"keep_ratio": 1.0, "w_bits": 8, "a_bits": 8, "w_sparsity": 0.0, "f_sparsity": 0.0} for name in LAYERS}
    metrics = {**toy_evaluate(weak), "accuracy": 90.0, "bops": 1e6}
    study.add_trial(optuna.trial.create_trial(values=[90.0, 1e6], user_attrs={"policy": policy_of(weak), "layers": weak, "metrics": metrics}))
    tracker.log_trial(event_of(study.trials[0]), rank=0)
    assert {k: children(client_of(store), tracker)[0].data.tags[k] for k in ("pareto", "pareto_rank")} == {"pareto": "true", "pareto_rank": "0"}
    writes: list[str] = []
    logged = tracker._log
    monkeypatch.setattr(tracker, "_log", lambda run_id, **kw: writes.append(run_id) or logged(run_id, **kw))
    tracker.refresh(dataclasses.replace(Front(study, read_meta(study)).snapshot(), changed={0: 0}))
    assert tracker.parent_run_id is not None and set(writes) <= {tracker.parent_run_id}, "no second write to the trial's run"


def test_params_are_batched_and_long_values_become_an_artifact(store: Path) -> None:
    study = new_study("wide-policy")
    tracker = Tracker(study_name="wide-policy", tracking_uri=str(store))
    start(tracker, study)
    layers = {f"blocks.{i}.conv": {"keep_ratio": 0.5, "w_bits": 4, "a_bits": 8, "w_sparsity": 0.1, "f_sparsity": 0.0} for i in range(40)}
    policy = {**policy_of(layers), "re:blocks\\.\\d+": "pattern keys keep their meaning in policy.json", "calibration": list(range(2000))}
    study.add_trial(optuna.trial.create_trial(values=[90.0, 1e6], user_attrs={"policy": policy, "layers": layers, "metrics": {"accuracy": 90.0, "bops": 1e6}}))
    tracker.log_trial(event_of(study.trials[0]))
    run = children(client_of(store), tracker)[0]
    assert len(run.data.params) == 40 * 5 + 3  # 203 params: three batches of at most 100
    assert run.data.params["re:blocks_._d_"] == "pattern keys keep their meaning in policy.json"
    long_path = client_of(store).download_artifacts(run.info.run_id, "long_params.json")
    assert json.loads(json.loads(Path(long_path).read_text())["calibration"]) == list(range(2000))
    assert {"policy.json", "layers.json", "long_params.json"} <= artifact_names(client_of(store), run.info.run_id)


def test_logging_is_idempotent_and_a_resume_reuses_the_parent(store: Path) -> None:
    study = new_study("resumed")
    first = Tracker(study_name="resumed", tracking_uri=str(store))
    start(first, study)
    rng = random.Random(1)
    frozen = run_trial(study, first, rng)
    first.log_trial(event_of(frozen))
    first.close(status="KILLED")

    again = Tracker(study_name="resumed", tracking_uri=str(store))
    start(again, study)
    again.reconcile(finished_events(study))
    run_trial(study, again, rng)
    client = client_of(store)
    assert again.parent_run_id == first.parent_run_id
    assert len(parents(client, again)) == 1
    assert client.get_run(again.parent_run_id).info.status == "RUNNING"
    assert sorted(children(client, again)) == [0, 1]

    client.delete_run(first.parent_run_id)  # a parent gone from the store is replaced, not resurrected
    third = Tracker(study_name="resumed", tracking_uri=str(store))
    start(third, study)
    third.reconcile(finished_events(study))
    assert third.parent_run_id != first.parent_run_id
    assert parent_of(study) == third.parent_run_id
    assert sorted(children(client, third)) == [0, 1]


def test_a_search_killed_while_logging_its_new_parent_leaves_it_for_the_resume(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = new_study("killed-at-start")
    first = Tracker(study_name="killed-at-start", tracking_uri=str(store))

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # what a SIGKILL between creating the parent run and logging its params looks like here

    with monkeypatch.context() as patch:
        patch.setattr(Tracker, "_log", killed)
        with pytest.raises(KeyboardInterrupt):
            start(first, study)
    assert first.parent_run_id is not None
    assert parent_of(study) == first.parent_run_id

    again = Tracker(study_name="killed-at-start", tracking_uri=str(store))
    start(again, study)
    again.close()
    client = client_of(store)
    assert again.parent_run_id == first.parent_run_id
    assert [run.info.status for run in parents(client, again)] == ["FINISHED"]


KILLED_WORKER = """
import os, random, signal, sys
sys.path.insert(0, {tests!r})
from test_tracking import new_study, run_trial, start
from autoprune.search.front import event_of
from autoprune.tracking import Tracker

study = new_study("killed", storage={storage!r})
tracker = Tracker(study_name="killed", tracking_uri={store!r})
start(tracker, study)
rng = random.Random(2)
for _ in range(3):
    run_trial(study, tracker, rng)
for _ in range(2):  # two trials in flight when the process dies
    trial = study.ask()
    trial.set_user_attr("policy", {{"version": 1, "layers": {{}}, "order": "joint"}})
    tracker.log_trial(event_of(trial))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resuming_a_killed_search_leaves_no_running_child(store: Path, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code = KILLED_WORKER.format(tests=str(Path(__file__).parent), storage=storage, store=str(store))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr

    study = optuna.load_study(study_name="killed", storage=storage)
    orphans = study.get_trials(states=(TrialState.RUNNING,))
    assert len(orphans) == 2
    # What the runner does on resume before tracking starts: a trial of a dead process on this host fails
    # as interrupted; one found by Optuna's heartbeat check fails without a reason.
    study._storage.set_trial_user_attr(orphans[0]._trial_id, "failure", "interrupted: process host:123 died")
    study._storage.set_trial_user_attr(orphans[0]._trial_id, "interrupted", True)
    study.tell(orphans[0].number, state=TrialState.FAIL)
    study.tell(orphans[1].number, state=TrialState.FAIL)
    late = optuna.trial.create_trial(values=[80.0, 1e5], user_attrs={"policy": policy_of({}), "metrics": {"accuracy": 80.0, "bops": 1e5}})
    study.add_trial(late)  # finished while MLflow could not see it

    tracker = Tracker(study_name="killed", tracking_uri=str(store))
    start(tracker, study)
    assert sum(r.info.status == "RUNNING" for r in children(client_of(store), tracker).values()) == 2
    live = study.ask()  # a trial another live process of the study is running: left alone
    tracker.log_trial(event_of(live))
    tracker.reconcile(finished_events(study))
    runs = children(client_of(store), tracker)
    assert sorted(runs) == [t.number for t in study.trials]
    assert [n for n, r in runs.items() if r.info.status == "RUNNING"] == [live.number]
    assert runs[orphans[0].number].info.status == "KILLED"
    assert runs[orphans[0].number].data.tags[FAILURE_TAG] == "interrupted: process host:123 died"
    assert runs[orphans[1].number].info.status == "FAILED"
    assert runs[orphans[1].number].data.tags[FAILURE_TAG] == FAILED_REASON
    assert runs[study.trials[-2].number].info.status == "FINISHED"

    tracker.log_trial(event_of(study.tell(live, state=TrialState.FAIL)))
    assert not [n for n, r in children(client_of(store), tracker).items() if r.info.status == "RUNNING"]


CONCURRENT_WORKER = """
import random, sys
sys.path.insert(0, {tests!r})
from test_tracking import run_trial, start
import optuna
from autoprune.tracking import Tracker

study = optuna.load_study(study_name="crowd", storage={storage!r})
tracker = Tracker(study_name="crowd", tracking_uri={store!r})
start(tracker, study)
rng = random.Random({seed})
for _ in range({count}):
    run_trial(study, tracker, rng)
assert not tracker.offline
"""


def test_concurrent_workers_lose_no_runs(store: Path, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = new_study("crowd", storage=storage)
    coordinator = Tracker(study_name="crowd", tracking_uri=str(store))
    start(coordinator, study)
    workers = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_WORKER.format(tests=str(Path(__file__).parent), storage=storage, store=str(store), seed=seed, count=4)], stderr=subprocess.PIPE, text=True)
        for seed in range(3)
    ]
    for worker in workers:
        assert worker.wait(timeout=120) == 0, worker.stderr.read() if worker.stderr else ""
    # what the search's close does: take in what other processes logged, then tag every rank
    coordinator.reconcile(finished_events(study))
    refresh(coordinator, study)
    runs = children(client_of(store), coordinator)
    assert sorted(runs) == list(range(12))
    assert len(parents(client_of(store), coordinator)) == 1
    assert {n for n, r in runs.items() if r.data.tags.get("pareto") == "true"} == {t.number for t in front_trials(study)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_tracking_server_that_is_down_does_not_stop_the_search(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    study = new_study("offline")
    tracker = Tracker(study_name="offline", tracking_uri=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    start(tracker, study)
    rng = random.Random(3)
    for _ in range(3):
        run_trial(study, tracker, rng)
    tracker.log_signals({"epochs": [0], "layers": {}, "total": {"snr": [1.0]}, "val_accuracy": [50.0]})
    tracker.close()
    assert time.monotonic() - started < 20
    assert tracker.offline
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("autoprune: MLflow tracking")]
    assert len(warnings) == 1, warnings


def test_one_bad_call_is_reported_once_and_tracking_goes_on(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = new_study("bad-call")
    tracker = Tracker(study_name="bad-call", tracking_uri=str(store))
    start(tracker, study)
    tracker.close(status="NOT_A_STATUS")
    tracker.close(status="NOT_A_STATUS")
    run_trial(study, tracker, random.Random(5))
    assert not tracker.offline
    assert sorted(children(client_of(store), tracker)) == [0]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("autoprune: MLflow tracking")]
    assert len(warnings) == 1 and "later MLflow failures are not reported" in warnings[0]


def test_the_default_store_is_one_folder_under_mlruns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert resolve_store(None) == (default_tracking_uri(), tmp_path.resolve() / "mlruns" / "artifacts")
    assert resolve_store("sqlite:///elsewhere/x.db") == (f"sqlite:///{tmp_path.resolve()}/elsewhere/x.db", tmp_path.resolve() / "elsewhere" / "artifacts")
    assert resolve_store("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://db/mlflow")
    assert resolve_store(None) == ("postgresql://db/mlflow", None)


# Dies the way SIGKILL would, halfway through MLflow's schema: after the fifth CREATE TABLE.
KILLED_MID_SCHEMA = """
import os, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
from autoprune.tracking.store import open_client
created = []

@event.listens_for(Engine, "before_cursor_execute")
def die(conn, cursor, statement, *args):
    if statement.lstrip().upper().startswith("CREATE TABLE"):
        created.append(statement)
        if len(created) == 5:
            os._exit(137)

open_client(sys.argv[1]).search_experiments()
"""


def test_a_search_killed_while_mlflow_creates_its_store_leaves_none_half_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # no kept schema: MLflow builds this store table by table
    uri, _ = resolve_store(str(tmp_path / "mlruns"))
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SCHEMA, uri], capture_output=True, text=True)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
    assert [p.name for p in (tmp_path / "mlruns").glob(".mlflow.db.*")], "the killed process left its scratch file"

    from autoprune.tracking.store import open_client

    client = open_client(uri)
    experiment = client.create_experiment("after-the-kill")
    assert client.get_experiment_by_name("after-the-kill").experiment_id == experiment
    assert not list((tmp_path / "mlruns").glob(".mlflow.db.*")), "the next creation removed the dead process's scratch"


def test_a_new_store_copies_the_kept_schema_and_gets_its_own_default_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from autoprune.tracking.store import create_whole, open_client

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    built, copied = (resolve_store(str(tmp_path / name))[0] for name in ("built", "copied"))
    create_whole(built)
    kept = list((tmp_path / "cache" / "mlflow").glob("empty-store-*.db"))
    assert len(kept) == 1, "the first store's schema is kept"
    with sqlite3.connect(kept[0]) as schema:
        assert schema.execute("SELECT count(*) FROM experiments").fetchone() == (0,), "without the first store's Default experiment"

    def tables(uri: str) -> dict[str, list[str]]:
        """Every table, index and its definition's lines: MLflow's own builds order constraints differently."""
        with sqlite3.connect(uri.removeprefix("sqlite:///")) as db:
            rows = db.execute("SELECT name, sql FROM sqlite_master").fetchall()
        return {name: sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()) for name, sql in rows}

    create_whole(copied)
    assert tables(copied) == tables(built)
    client = open_client(copied)
    assert client.get_experiment("0").artifact_location == (tmp_path / "copied" / "artifacts" / "0").as_uri()
    run = client.create_run("0")
    client.log_metric(run.info.run_id, "accuracy", 91.0)
    assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 91.0}

    kept[0].write_bytes(b"not a database")  # a kept schema MLflow refuses: the store is built instead
    rebuilt = resolve_store(str(tmp_path / "rebuilt"))[0]
    create_whole(rebuilt)
    assert tables(rebuilt) == tables(built)


def test_reconcile_leaves_the_trials_of_another_live_process_to_its_own_tracker(store: Path) -> None:
    study = new_study("owners")
    tracker = Tracker(study_name="owners", tracking_uri=str(store))
    start(tracker, study)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    try:
        owners = {
            0: f"{host}:{live.pid}",  # running elsewhere on this host: its tracker logs it
            1: f"{host}:{dead.pid}",  # its process died before its tracker logged it: logged here
            2: "another-host:12",  # ended long ago on a host this one cannot see: nobody else will log it
            3: "another-host:13",  # ended a moment ago there: left to that host's tracker for a while
            4: None,  # no owner recorded (a study from before owners): logged
        }
        for number, owner in owners.items():
            attrs = {"policy": policy_of({}), "metrics": {"accuracy": 90.0 - number, "bops": 1e6}, **({"owner": owner} if owner else {})}
            study.add_trial(optuna.trial.create_trial(values=[90.0 - number, 1e6], user_attrs=attrs))
        events = finished_events(study)
        long_ago = events[2].completed.replace(year=events[2].completed.year - 1)
        events[2] = dataclasses.replace(events[2], completed=long_ago)
        tracker.reconcile(events)
        assert sorted(children(client_of(store), tracker)) == [1, 2, 4]
    finally:
        live.kill()
        live.wait()
    tracker.reconcile(finished_events(study))
    assert sorted(children(client_of(store), tracker)) == [0, 1, 2, 4], "once its process is gone, anyone logs it"


def test_training_signals_are_parent_metrics_by_epoch(store: Path) -> None:
    study = new_study("signals")
    tracker = Tracker(study_name="signals", tracking_uri=str(store))
    start(tracker, study)
    epochs = [0, 1, 2]
    signals = {
        "epochs": epochs,
        "layers": {name: {"S": [1.0, 2.0, 3.0], "N": [0.5, 0.2, 0.1], "snr": [2.0, 10.0, 30.0], "esn_a": [5.0, 20.0, 60.0]} for name in ("conv1", "fc")},
        "total": {"snr": [2.0, 10.0, 30.0], "esn_a": [10.0, 40.0, 120.0]},
        "val_accuracy": [60.0, 85.0, 95.0],
    }
    tracker.log_signals(signals)
    client = client_of(store)
    history = client.get_metric_history(tracker.parent_run_id, "signals.conv1.snr")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 2.0), (1, 10.0), (2, 30.0)]
    assert client.get_run(tracker.parent_run_id).data.metrics["signals.val_accuracy"] == 95.0
    assert {"signals.png", "signals.json"} <= artifact_names(client, tracker.parent_run_id)

    resumed = Tracker(study_name="signals", tracking_uri=str(store))
    start(resumed, study)
    resumed.log_signals(signals)
    assert resumed.parent_run_id == tracker.parent_run_id
    assert len(client.get_metric_history(tracker.parent_run_id, "signals.conv1.snr")) == 3, "a resume logs no second history"
    base = [key for key in client.get_run(tracker.parent_run_id).data.metrics if key.startswith("base.")]
    assert base and all(len(client.get_metric_history(tracker.parent_run_id, key)) == 1 for key in base)


def test_plots_take_any_number_of_objectives(tmp_path: Path) -> None:
    points = [plots.TrialPoint(i, {"accuracy": 90.0 + i, "bops": 10.0**i, "memory_mb": 5.0 - i}, rank=i % 2 if i != 3 else None) for i in range(5)]
    for objectives in (["accuracy"], ["accuracy", "bops"], ["accuracy", "bops", "memory_mb"]):
        assert plots.pareto_png(points, objectives, tmp_path / "front.png", base={"accuracy": 99.0, "bops": 1e6}).stat().st_size > 0
        assert "Plotly.newPlot" in plots.pareto_html(points, objectives, tmp_path / "front.html").read_text()
    assert plots.layers_png([], tmp_path / "empty.png").stat().st_size > 0
    assert plots.spread(list(range(10)), 4) == [0, 3, 6, 9]


def test_the_front_plot_legend_covers_no_point() -> None:
    # the front's best trade-offs crowd towards high accuracy at low cost, the corner the legend once sat in
    import matplotlib.pyplot as plt

    points = [plots.TrialPoint(i, {"accuracy": 99.5 - 0.1 * i, "bops": 1e4 * 2**i, "memory_mb": 0.01 * (i + 1)}, rank=0 if i < 6 else 1, prior="p" if i == 0 else None) for i in range(12)]
    for objectives in (["accuracy", "bops"], ["accuracy", "bops", "memory_mb"]):
        fig = plots.pareto_figure(points, objectives, base={"accuracy": 99.6, "bops": 1e7, "memory_mb": 0.2})
        fig.canvas.draw()
        legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None).get_window_extent()
        for ax in fig.axes:
            for collection in ax.collections:
                for x, y in ax.transData.transform(collection.get_offsets()):
                    assert not legend.contains(x, y), f"{objectives}: a point at {(x, y)} lies under the legend {legend}"
            assert not legend.overlaps(ax.get_window_extent()), "the legend overlaps a panel"
        plt.close(fig)


def test_importing_tracking_and_plots_loads_neither_mlflow_nor_plotting() -> None:
    code = "import sys, autoprune.tracking, autoprune.plots; print(sorted(m for m in ('mlflow', 'matplotlib', 'plotly') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_ui_refuses_a_busy_port(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "mlruns").mkdir()  # a store to show: the UI refuses one that does not exist first
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert serve_ui(port=sock.getsockname()[1], tracking_uri=str(tmp_path / "mlruns")) == 2
    assert "in use" in capsys.readouterr().err
