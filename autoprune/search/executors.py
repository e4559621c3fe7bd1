"""Executors: where trials run. Each is one class behind the ``Executor`` protocol, registered by name;
the name a config gives picks it here and nowhere else.

- ``local``: in this process, or with ``jobs > 1`` in this process plus ``jobs - 1`` worker processes
  (the API's ``worker`` entry point) sharing the study's storage;
- ``ray``: on Ray Tune, locally or on a cluster (``ray_executor``, imported only when chosen).

All of them run a trial through ``lifecycle`` and tell the study; the study's ``notify`` reports it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from typing import Protocol

from autoprune.search import lifecycle, loop
from autoprune.search.study import SearchConfig, SearchContext, storage_url


class Executor(Protocol):
    # Whether trials run in other processes too, which open their own trackers: they find the study's MLflow
    # parent run in the study, so it must be recorded before they start.
    starts_other_processes: bool

    def preflight(self, config: SearchConfig) -> None:
        """Every check of the executor's own options that needs no training (runs before any work)."""

    def run(self, ctx: SearchContext, config: SearchConfig, *, deadline: float | None) -> int:
        """Run the study's remaining budget; returns how many trials this executor ran."""


class InProcess:
    starts_other_processes = False

    def preflight(self, config: SearchConfig) -> None:
        return None

    def run(self, ctx: SearchContext, config: SearchConfig, *, deadline: float | None) -> int:
        return loop.run_trials(ctx, deadline=deadline)


def threads_per_process(processes: int) -> int:
    """Torch threads per process when ``processes`` share this machine: oversubscribed cores make small
    models many times slower (measured here: 2 processes x 2 threads on 2 cores ran 15x slower per trial)."""
    return max(1, (os.cpu_count() or 1) // processes)


def share_cores(processes: int) -> int:
    """This process's torch threads set to its share of the cores (``threads_per_process``)."""
    import torch

    threads = threads_per_process(processes)
    torch.set_num_threads(threads)
    return threads


# A worker process runs the API's worker entry point with its arguments as one JSON string.
WORKER_CODE = "import sys; from autoprune.api import worker_process; sys.exit(worker_process(sys.argv[1]))"


def worker_command(*, study: str, storage: str, tracking_uri: str | None, threads: int) -> list[str]:
    """The command line of one worker process on ``study`` (quiet, ``threads`` torch threads), watching this process."""
    args = {"study": study, "storage": storage, "tracking_uri": tracking_uri, "threads": threads, "progress": False, "parent": os.getpid()}
    return [sys.executable, "-c", WORKER_CODE, json.dumps(args)]


class Processes:
    """This process runs trials too, beside ``jobs - 1`` worker processes on the same storage."""

    starts_other_processes = True

    def preflight(self, config: SearchConfig) -> None:
        return None

    def run(self, ctx: SearchContext, config: SearchConfig, *, deadline: float | None) -> int:
        threads = share_cores(config.jobs)
        command = worker_command(study=ctx.study.study_name, storage=storage_url(config.storage), tracking_uri=config.tracking_uri, threads=threads)
        workers = [subprocess.Popen(command) for _ in range(config.jobs - 1)]
        try:
            ran = loop.run_trials(ctx, deadline=deadline)
        finally:
            for proc in workers:
                if deadline is not None:
                    proc.terminate()
                proc.wait()
            orphans = lifecycle.fail_orphaned_trials(ctx.study)
        # A worker that died after this loop's last look held a slot of the budget that no one else will
        # run: every other process has already seen the budget spent. (One that died asking left a trial
        # with no owner, which run_trials fails once its grace period has passed.)
        if (orphans or lifecycle.awaiting_owner(ctx.study)) and (deadline is None or time.monotonic() < deadline):
            ran += loop.run_trials(ctx, deadline=deadline)
        return ran


# name -> "module:class", so that choosing one imports only it (Ray loads only for the ray executor)
EXECUTORS: dict[str, str] = {
    "local": "autoprune.search.executors:InProcess",
    "processes": "autoprune.search.executors:Processes",
    "ray": "autoprune.search.ray_executor:RayExecutor",
}


def executor_for(config: SearchConfig) -> Executor:
    """The executor the config names; ``local`` with several jobs is the multi-process one."""
    name = "processes" if config.executor == "local" and config.jobs > 1 else config.executor
    module, _, cls = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Executor", "InProcess", "Processes", "EXECUTORS", "executor_for", "threads_per_process", "share_cores", "worker_command"]
