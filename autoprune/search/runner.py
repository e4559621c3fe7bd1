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
from pathlib import Path
from typing import Any

import optuna

from autoprune.errors import AutopruneError
from autoprune.search.budget import spent
from autoprune.search.confirm import confirm_front
from autoprune.search.executors import executor_for
from autoprune.search.lifecycle import OWNER, fail_orphaned_trials
from autoprune.search.loop import run_trials
from autoprune.search.objectives import ObjectiveSpec
from autoprune.search.evaluate import Evaluator
from autoprune.search.ladder import PredictedPoint
from autoprune.search.priors import SENSITIVITY, UNIFORM, drop_waiting, enqueue_priors, predicted_front
from autoprune.search.progress import Reporter, open_tracker
from autoprune.search.record import FinalRecord, update_meta
from autoprune.search.report import final_rows, print_predicted
from autoprune.search.space import SpaceSpec
from autoprune.search.study import SearchConfig, SearchContext, context_from_study, load_study, prepare, record_base, storage_url
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
    predicted = record_predicted(ctx, evaluator) if not ctx.space.learned and {SENSITIVITY, UNIFORM} & set(config.priors) else []
    tracker = open_tracker(ctx, config.tracking_uri)
    signals = evaluator.base.extras.get("signals")
    if signals:
        tracker.log_signals(signals)
    if predicted:
        tracker.log_predicted([p.model_dump() for p in predicted], metric=predicted[0].metric)
        if config.progress:
            print_predicted(predicted)
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
        if config.finalize:
            reporter.bar.close()  # the trials are done: final training shows its own bar
            finalize_trials(
                ctx, tracker, steps=config.final_steps, seeds=config.final_seeds, select=config.final_select, progress=config.progress,
                jobs=config.jobs if config.executor == "local" else 1, storage=storage_url(config.storage),
            )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        reporter.close(status=status)
    if config.confirm:
        confirm_front(ctx, evaluator, repeats=config.confirm)
    return SearchOutcome(ctx.study, ran, time.monotonic() - start, ctx)


def record_predicted(ctx: SearchContext, evaluator: Evaluator) -> list[PredictedPoint]:
    """Rung 0 (``search.ladder``): the predicted front, measured and solved once per base model and space (the
    cache keeps it), kept in the study's record the first time."""
    meta = ctx.meta
    if meta.predicted is not None:
        return [PredictedPoint.model_validate(point) for point in meta.predicted]
    points = predicted_front(ctx, evaluator)
    update_meta(ctx.study, predicted=[p.model_dump() for p in points])
    return points


def final_folder(study_name: str) -> Path:
    """Where a study's final models are kept until export copies them (under the cache root)."""
    from autoprune.files import cache_root

    return cache_root() / "final" / "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name)


def finalize_trials(
    ctx: SearchContext, tracker: Any, *, steps: int, seeds: int, select: str, progress: bool, jobs: int = 1, storage: str | None = None,
) -> dict[int, FinalRecord]:
    """Rung 3 of the study's candidates (``search.finalize``), each final model logged in its trial's MLflow run,
    then the predicted, proxy and final fronts on one plot in the parent run."""
    from autoprune.search.finalize import finalize_study
    from autoprune.search.pareto import final_front
    from autoprune.search.report import proxy_table
    from autoprune.task import batch_inputs

    example = batch_inputs(next(iter(ctx.task.loader("val", batch_size=4))))[:4].detach().cpu().float().numpy()

    def log(number: int, final: FinalRecord, model: Any) -> None:
        tracker.log_final(number, metrics={**final.mean, "seeds": float(len(final.seeds)), "steps": float(final.steps)}, model=model, example=example, files=[Path(final.weights)] if final.weights else [])

    finals = finalize_study(
        ctx, steps=steps, seeds=seeds, select=select, folder=final_folder(ctx.study.study_name), progress=progress, on_final=log, jobs=jobs, storage=storage,
    )
    front = final_front(ctx.study, ctx.objectives, finals)
    tracker.log_ladder(
        predicted=ctx.meta.predicted or [], proxy=proxy_table(ctx.study), final=final_rows(ctx.study, front),
        metric=next((m for m in ctx.objectives.metrics if m in ("bops", "macs")), "bops"),
    )
    return finals


def run_finalize(
    *, study_name: str, storage: str | None, tracking_uri: str | None, steps: int, seeds: int, select: str, progress: bool, task: Task | None = None,
    jobs: int = 1,
) -> SearchContext:
    """Final training of a stored study's candidates (``autoprune finalize``), logged in its MLflow runs."""
    from autoprune.search.ladder import check_final

    check_final(steps=steps, seeds=seeds, select=select)
    ctx = context_from_study(load_study(study_name, storage), task=task)
    ctx.ensure_evaluator(progress=progress)
    tracker = open_tracker(ctx, tracking_uri)
    status = "FAILED"
    try:
        finalize_trials(ctx, tracker, steps=steps, seeds=seeds, select=select, progress=progress, jobs=jobs, storage=storage_url(storage))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(status=status)
    return ctx


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


__all__ = ["SearchOutcome", "run_search", "run_worker", "run_finalize", "finalize_trials", "final_folder", "record_predicted"]
