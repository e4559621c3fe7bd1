"""Many machines share one study on PostgreSQL: a real server on 127.0.0.1 (Debian's ``postgresql``, which
``make test`` installs), a search with 3 worker processes, one killed with SIGKILL mid-trial, and the
study ends with exactly its budget of complete trials: none lost, none run twice, none left running."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from optuna.trial import TrialState

from cli_support import PATIENCE, _no_leftover_processes, autoprune, tracking_of, wait_for  # noqa: F401 (autouse fixture)
from test_workers import mlflow_children, space, worker_children

pytestmark = pytest.mark.e2e
BUDGET = 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: as root, the cluster belongs to the postgres account.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL cluster in a temp folder, listening on 127.0.0.1 only; stopped afterwards."""
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if initdb is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql)")
    bin_dir = Path(initdb).resolve().parent
    folder = Path(tempfile.mkdtemp(prefix="autoprune-pg-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = _free_port()
    subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "autoprune"]), check=True, capture_output=True, timeout=PATIENCE)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=60"
    subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"]), check=True, capture_output=True, timeout=PATIENCE)
    try:
        yield f"postgresql+psycopg2://autoprune@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]), capture_output=True, timeout=PATIENCE)
        shutil.rmtree(folder, ignore_errors=True)


def test_three_workers_on_postgres_survive_a_killed_worker(tmp_path: Path, postgres_url: str) -> None:
    # trials of a few seconds: the driver must not spend the budget before both workers have started
    (tmp_path / "space.yaml").write_text(space(800))
    args = [
        "search", "--space", str(tmp_path / "space.yaml"), "--trials", str(BUDGET), "--study", "s", "--no-priors", "--no-ladder",
        "--storage", postgres_url, "--tracking-uri", tracking_of(tmp_path), "--quiet", "--jobs", "3",
    ]
    driver = autoprune(tmp_path, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def trials() -> list[optuna.trial.FrozenTrial]:
        try:
            return optuna.load_study(study_name="s", storage=postgres_url).trials
        except KeyError:
            return []

    workers = wait_for("the two worker processes", lambda: len(worker_children(driver.pid)) == 2 and worker_children(driver.pid), driver)
    victim_pid = workers[0]
    owner = f"{socket.gethostname()}:{victim_pid}"
    (victim,) = wait_for(
        "a trial of the worker", lambda: [t.number for t in trials() if t.state == TrialState.RUNNING and t.user_attrs.get("owner") == owner], driver
    )
    os.kill(victim_pid, signal.SIGKILL)
    _, err = driver.communicate(timeout=PATIENCE)
    assert driver.returncode == 0, err.decode()[-2000:]

    final = trials()
    assert not [t.number for t in final if t.state == TrialState.RUNNING], "a trial was left running"
    complete = [t for t in final if t.state == TrialState.COMPLETE]
    assert len(complete) == BUDGET
    assert all(t.user_attrs.get("interrupted") for t in final if t.state != TrialState.COMPLETE), "a failure spent the budget"
    killed = next(t for t in final if t.number == victim)
    assert killed.state == TrialState.FAIL and f"process {owner} died" in killed.user_attrs["failure"]
    # none run twice: every complete trial told once, by one owner, and mirrored once in MLflow
    assert len({t.number for t in complete}) == BUDGET and all(t.user_attrs.get("owner") for t in complete)
    children = mlflow_children(tmp_path)
    assert {n for n, status in children.items() if status == "FINISHED"} == {t.number for t in complete}
    assert children[victim] == "KILLED"
