"""The multi-process executor refills the budget slot of a worker that died after the driver's last look, and
starts no other process before the MLflow parent run is recorded; a Ctrl-C between ask and tell fails the trial."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from autoprune.search import executors, lifecycle, runner
from autoprune.search.record import read_trial, write_trial


def prepared(tmp_path: Path, *, trials: int) -> runner.SearchContext:
    """A new digits study of ``trials`` trials, without priors."""
    config = runner.SearchConfig(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}", trials=trials, priors=False, progress=False)
    return runner.prepare(config)


def assert_one_trial_failed_by_ctrl_c(ctx: runner.SearchContext) -> None:
    (trial,) = ctx.study.get_trials()
    record = read_trial(trial)
    assert trial.state == TrialState.FAIL and record.interrupted and record.failure == "interrupted: Ctrl-C"


def test_a_slot_freed_by_a_late_dead_worker_is_run_by_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    rounds: list[float | None] = []
    orphans = iter([[4], []])
    monkeypatch.setattr(runner, "run_trials", lambda ctx, *, deadline: rounds.append(deadline) or 1)
    monkeypatch.setattr(lifecycle, "fail_orphaned_trials", lambda study: next(orphans))
    monkeypatch.setattr(executors, "share_cores", lambda processes: 1)
    ctx = SimpleNamespace(study=SimpleNamespace(study_name="s"))
    config = SimpleNamespace(jobs=1, storage=None, tracking_uri=None)
    assert executors.Processes().run(ctx, config, deadline=None) == 2
    assert rounds == [None, None]


def test_no_orphan_no_second_round(monkeypatch: pytest.MonkeyPatch) -> None:
    rounds: list[float | None] = []
    monkeypatch.setattr(runner, "run_trials", lambda ctx, *, deadline: rounds.append(deadline) or 3)
    monkeypatch.setattr(lifecycle, "fail_orphaned_trials", lambda study: [])
    monkeypatch.setattr(executors, "share_cores", lambda processes: 1)
    ctx = SimpleNamespace(study=SimpleNamespace(study_name="s"))
    config = SimpleNamespace(jobs=1, storage=None, tracking_uri=None)
    assert executors.Processes().run(ctx, config, deadline=None) == 3
    assert len(rounds) == 1


def test_other_processes_start_after_the_parent_run_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers look the study's MLflow parent run up; one that found none would open a second parent."""
    from autoprune.search.record import read_meta

    seen: list[str | None] = []

    def run(self: executors.Processes, ctx, config, *, deadline: float | None) -> int:  # noqa: ANN001
        seen.append(read_meta(ctx.study).mlflow_parent_run_id)
        return 0

    monkeypatch.setattr(executors.Processes, "run", run)
    config = runner.SearchConfig(
        study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        trials=2, jobs=2, priors=False, progress=False,
    )
    runner.run_search(config)
    assert seen and seen[0]


def test_a_ctrl_c_right_after_the_ask_fails_the_trial_as_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the trial has an owner, no orphan check can fail it: the loop itself must, or it holds a slot."""
    ctx = prepared(tmp_path, trials=3)

    calls: list[int] = []

    def interrupted_once_asked(study: object, number: int) -> int:
        calls.append(number)
        if len(calls) > 1:  # the first call counts the budget before any ask
            raise KeyboardInterrupt
        return 0

    monkeypatch.setattr(runner, "counted_before", interrupted_once_asked)
    with pytest.raises(KeyboardInterrupt):
        runner.run_trials(ctx, deadline=None)
    assert_one_trial_failed_by_ctrl_c(ctx)


def test_a_ctrl_c_during_the_ask_waits_for_it_and_fails_the_new_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna creates the trial before it samples: a Ctrl-C in between must not leave it RUNNING, unknown."""
    ctx = prepared(tmp_path, trials=3)
    ask = optuna.Study.ask

    def ask_interrupted_midway(study: optuna.Study, *args: object, **kwargs: object) -> optuna.Trial:
        trial = ask(study, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask_interrupted_midway)
    with pytest.raises(KeyboardInterrupt):
        runner.run_trials(ctx, deadline=None)
    assert_one_trial_failed_by_ctrl_c(ctx)


def test_the_loop_runs_a_trial_in_place_of_one_whose_process_died(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The orphan holds the last slot of the budget until the loop, finding the slots spent, fails it."""
    ctx = prepared(tmp_path, trials=2)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = ctx.study.ask()
    write_trial(ctx.study, orphan, owner=f"{socket.gethostname()}:{dead.pid}")
    monkeypatch.setattr(runner, "run_in_process", lambda ctx, trial: ctx.study.tell(trial, [90.0, 1.0]))
    assert runner.run_trials(ctx, deadline=None) == 2
    states = {t.number: (t.state, read_trial(t).interrupted) for t in ctx.study.get_trials()}
    assert states == {0: (TrialState.FAIL, True), 1: (TrialState.COMPLETE, False), 2: (TrialState.COMPLETE, False)}


def test_a_trial_beats_while_it_runs_and_goes_stale_once_it_stops(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])
    ctx = SimpleNamespace(study=study)
    stopped, running = study.ask(), study.ask()
    with lifecycle.heartbeat(ctx, running):
        with lifecycle.heartbeat(ctx, stopped):
            time.sleep(0.2)
        time.sleep(3.0)  # past the grace period for the trial that stopped beating
        optuna.storages.fail_stale_trials(study)
        states = {t.number: t.state for t in study.get_trials()}
    assert states == {stopped.number: TrialState.FAIL, running.number: TrialState.RUNNING}
