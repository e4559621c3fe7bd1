"""Helpers of the end-to-end tests that drive `autoprune` as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

_SPAWNED: list[subprocess.Popen] = []
# The deadline of every wait on a search process. A passing test never reaches it (a wait returns when the
# process ends or the condition holds), so it can be long: on a loaded two-core CI a base-model training or a
# Ray start that takes 20 s here takes minutes, and short deadlines failed tests that would have passed.
PATIENCE = 1200.0


def autoprune(cwd: Path, *args: str, **kwargs: object) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", *args], cwd=cwd, env=env, **kwargs)  # type: ignore[arg-type]
    _SPAWNED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """A failed test must not leave a search running: it would slow every later test on two cores."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # lets a Ray driver shut its instance down
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def storage_of(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def tracking_of(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def wait_for(what: str, condition, proc: subprocess.Popen, timeout: float = PATIENCE) -> object:  # noqa: ANN001
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import OperationalError

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (OperationalError, StorageInternalError):  # the search holds the SQLite lock right now: ask again
            value = None
        if value:
            return value
        assert proc.poll() is None, f"the search ended before {what}: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
