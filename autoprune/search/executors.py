"""Executors: where trials run. Each is one class behind the ``Executor`` protocol, registered by name;
the name a config gives picks it here and nowhere else.

- ``local``: in this process, or with ``jobs > 1`` in this process plus ``jobs - 1`` worker processes
  (``autoprune worker``) sharing the study's storage;
- ``ray``: on Ray Tune, locally or on a cluster (``ray_executor``, imported only when chosen).

All of them run a trial through ``lifecycle`` and tell the study; the study's ``notify`` reports it.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from autoprune.search.runner import SearchConfig, SearchContext


class Executor(Protocol):
    # Whether trials run in other processes too, which open their own trackers: they find the study's MLflow
    # parent run in the study, so it must be recorded before they start.
    starts_other_processes: bool

    def preflight(self, config: "SearchConfig") -> None:
        """Every check of the executor's own options that needs no training (runs before any work)."""

    def run(self, ctx: "SearchContext", config: "SearchConfig", *, deadline: float | None) -> int:
        """Run the study's remaining budget; returns how many trials this executor ran."""


class InProcess:
    starts_other_processes = False

    def preflight(self, config: "SearchConfig") -> None:
        return None

    def run(self, ctx: "SearchContext", config: "SearchConfig", *, deadline: float | None) -> int:
        from autoprune.search.runner import run_trials

        return run_trials(ctx, deadline=deadline)


def share_cores(processes: int) -> int:
    """Torch threads per process when ``processes`` share this machine: oversubscribed cores make small
    models many times slower (measured here: 2 processes x 2 threads on 2 cores ran 15x slower per trial)."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(threads)
    return threads


class Processes:
    """This process runs trials too, beside ``jobs - 1`` worker processes on the same storage."""

    starts_other_processes = True

    def preflight(self, config: "SearchConfig") -> None:
        return None

    def run(self, ctx: "SearchContext", config: "SearchConfig", *, deadline: float | None) -> int:
        from autoprune.search.lifecycle import awaiting_owner, fail_orphaned_trials
        from autoprune.search.runner import run_trials, storage_url

        threads = share_cores(config.jobs)
        command = [sys.executable, "-m", "autoprune.cli", "worker", "--study", ctx.study.study_name, "--storage", storage_url(config.storage)]
        command += ["--quiet", "--threads", str(threads)] + (["--tracking-uri", config.tracking_uri] if config.tracking_uri else [])
        workers = [subprocess.Popen(command) for _ in range(config.jobs - 1)]
        try:
            ran = run_trials(ctx, deadline=deadline)
        finally:
            for proc in workers:
                if deadline is not None:
                    proc.terminate()
                proc.wait()
            orphans = fail_orphaned_trials(ctx.study)
        # A worker that died after this loop's last look held a slot of the budget that no one else will
        # run: every other process has already seen the budget spent. (One that died asking left a trial
        # with no owner, which run_trials fails once its grace period has passed.)
        if (orphans or awaiting_owner(ctx.study)) and (deadline is None or time.monotonic() < deadline):
            ran += run_trials(ctx, deadline=deadline)
        return ran


# name -> "module:class", so that choosing one imports only it (Ray loads only for the ray executor)
EXECUTORS: dict[str, str] = {
    "local": "autoprune.search.executors:InProcess",
    "processes": "autoprune.search.executors:Processes",
    "ray": "autoprune.search.ray_executor:RayExecutor",
}


def executor_for(config: "SearchConfig") -> Executor:
    """The executor the config names; ``local`` with several jobs is the multi-process one."""
    name = "processes" if config.executor == "local" and config.jobs > 1 else config.executor
    module, _, cls = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Executor", "InProcess", "Processes", "EXECUTORS", "executor_for", "share_cores"]
