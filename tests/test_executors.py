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

from autoprune.api import search_config
from autoprune.search import executors, lifecycle, loop, runner, study
from autoprune.search.record import read_trial, write_trial


def prepared(tmp_path: Path, *, trials: int) -> study.SearchContext:
    """A new digits study of ``trials`` trials, without priors."""
    config = search_config(study="s", storage=f"sqlite:///{tmp_path / 's.db'}", trials=trials, priors=False, progress=False, ladder=False)
    return study.prepare(config)


def assert_one_trial_failed_by_ctrl_c(ctx: study.SearchContext) -> None:
    (trial,) = ctx.study.get_trials()
    record = read_trial(trial)
    assert trial.state == TrialState.FAIL and record.interrupted and record.failure == "interrupted: Ctrl-C"


def test_a_slot_freed_by_a_late_dead_worker_is_run_by_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    rounds: list[float | None] = []
    orphans = iter([[4], []])
    monkeypatch.setattr(loop, "run_trials", lambda ctx, *, deadline: rounds.append(deadline) or 1)
    monkeypatch.setattr(lifecycle, "fail_orphaned_trials", lambda study: next(orphans))
    monkeypatch.setattr(executors, "share_cores", lambda processes: 1)
    ctx = SimpleNamespace(study=SimpleNamespace(study_name="s"))
    config = SimpleNamespace(jobs=1, storage=None, tracking_uri=None)
    assert executors.Processes().run(ctx, config, deadline=None) == 2
    assert rounds == [None, None]


@pytest.mark.parametrize("unowned, rounds_run", [(False, 1), (True, 2)])
def test_a_second_round_only_for_a_trial_left_without_its_process(monkeypatch: pytest.MonkeyPatch, unowned: bool, rounds_run: int) -> None:
    """No orphan failed: one round, unless a worker died asking and left a trial no one owns (the second
    round's loop waits out its grace period and runs one in its place)."""
    rounds: list[float | None] = []
    monkeypatch.setattr(loop, "run_trials", lambda ctx, *, deadline: rounds.append(deadline) or 3)
    monkeypatch.setattr(lifecycle, "fail_orphaned_trials", lambda study: [])
    monkeypatch.setattr(lifecycle, "awaiting_owner", lambda study: unowned)
    monkeypatch.setattr(executors, "share_cores", lambda processes: 1)
    ctx = SimpleNamespace(study=SimpleNamespace(study_name="s"))
    config = SimpleNamespace(jobs=1, storage=None, tracking_uri=None)
    assert executors.Processes().run(ctx, config, deadline=None) == 3 * rounds_run
    assert len(rounds) == rounds_run


def test_other_processes_start_after_the_parent_run_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers look the study's MLflow parent run up; one that found none would open a second parent."""
    from autoprune.search.record import read_meta

    seen: list[str | None] = []

    def run(self: executors.Processes, ctx, config, *, deadline: float | None) -> int:  # noqa: ANN001
        seen.append(read_meta(ctx.study).mlflow_parent_run_id)
        return 0

    monkeypatch.setattr(executors.Processes, "run", run)
    config = search_config(
        study="s", storage=f"sqlite:///{tmp_path / 's.db'}", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        trials=2, jobs=2, priors=False, progress=False,
    )
    runner.run_search(config)
    assert seen and seen[0]


def test_a_trial_that_does_not_count_below_the_budget_is_made_up_for_and_no_more(tmp_path: Path) -> None:
    """Trial numbers bound the count from above, so the loop reads the study only near the budget; there it
    must count exactly: an interrupted trial leaves its slot to a trial numbered past the budget."""
    ctx = prepared(tmp_path, trials=3)
    died = ctx.study.ask()
    write_trial(ctx.study, died, failure="interrupted: process elsewhere:1 died", interrupted=True)
    ctx.study.tell(died, state=TrialState.FAIL)
    ctx.evaluator = SimpleNamespace(climb=lambda policy: ({"accuracy": 90.0, "accuracy_drop": 1.0, "bops": 1e6}, {}, {}))
    assert loop.run_trials(ctx, deadline=None) == 3
    assert [t.state for t in ctx.study.trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3, "no trial asked only to be skipped"
    assert loop.run_trials(ctx, deadline=None) == 0


def test_a_ctrl_c_right_after_the_ask_fails_the_trial_as_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the trial has an owner, no orphan check can fail it: the loop itself must, or it holds a slot."""
    ctx = prepared(tmp_path, trials=3)

    def interrupted_before_it_begins(ctx: object, trial: optuna.Trial) -> None:
        assert read_trial(trial).owner is None
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run_in_process", interrupted_before_it_begins)
    with pytest.raises(KeyboardInterrupt):
        loop.run_trials(ctx, deadline=None)
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
        loop.run_trials(ctx, deadline=None)
    assert_one_trial_failed_by_ctrl_c(ctx)


def test_the_loop_runs_a_trial_in_place_of_one_whose_process_died(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The orphan holds the last slot of the budget until the loop, finding the slots spent, fails it."""
    ctx = prepared(tmp_path, trials=2)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = ctx.study.ask()
    write_trial(ctx.study, orphan, owner=f"{socket.gethostname()}:{dead.pid}")
    monkeypatch.setattr(loop, "run_in_process", lambda ctx, trial: ctx.study.tell(trial, [90.0, 1.0]))
    assert loop.run_trials(ctx, deadline=None) == 2
    states = {t.number: (t.state, read_trial(t).interrupted) for t in ctx.study.get_trials()}
    assert states == {0: (TrialState.FAIL, True), 1: (TrialState.COMPLETE, False), 2: (TrialState.COMPLETE, False)}


def test_a_trial_whose_process_died_while_asking_for_it_is_failed_once_its_grace_period_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between Optuna's ask and the owner's record, a trial has neither an owner nor a heartbeat: the
    loop waits for its grace period (it may be another process's, about to be owned), then runs one in its place."""
    ctx = prepared(tmp_path, trials=2)
    unowned = ctx.study.ask()
    assert lifecycle.fail_orphaned_trials(ctx.study) == []  # too young to tell from a trial being asked
    monkeypatch.setattr(lifecycle, "GRACE_SECONDS", 0.5)
    monkeypatch.setattr(loop, "ORPHAN_POLL_SECONDS", 0.1)
    monkeypatch.setattr(loop, "run_in_process", lambda ctx, trial: ctx.study.tell(trial, [90.0, 1.0]))
    assert loop.run_trials(ctx, deadline=None) == 2
    trials = {t.number: t for t in ctx.study.get_trials()}
    assert {n: t.state for n, t in trials.items()} == {unowned.number: TrialState.FAIL, 1: TrialState.COMPLETE, 2: TrialState.COMPLETE}
    assert read_trial(trials[unowned.number]).interrupted
    assert read_trial(trials[unowned.number]).failure == "interrupted: its process died while asking for it"


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
