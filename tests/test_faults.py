"""Faults a search and an export survive with no residue (issue 25): two searches started on one new study,
an export killed mid-way, a full disk during a search, a damaged MLflow store, a `search --jobs 2` killed
outright. Each is reproduced, then the rerun (or the survivor) is checked: every finished trial kept, none left
RUNNING or WAITING, one MLflow child run per trial, no hidden file or process left behind."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from cli_support import PATIENCE, _no_leftover_processes, autoprune, storage_of, tracking_of, wait_for  # noqa: F401 (autouse fixture)
from test_workers import assert_budget_spent_once, mlflow_children, search_args, trials_of, worker_children

pytestmark = pytest.mark.e2e


def _finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=PATIENCE)
    text = err.decode() if err else ""
    assert proc.returncode == 0, text[-2000:]
    return text


def _hidden(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f".{name}.*"))


def test_two_searches_started_on_one_new_study_enqueue_the_priors_once(tmp_path: Path) -> None:
    args = [a for a in search_args(tmp_path, 6, steps=20) if a != "--no-priors"]
    first, second = (autoprune(tmp_path, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2))
    _finish(first), _finish(second)
    trials = assert_budget_spent_once(tmp_path, 6)
    assert not [t.number for t in trials if t.state == TrialState.WAITING], "a trial was left waiting"
    priors = [t.user_attrs["prior"] for t in trials if t.user_attrs.get("prior") and not t.user_attrs.get("interrupted")]
    assert priors, "the priors were enqueued"
    assert len(priors) == len(set(priors)), f"a prior ran twice: {sorted(priors)}"
    assert all(k.startswith("autoprune_lock") is False for k in optuna.load_study(study_name="s", storage=storage_of(tmp_path)).user_attrs)
    assert set(mlflow_children(tmp_path)) == {t.number for t in trials}, "each trial has one child run, skipped ones included"


def _main(tmp_path: Path, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in this process (no interpreter start-up, MLflow already imported); returns its stderr."""
    from autoprune.cli import main

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    return err


def test_an_export_killed_mid_way_leaves_nothing_the_rerun_does_not_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _main(tmp_path, search_args(tmp_path, 3, steps=200), monkeypatch, capsys)
    export = ["export", "--study", "s", "--storage", storage_of(tmp_path), "--tracking-uri", tracking_of(tmp_path), "--out", "out"]
    killed = autoprune(tmp_path, *export, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + PATIENCE
    while not _hidden(tmp_path, "out"):  # the staging folder lives while the points are replayed
        assert killed.poll() is None and time.monotonic() < deadline, "the export ended before its staging folder was seen"
        time.sleep(0.01)
    killed.kill()
    killed.wait()
    assert _hidden(tmp_path, "out") and not (tmp_path / "out").exists(), "killed mid-way: a hidden staging folder, no export"
    _main(tmp_path, export, monkeypatch, capsys)
    assert (tmp_path / "out" / "report.json").is_file()
    assert _hidden(tmp_path, "out") == [], "the rerun removed what the killed export left"


def test_a_full_disk_during_a_search_is_one_line_and_the_rerun_finishes_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from autoprune.cli import main
    from autoprune.search import lifecycle

    monkeypatch.chdir(tmp_path)
    args = search_args(tmp_path, 4, steps=40)
    real, told = lifecycle.write_trial, []

    def full_disk(study, trial, **fields):  # noqa: ANN001, ANN003 - the storage's disk fills up at the second result
        if "metrics" in fields:
            told.append(trial.number)
            if len(told) == 2:
                raise OperationalError("UPDATE trial_user_attributes", {}, sqlite3.OperationalError("database or disk is full"))
        return real(study, trial, **fields)

    monkeypatch.setattr(lifecycle, "write_trial", full_disk)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0] and "Traceback" not in err[0], err
    cut = [t for t in trials_of(tmp_path) if t.number == told[1]][0]
    assert cut.state == TrialState.FAIL and cut.user_attrs["interrupted"], "the trial cut short is not left RUNNING"

    monkeypatch.setattr(lifecycle, "write_trial", real)
    assert main(args) == 0
    trials = assert_budget_spent_once(tmp_path, 4)
    assert not [t for t in trials if t.state == TrialState.WAITING]


def test_a_damaged_mlflow_store_is_said_in_one_line_and_the_search_runs_untracked(tmp_path: Path) -> None:
    # each search in a process of its own, as a user runs them: a resume logs again the trials of processes
    # that are gone, and MLflow keeps an engine per store in a process
    _finish(autoprune(tmp_path, *search_args(tmp_path, 1, steps=20), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    store = tmp_path / "mlruns" / "mlflow.db"
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 2])  # a disk that filled up, a copy cut short
    err = _finish(autoprune(tmp_path, *search_args(tmp_path, 2, steps=20), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    said = [line for line in err.splitlines() if "damaged" in line]
    assert len(said) == 1 and "untracked" in said[0], err[-2000:]
    assert sum(t.state == TrialState.COMPLETE for t in trials_of(tmp_path)) == 2
    assert store.stat().st_size == len(data) // 2, "the damaged store is left as it is, for the user to look at"

    store.write_bytes(b"")  # cut to nothing: SQLite takes it for a new database, MLflow built its schema in place
    err = _finish(autoprune(tmp_path, *search_args(tmp_path, 3, steps=20), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    said = [line for line in err.splitlines() if "empty" in line]
    assert len(said) == 1 and "a new one is made" in said[0], err[-2000:]
    with sqlite3.connect(store) as connection:
        logged = [int(v) for (v,) in connection.execute("SELECT value FROM tags WHERE key = 'autoprune.trial'")]
    assert sorted(logged) == sorted(t.number for t in trials_of(tmp_path)), "the new store holds every trial again, once"


def test_a_search_killed_outright_takes_its_workers_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # trials of several seconds and a budget the worker cannot finish alone within the wait below: a worker
    # that outlived its search would still be running trials then
    args = search_args(tmp_path, 8, "--jobs", "2", steps=1500)
    driver = autoprune(tmp_path, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    (worker,) = wait_for("the worker process", lambda: worker_children(driver.pid), driver)
    wait_for("a trial of the worker", lambda: [t for t in trials_of(tmp_path) if t.state == TrialState.RUNNING and t.user_attrs.get("owner", "").endswith(f":{worker}")], driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 20  # the watch looks every second; the trial it cuts short ends at its next step
    while Path(f"/proc/{worker}").exists() and _state(worker) != "Z" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{worker}").exists() or _state(worker) == "Z", "the worker outlived its search"
    mine = [t for t in trials_of(tmp_path) if t.user_attrs.get("owner", "").endswith(f":{worker}")]
    assert all(t.state != TrialState.RUNNING for t in mine), "the worker failed its trial as interrupted on the way out"

    # the rerun fails the trial the killed search left RUNNING and runs one more (a budget one above what is done)
    done = sum(t.state == TrialState.COMPLETE for t in trials_of(tmp_path))
    rerun = [a for a in search_args(tmp_path, done + 1, steps=1500)]
    _main(tmp_path, rerun, monkeypatch, capsys)
    assert_budget_spent_once(tmp_path, done + 1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


def test_a_write_killed_mid_way_is_cleared_by_the_next_write_of_that_path(tmp_path: Path) -> None:
    """The atomic-write path itself: a process killed inside it leaves a hidden sibling named by its pid; the
    next write of the same path, by any process of this host, removes it (and puts back a folder it had
    moved aside)."""
    import sys

    from autoprune.files import atomic_folder, write_atomic

    target, folder = tmp_path / "policy.json", tmp_path / "export"
    code = (
        "import os, sys\nfrom autoprune.files import atomic_folder, atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n    tmp.write_text('half')\n"
        f"    with atomic_folder({str(folder)!r}) as staging:\n        (staging / 'x').write_text('half')\n        os._exit(9)\n"
    )
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}, check=False)
    assert len(_hidden(tmp_path, "policy.json")) == 1 and len(_hidden(tmp_path, "export")) == 1
    write_atomic(target, "{}")
    with atomic_folder(folder) as staging:
        (staging / "report.json").write_text("{}")
    assert _hidden(tmp_path, "policy.json") == [] and _hidden(tmp_path, "export") == []
    assert target.read_text() == "{}" and (folder / "report.json").is_file()
