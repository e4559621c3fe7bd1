"""The runner: a search and a worker from start to end, on a study prepared by ``search.study``.

``run_search`` checks the executor's options, creates or resumes the study (``study.prepare``), records the
base model, enqueues the priors, opens the tracker and hands the remaining budget to the executor the config
names (``executors``); ``run_worker`` joins a study another process created. Every executor runs a trial
through the same lifecycle (``lifecycle.begin``/``finish``) and every told trial goes to one ``Reporter``
(``progress``), which updates the front once and shares its snapshot with the progress bar and the tracker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import optuna

from autoprune.errors import AutopruneError
from autoprune.search.budget import spent
from autoprune.search.confirm import confirm_front
from autoprune.search.executors import executor_for
from autoprune.search.lifecycle import OWNER, fail_orphaned_trials
from autoprune.search.loop import run_trials
from autoprune.search.objectives import ObjectiveSpec
from autoprune.search.priors import drop_waiting, enqueue_priors
from autoprune.search.progress import Reporter, open_tracker
from autoprune.search.space import SpaceSpec
from autoprune.search.study import SearchConfig, SearchContext, context_from_study, load_study, prepare, record_base
from autoprune.task import Task


@dataclass
class SearchOutcome:
    study: optuna.Study
    ran: int
    seconds: float
    context: SearchContext


def run_search(config: SearchConfig, *, task: Task | None = None, space: SpaceSpec | None = None, objectives: ObjectiveSpec | None = None) -> SearchOutcome:
    """Run (or resume) a search; ``task``, ``space`` and ``objectives`` objects (the Python API) replace the
    config's built-in task and spec paths."""
    start = time.monotonic()
    executor = executor_for(config)
    executor.preflight(config)  # a bad executor flag or an unreachable cluster fails before any training
    ctx = prepare(config, task=task, space=space, objectives=objectives)
    fail_orphaned_trials(ctx.study)
    evaluator = ctx.ensure_evaluator(progress=config.progress)
    record_base(ctx, evaluator)
    # a learned strategy's trials learn their policy: there is no policy to warm-start
    if config.priors and not ctx.space.learned:
        enqueue_priors(ctx, evaluator, kinds=config.priors)
    tracker = open_tracker(ctx, config.tracking_uri)
    signals = evaluator.base.extras.get("signals")
    if signals:
        tracker.log_signals(signals)
    deadline = start + config.timeout if config.timeout else None
    if executor.starts_other_processes:
        tracker.drain()  # the parent run is recorded in the study before any other process looks it up
    reporter = Reporter(ctx, tracker=tracker, progress=config.progress)
    ctx.notify = reporter.told
    status = "FAILED"
    try:
        ran = executor.run(ctx, config, deadline=deadline)
        if deadline is None or time.monotonic() < deadline:
            # the budget is spent: a queued prior left waiting would sit in the study for good
            drop_waiting(ctx.study)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        reporter.close(status=status)
    if config.confirm:
        confirm_front(ctx, evaluator, repeats=config.confirm)
    return SearchOutcome(ctx.study, ran, time.monotonic() - start, ctx)


def run_worker(*, study_name: str, storage: str, tracking_uri: str | None, progress: bool, threads: int | None = None, device: str | None = None) -> int:
    """Join a study created by `autoprune search` and run trials until its budget is spent.

    The task is rebuilt from the study's record (a built-in spec, ``--model --weights``, or a ``--task`` /
    ``reference=`` function), on ``device`` (default: CUDA when available).
    """
    from autoprune.device import resolve_device

    resolve_device(device, field="device")
    if threads is not None:
        if threads < 1:
            raise AutopruneError("threads", threads, "must be at least 1")
        import torch

        torch.set_num_threads(threads)
    study = load_study(study_name, storage)
    ctx = context_from_study(study, device=device)
    if ctx.fidelity is None and spent(study) >= ctx.budget:
        print(f"study {study_name} has spent its budget of {ctx.budget} trials: nothing to do")
        return 0
    ctx.ensure_evaluator(progress=progress)
    # The parent run belongs to the coordinating `search`: a worker logs its trials but never ends it.
    reporter = Reporter(ctx, tracker=open_tracker(ctx, tracking_uri), progress=progress)
    ctx.notify = reporter.told
    try:
        ran = run_trials(ctx, deadline=None)
    finally:
        reporter.close(status=None)
    print(f"worker {OWNER} ran {ran} trials of {study_name}")
    return 0


__all__ = ["SearchOutcome", "run_search", "run_worker"]
