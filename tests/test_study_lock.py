"""The study-wide lock (``record.study_lock``) that lets several processes start on one study at once, and the
end of a search leaving no queued trial WAITING (``priors.drop_waiting``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autoprune.search.priors import UNQUEUED, drop_waiting
from autoprune.search.record import LOCK_PREFIX, read_trial, study_lock


def _study(url: str) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=url, load_if_exists=True)


def test_the_lock_lets_one_holder_in_at_a_time_and_leaves_nothing_behind(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _study(url)
    spans: list[tuple[float, float]] = []

    def hold() -> None:
        study = _study(url)  # a storage, an engine and a connection of its own, as another process has
        with study_lock(study, "priors", owner=f"{socket.gethostname()}:{os.getpid()}"):
            start = time.monotonic()
            time.sleep(0.3)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spans.sort()
    assert len(spans) == 3
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), f"two holders at once: {spans}"
    assert not [k for k in _study(url).user_attrs if k.startswith(LOCK_PREFIX)]


def test_a_lock_whose_holder_died_is_taken_over_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = _study(url)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    study.set_user_attr(f"{LOCK_PREFIX}priors", f"{socket.gethostname()}:{dead.stdout.strip()}")
    start = time.monotonic()
    with study_lock(study, "priors", owner=f"{socket.gethostname()}:{os.getpid()}"):
        assert time.monotonic() - start < 5


def test_queued_trials_left_when_the_budget_is_spent_are_failed_as_interrupted(tmp_path: Path) -> None:
    study = _study(f"sqlite:///{tmp_path / 'study.db'}")
    study.enqueue_trial({"x": 1.0}, user_attrs={"prior": "a"})
    study.enqueue_trial({"x": 2.0}, user_attrs={"prior": "b"})
    taken = study.ask()  # another process took one a moment ago: it is left to that process
    assert drop_waiting(study) == [1]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {0: TrialState.RUNNING, 1: TrialState.FAIL}
    record = read_trial(study.get_trials()[1])
    assert record.interrupted and record.failure == UNQUEUED and record.prior == "b"
    study.tell(taken, state=TrialState.FAIL)
