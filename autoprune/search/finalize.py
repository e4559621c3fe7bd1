"""Final training, rung 3 of the fidelity ladder (``search.ladder``): what a user deploys.

A candidate's fine-tuned model (rung 2) is rebuilt by replaying its policy (seeded, so the weights are the
ones the trial scored: their checksum is compared with the one the trial recorded) and trained further with
the same recipe for ``steps`` steps (``compress.train_further``: distillation from the float base model,
warmup then cosine, the best-validation checkpoint, BN statistics re-estimated), once per seed. Each seed's
model is scored on the validation search subset, the whole validation split and the test split; the study
records the mean, the spread and the 95% interval over the seeds, and keeps the model of the seed best on
validation (its file, its own metrics and its checksum), so that export hands over a model that reloads to
its recorded metric exactly.

Which candidates: those that could still be on the final front (``select="pareto"``). They are taken by the
rank of their rung-2 values (the rung-2 front first, cheapest first objective first), and each is trained
only when its rung-2 values, predicted up through the line and margin learned from the candidates trained
before it (``fidelity.agreement``, leave-one-out residuals at their 0.9 quantile), are dominated by no final
point yet; until three are trained, every candidate of the rung-2 front is. ``select="front"`` trains the whole
rung-2 front, and a bound (``"bops<=1e6"``) the front points that meet it. A study finalized before keeps its
final points (with as many seeds and steps); resuming trains what is missing. The study's final front is of
the latest finalize's steps: a finalize with other steps leaves the earlier records stored, off that front.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from autoprune.errors import AutopruneError
from autoprune.intervals import mean_spread
from autoprune.metrics import BY_NAME, parse_bound
from autoprune.policy import Policy
from autoprune.search.fidelity import agreement, could_reach_front
from autoprune.search.ladder import DEFAULT_STEPS, check_final
from autoprune.search.pareto import nondomination_ranks
from autoprune.search.record import FinalRecord, read_finals, read_trial, update_meta, write_finals
from autoprune.search.study import SearchContext

def candidates(ctx: SearchContext) -> list[FrozenTrial]:
    """The study's fine-tuned feasible trials, best rank first, and within a rank by their first objective."""
    trials = [t for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values is not None and read_trial(t).feasible]
    if not trials:
        return []
    ranks = nondomination_ranks([t.values for t in trials], ctx.objectives.directions)
    sign = -1.0 if ctx.objectives.directions[0] == "maximize" else 1.0
    order = sorted(zip(ranks, trials), key=lambda pair: (pair[0], sign * pair[1].values[0]))
    return [t for _, t in order]


def _selected(ctx: SearchContext, trials: list[FrozenTrial], select: str) -> list[FrozenTrial]:
    if select == "pareto":
        return trials
    ranks = nondomination_ranks([t.values for t in trials], ctx.objectives.directions)
    front = [t for t, rank in zip(trials, ranks) if rank == 0]
    if select == "front":
        return front
    metric, op, limit = parse_bound(select, names=None)
    known = set(BY_NAME) | set(ctx.objectives.metrics)
    if metric not in known:
        raise AutopruneError("select", select, f"names no metric (metrics: {', '.join(sorted(known))})")
    values = [(t, (read_trial(t).metrics or {}).get(metric, math.nan)) for t in front]
    chosen = [t for t, v in values if (v <= limit if op == "<=" else v >= limit)]
    if not chosen:
        raise AutopruneError("select", select, "matches no point of the rung-2 front")
    return chosen


def _values(ctx: SearchContext, metrics: dict[str, float]) -> list[float]:
    return [float(v) for v in ctx.objectives.values(metrics)]


def worth_training(ctx: SearchContext, rung2: dict[str, float], finals: dict[int, FinalRecord], pairs: list[tuple[dict[str, float], dict[str, float]]]) -> bool:
    """Whether a candidate's rung-2 values, predicted up to rung 3, could still reach the final front."""
    directions = ctx.objectives.directions
    agreements = [
        agreement([(low[m], high[m]) for low, high in pairs], direction=d, quantile=0.9, min_pairs=3)
        for m, d in zip(ctx.objectives.metrics, directions)
    ]
    front = [_values(ctx, f.mean) for f in finals.values() if all(v <= 0 for v in ctx.objectives.violations(f.mean))]
    return could_reach_front(_values(ctx, rung2), front, directions=directions, agreements=agreements)


def finalize_study(
    ctx: SearchContext, *, steps: int = DEFAULT_STEPS, seeds: int = 1, select: str = "pareto", folder: Path,
    progress: bool = False, on_final: Callable[[int, FinalRecord, Any], None] | None = None, jobs: int = 1, storage: str | None = None,
) -> dict[int, FinalRecord]:
    """Train the candidates that could be on the final front further (rung 3); trial number -> its record.

    The kept models are saved in ``folder`` (``trial_NNNN.safetensors`` with its policy); ``on_final`` hears
    each new record with its kept model (the tracker logs them). ``jobs > 1`` trains that many candidates at
    once, each in a worker process that rebuilds the study's context from ``storage`` (the task must be one
    another process can rebuild); a candidate is then judged worth training on the finals known when a worker
    frees, so a few more may be trained than one process would, never fewer."""
    from tqdm.auto import tqdm

    check_final(steps=steps, seeds=seeds, select=select)
    evaluator = ctx.ensure_evaluator(progress=False)
    chosen = _selected(ctx, candidates(ctx), select)
    if not chosen:
        raise AutopruneError("study", ctx.study.study_name, "has no completed feasible trial to finalize")
    update_meta(ctx.study, final_steps=steps)
    finals = {n: f for n, f in read_finals(ctx.study).items() if f.steps == steps and len(f.seeds) >= seeds}
    numbers = {t.number: t for t in chosen}
    pairs = [((read_trial(numbers[n]).metrics or {}), f.mean) for n, f in finals.items() if n in numbers]
    waiting = [t for t in chosen if t.number not in finals]
    bar = tqdm(total=len(chosen), initial=len(chosen) - len(waiting), desc="final training", unit="candidate", disable=not progress)
    pool = _Workers(ctx, storage=storage, jobs=jobs) if jobs > 1 else _InProcess(ctx, evaluator)
    running: dict[Future[FinalRecord], FrozenTrial] = {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                trial = waiting.pop(0)
                bar.update(1)
                if select == "pareto" and not worth_training(ctx, dict(read_trial(trial).metrics or {}), finals, pairs):
                    continue
                running[pool.submit(trial, steps=steps, seeds=seeds, folder=folder)] = trial
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: running[f].number):
                trial = running.pop(future)
                final = future.result()
                finals[trial.number] = final
                pairs.append((dict(read_trial(trial).metrics or {}), final.mean))
                write_finals(ctx.study, {**read_finals(ctx.study), trial.number: final})
                if on_final is not None:
                    on_final(trial.number, final, pool.kept_model(trial.number, final))
    except BaseException:
        pool.close(abandon=True)
        raise
    else:
        pool.close()
    finally:
        bar.close()
    return finals


def train_candidate(ctx: SearchContext, evaluator: Any, trial: FrozenTrial, *, steps: int, seeds: int, folder: Path) -> tuple[FinalRecord, Any]:
    """One candidate's rung 3: its fine-tuned model replayed, trained once per seed, the seed best on validation
    kept and saved in ``folder``; its record and the kept ``CompressionResult``."""
    from autoprune.compress import compress, save_compressed, train_further

    record = read_trial(trial)
    name = ctx.task.metric_name
    # the samples each metric is scored on: an accuracy of one seed gets its Wilson interval over them
    samples = {name: ctx.task.scored_samples("val"), f"full_val_{name}": ctx.task.scored_samples("val", full=True), f"test_{name}": ctx.task.scored_samples("test", full=True)}
    policy = Policy.from_dict(record.policy or {})
    start = compress(evaluator.base.model, policy, task=ctx.task)
    start_checksum = start.checksum()
    if record.checksum is not None and record.checksum != start_checksum:
        print(
            f"note: trial {trial.number}'s fine-tuned weights replay with checksum {start_checksum}, not the {record.checksum} "
            "it recorded (another machine or thread count); final training starts from the replayed ones",
            flush=True,
        )
    runs = []
    for seed in range(policy.seed, policy.seed + seeds):
        result = train_further(start, evaluator.base.model, task=ctx.task, steps=steps, seed=seed)
        runs.append((seed, result, evaluator.score(result, test=True)))
    seed, kept, kept_metrics = max(runs, key=lambda run: (run[2][name], -run[0]))
    names = sorted(set.intersection(*(set(m) for _, _, m in runs)))
    stats = {m: mean_spread([metrics[m] for _, _, metrics in runs]) for m in names}
    # absolute: the study records it, and whoever reads the study (export, the UI, a worker) has its own cwd
    path = save_compressed(kept, Path(folder).resolve() / f"trial_{trial.number:04d}.safetensors", task=ctx.task)
    final = FinalRecord(
        steps=steps, seeds=[s for s, _, _ in runs],
        mean={m: v[0] for m, v in stats.items()}, std={m: v[1] for m, v in stats.items()},
        interval={m: _interval([metrics[m] for _, _, metrics in runs], samples=samples[m] if ctx.task.metric_is_accuracy else None) for m in samples if m in names},
        kept_seed=seed, kept=kept_metrics, start_checksum=start_checksum, checksum=kept.checksum(), weights=str(path),
    )
    return final, kept


class _InProcess:
    """Candidates trained here, one at a time: each future is done when ``submit`` returns."""

    def __init__(self, ctx: SearchContext, evaluator: Any) -> None:
        self.ctx, self.evaluator = ctx, evaluator
        self.models: dict[int, Any] = {}

    def submit(self, trial: FrozenTrial, *, steps: int, seeds: int, folder: Path) -> Future[FinalRecord]:
        future: Future[FinalRecord] = Future()
        final, kept = train_candidate(self.ctx, self.evaluator, trial, steps=steps, seeds=seeds, folder=folder)
        self.models[trial.number] = kept.model
        future.set_result(final)
        return future

    def kept_model(self, number: int, final: FinalRecord) -> Any:
        return self.models.pop(number)

    def close(self, *, abandon: bool = False) -> None:
        self.models.clear()


class _Workers:
    """Candidates trained in ``jobs`` spawned processes, each holding the study's context rebuilt once; the kept
    model comes back through its file (a CompressionResult holds hooks that do not pickle)."""

    def __init__(self, ctx: SearchContext, *, storage: str | None, jobs: int) -> None:
        import multiprocessing

        from autoprune.search.executors import threads_per_process

        self.ctx = ctx
        self.others = {child.pid for child in multiprocessing.active_children()}
        device = str(ctx.task.device)
        self.pool = ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(ctx.study.study_name, storage, device, threads_per_process(jobs)),
        )

    def submit(self, trial: FrozenTrial, *, steps: int, seeds: int, folder: Path) -> Future[FinalRecord]:
        return self.pool.submit(_train_in_worker, trial, steps=steps, seeds=seeds, folder=folder)

    def kept_model(self, number: int, final: FinalRecord) -> Any:
        from autoprune.compress import load_compressed

        assert final.weights is not None
        return load_compressed(final.weights, task=self.ctx.task).model

    def close(self, *, abandon: bool = False) -> None:
        """``abandon`` (Ctrl-C, an error): the candidates in training are stopped, not waited for (up to a
        candidate's whole training); the study keeps what finished."""
        import multiprocessing

        if abandon:
            for child in multiprocessing.active_children():
                if child.pid not in self.others:
                    child.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


# a worker process's study context and evaluator, built once by the pool's initializer
_worker_state: tuple[SearchContext, Any] | None = None


def _start_worker(study_name: str, storage: str | None, device: str, threads: int) -> None:
    import torch

    from autoprune.processes import watch_parent
    from autoprune.search.study import context_from_study, load_study

    global _worker_state
    watch_parent(os.getppid())  # a search killed outright takes its workers with it
    torch.set_num_threads(threads)
    ctx = context_from_study(load_study(study_name, storage), device=device)
    _worker_state = (ctx, ctx.ensure_evaluator(progress=False))


def _train_in_worker(trial: FrozenTrial, *, steps: int, seeds: int, folder: Path) -> FinalRecord:
    assert _worker_state is not None, "the pool's initializer builds the worker's context"
    ctx, evaluator = _worker_state
    final, _ = train_candidate(ctx, evaluator, trial, steps=steps, seeds=seeds, folder=folder)
    return final


def _interval(values: list[float], *, samples: int | None) -> tuple[float, float]:
    """The 95% Student-t interval of the mean over seeds; with a single seed, an accuracy's Wilson interval over
    the ``samples`` it was scored on (else the one value itself)."""
    mean, spread = mean_spread(values)
    if len(values) < 2:
        if samples is None:
            return mean, mean
        from autoprune.intervals import wilson

        return wilson(min(100.0, max(0.0, mean)), samples)
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(values) - 1)) * spread / math.sqrt(len(values))
    return mean - half, mean + half


def spearman(first: list[float], second: list[float]) -> float:
    """Spearman's rank correlation (NaN with fewer than three pairs or a constant side)."""
    if len(first) < 3:
        return math.nan
    from scipy import stats

    value = stats.spearmanr(np.asarray(first), np.asarray(second)).statistic
    return float(value)


__all__ = ["candidates", "finalize_study", "train_candidate", "worth_training", "spearman"]
