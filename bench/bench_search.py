"""Search-quality benchmark (issues 16 and 22): search arms at equal wall time per arm, side by side.

Arms: random search; TPE; TPE + the S/N bit prior (``--priors snr``); TPE + the sensitivity priors (the
integer program's policies over K cost budgets); and the three ways to spend a trial of issue 22, all with the
default priors (sensitivity and uniform): ``no-ladder`` fine-tunes every trial; ``restart-mf`` is issue 16's
multi-fidelity (a quarter of the fine-tune first, the full one, started over from the base model, only for a
candidate that could still reach the front); ``ladder`` (the default) runs the post-training rung first and
fine-tunes only a candidate whose rung-1 values, predicted up, could still reach the front.

With ``--final-steps N`` every arm's search is then finalized (``autoprune finalize``: the candidates that could
be on the final front, trained further by N steps of the recipe), and the report adds the final front's
hypervolume and, over every finalized candidate of every arm, Spearman's rank correlation of the final accuracy
with the search's fine-tuned accuracy (rung 2) and with the integer program's predicted loss increase (rung 0).

Per dataset and arm, over the seeds, it prints:
- the final hypervolume (log-scale BOPs, the float base model as the reference point, autoprune.search.pareto);
- the wall time to reach 95% of random search's final hypervolume (same seed), and to reach all of it;
- full trials and candidates (full + low-fidelity-only) per minute;
- the largest BOPs reduction at <= 1.5 points *test* accuracy drop (front points within 1.5 points on
  validation, re-compressed and checked on the test split, best first).

Every process runs torch on one thread (tiny convs on a shared machine run many times slower with more).
The base model, its S/N record and its sensitivity table are trained/measured once per dataset before the
arms, so that no arm pays for a cache the others read.

``--jobs N`` runs the (arm, seed) searches N at a time, each in a fresh spawned process that reads the same
cache; the report reloads every study from its SQLite file. At most one search per core: oversubscribed
cores would stretch some searches' trials and not others', and the arms compare at equal wall time.
``--no-tracking`` replaces the MLflow tracker with one that does nothing, for a machine without MLflow.

    python bench/bench_search.py --dataset digits mnist1d --seeds 0 1 2 --budget-seconds 40 --finetune-steps 50 --jobs 15 --no-tracking
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import optuna  # noqa: E402
import torch  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from autoprune.policy import Policy  # noqa: E402
from autoprune.search import runner  # noqa: E402
from autoprune.search.pareto import front_trials, hypervolume  # noqa: E402
from autoprune.search.record import read_trial  # noqa: E402
from autoprune.api import search_config  # noqa: E402
from autoprune.search.runner import run_search  # noqa: E402
from autoprune.files import CACHE_ENV  # noqa: E402
from autoprune.task import Task, TaskSpec  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPACE = REPO / "autoprune/specs/search_spaces/default.yaml"
OBJECTIVES = REPO / "autoprune/specs/objectives/accuracy_bops.yaml"
DATASETS = {"digits": TaskSpec(), "mnist1d": TaskSpec(dataset="mnist1d", model="mnist1d_cnn")}
# name -> (sampler, priors, fidelity, ladder)
ARMS: dict[str, tuple[str, tuple[str, ...], float | None, bool]] = {
    "random": ("random", (), None, False),
    "tpe": ("tpe", (), None, False),
    "tpe+snr": ("tpe", ("snr",), None, False),
    "tpe+sens": ("tpe", ("sensitivity",), None, False),
    "no-ladder": ("tpe", ("sensitivity", "uniform"), None, False),
    "restart-mf": ("tpe", ("sensitivity", "uniform"), 0.25, False),
    "ladder": ("tpe", ("sensitivity", "uniform"), None, True),
}
# more trials than any arm runs in the time: the wall-time budget is what binds
UNBOUNDED_TRIALS = 100_000
TEST_DROP = 1.5
TESTED_PER_ARM = 3


@dataclass
class Run:
    arm: str
    seed: int
    study: object
    start: dt.datetime
    wall: float

    def completed(self) -> list:
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))  # type: ignore[attr-defined]
        return sorted(trials, key=lambda t: t.datetime_complete)

    def candidates(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))  # type: ignore[attr-defined]

    def seconds_to(self, target: float) -> float | None:
        """Wall seconds from the start until the front's hypervolume first reached ``target``."""
        done = self.completed()
        for i, trial in enumerate(done):
            if hypervolume(self.study, trials=done[: i + 1]) >= target - 1e-12:  # type: ignore[arg-type]
                return (trial.datetime_complete - self.start).total_seconds()
        return None


def space_with_steps(workdir: Path, steps: int | None) -> Path:
    """The default space, its fine-tune shortened to ``steps`` (a loaded machine buys more trials per arm)."""
    if steps is None:
        return SPACE
    path = workdir / "space.yaml"
    path.write_text(SPACE.read_text().replace("finetune_steps: 150", f"finetune_steps: {steps}"))
    return path


@dataclass(frozen=True)
class Job:
    """One (arm, seed) search, as a child process receives it."""

    dataset: str
    arm: str
    seed: int
    seconds: float
    space: Path
    workdir: Path
    cache: str
    tracking: bool


@dataclass(frozen=True)
class Finished:
    """What a search hands back to the report: where its study lives and when its clock ran."""

    arm: str
    seed: int
    storage: str
    study_name: str
    start: dt.datetime
    wall: float
    mlflow_imported: bool

    def run(self) -> Run:
        return Run(self.arm, self.seed, optuna.load_study(study_name=self.study_name, storage=self.storage), self.start, self.wall)


class NoTracker:
    """Stands in for ``autoprune.tracking.Tracker`` where MLflow is not installed: every call the search
    makes on its tracker (run_search, runner.Reporter) does nothing."""

    def log_signals(self, signals: Mapping[str, Any]) -> None:
        pass

    def log_predicted(self, points: Any, *, metric: str) -> None:
        pass

    def log_final(self, number: int, **kwargs: Any) -> None:
        pass

    def log_ladder(self, **kwargs: Any) -> None:
        pass

    def log_trial(self, event: Any, *, rank: int | None = None) -> None:
        pass

    def refresh(self, snapshot: Any) -> None:
        pass

    def reconcile(self, events: Iterable[Any]) -> None:
        pass

    def close(self, *, status: str = "FINISHED") -> None:
        pass

    def flush(self) -> None:
        pass

    def drain(self) -> None:
        pass


def without_tracking() -> None:
    """Every search of this process opens a ``NoTracker``: run_search looks ``open_tracker`` up in its module."""
    runner.open_tracker = lambda ctx, tracking_uri: NoTracker()


def search(job: Job) -> Finished:
    """Run one arm's search for ``job.seconds`` in this process."""
    spec = DATASETS[job.dataset]
    sampler, priors, fidelity, ladder = ARMS[job.arm]
    name = f"{spec.dataset}-{job.arm}-{job.seed}"
    storage = f"sqlite:///{job.workdir / f'{name}.db'}"
    config = search_config(
        task=spec, space_path=job.space, objectives_path=OBJECTIVES, study=name, storage=storage,
        trials=UNBOUNDED_TRIALS, timeout=job.seconds, sampler=sampler, seed=job.seed,
        tracking_uri=tracking_uri(job.workdir) if job.tracking else None, priors=priors, fidelity=fidelity, ladder=ladder, progress=False,
    )
    start = dt.datetime.now()
    clock = time.perf_counter()
    run_search(config)
    return Finished(job.arm, job.seed, storage, name, start, time.perf_counter() - clock, "mlflow" in sys.modules)


def search_in_child(job: Job) -> Finished:
    """``search`` in a fresh process, set up as the bench's own: one torch thread, the shared cache, and
    ``warm`` run again (from the cache, outside the clock) so that the imports and file reads it paid for
    in the bench's process are not paid inside this arm's time."""
    torch.set_num_threads(1)
    os.environ[CACHE_ENV] = job.cache
    if not job.tracking:
        without_tracking()
    warm(job.workdir, DATASETS[job.dataset], job.space, tracking=False, name=f"warm-{job.dataset}-{job.arm}-{job.seed}")
    return search(job)


def searches(jobs: list[Job], *, processes: int) -> Iterator[Finished]:
    """The searches in the order they finish: here, one after another, with one process; else ``processes``
    at a time, each in a fresh spawned process, so that no search inherits what a previous one left behind."""
    if processes == 1:
        yield from map(search, jobs)
        return
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=spawn, max_tasks_per_child=1) as pool:
        yield from (future.result() for future in as_completed([pool.submit(search_in_child, job) for job in jobs]))


def warm(workdir: Path, spec: TaskSpec, space: Path, *, tracking: bool, name: str | None = None) -> None:
    """Train the base model and measure its sensitivity table once, outside every arm's time (study ``name``,
    by default one per dataset)."""
    from autoprune.search.priors import sensitivity_policies
    from autoprune.search.progress import open_tracker
    from autoprune.search.study import prepare

    name = name or f"warm-{spec.dataset}"
    config = search_config(
        task=spec, space_path=space, objectives_path=OBJECTIVES, study=name, storage=f"sqlite:///{workdir / f'{name}.db'}", tracking_uri=tracking_uri(workdir), progress=False
    )
    ctx = prepare(config)
    sensitivity_policies(ctx, ctx.ensure_evaluator(progress=False))
    if tracking:
        # creating the MLflow store (its schema migrations) takes many seconds: not in the first arm's time
        open_tracker(ctx, tracking_uri(workdir)).close(status="FINISHED")


def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def best_reduction_on_test(spec: TaskSpec, runs: list[Run]) -> tuple[float, float] | None:
    """(BOPs reduction, test drop) of the most reduced front point within TEST_DROP points on test."""
    from autoprune.compress import compress
    from autoprune.search.evaluate import Evaluator

    evaluator = Evaluator.for_task(Task(spec), progress=False)
    name = evaluator.task.metric_name
    points = [read_trial(t) for run in runs for t in front_trials(run.study)]  # type: ignore[arg-type]
    near = sorted((r for r in points if r.metrics and r.metrics[f"{name}_drop"] <= TEST_DROP), key=lambda r: -r.metrics["bops_reduction"])  # type: ignore[index]
    for record in near[:TESTED_PER_ARM]:
        result = compress(evaluator.base.model, Policy.from_dict(record.policy), task=evaluator.task)
        drop = evaluator.base.test_accuracy - evaluator.score(result, test=True)[f"test_{name}"]
        if drop <= TEST_DROP:
            return record.metrics["bops_reduction"], drop  # type: ignore[index]
    return None


def finalized(spec: TaskSpec, runs: list[Run], *, steps: int, workdir: Path) -> tuple[dict[str, list[float]], list[tuple[float, float, float]]]:
    """Finalize every run's study (the candidates that could be on the final front, ``steps`` more steps);
    per arm the final fronts' hypervolumes, and over every finalized candidate (rung-2 accuracy, predicted loss
    increase, final accuracy)."""
    from autoprune.search import pareto
    from autoprune.search.finalize import finalize_study
    from autoprune.search.study import context_from_study
    from autoprune.search.report import final_rows
    from autoprune.sensitivity import load_or_measure

    task = Task(spec)
    hvs: dict[str, list[float]] = {}
    pairs: list[tuple[float, float, float]] = []
    for run in runs:
        ctx = context_from_study(run.study, task=task)  # type: ignore[arg-type]
        finals = finalize_study(ctx, steps=steps, folder=workdir / "final" / run.study.study_name)  # type: ignore[attr-defined]
        front = pareto.final_front(ctx.study, ctx.objectives, finals)
        meta = ctx.meta
        spec_ = pareto.ObjectiveSpec.from_dict(meta.objectives)
        points = [pareto.normalised_losses(row.metrics, spec_, meta.base.reference()) for row in final_rows(ctx.study, front)]  # type: ignore[union-attr]
        hvs.setdefault(run.arm, []).append(pareto.hypervolume_of(points))
        table = load_or_measure(ctx.ensure_evaluator(progress=False).base.model, ctx.task)
        trials = {t.number: read_trial(t) for t in ctx.study.get_trials(deepcopy=False)}
        for number, final in finals.items():
            record = trials[number]
            pairs.append(((record.metrics or {})["accuracy"], predicted_loss(table, ctx, Policy.from_dict(record.policy or {})), final.mean["accuracy"]))
    return hvs, pairs


def predicted_loss(table: Any, ctx: Any, policy: Policy) -> float:
    """The integer program's additive loss increase of a policy (rung 0's prediction of any candidate)."""
    from autoprune.search.budget_ip import Assignment, assignment_loss

    layers = policy.resolve(ctx.space.layer_names)
    keep = {group.name: layers[group.name].keep_ratio for group in ctx.space.groups if layers[group.name].keep_ratio < 1.0}
    return assignment_loss(table, Assignment(bits={n: (lp.w_bits, lp.a_bits) for n, lp in layers.items()}, keep=keep))


def report(dataset: str, runs: list[Run], seconds: float, *, jobs: int, final: tuple[dict[str, list[float]], list[tuple[float, float, float]]] | None = None) -> None:
    spec = DATASETS[dataset]
    random_final = {r.seed: hypervolume(r.study) for r in runs if r.arm == "random"}  # type: ignore[arg-type]
    print(f"\n{dataset} ({spec.model}), {seconds:.0f} s per arm, seeds {sorted(random_final)}, {jobs} search(es) at a time")
    header = f"{'arm':<12} {'HV mean':>8} {'xrandom':>8} {'t95% s':>8} {'t100% s':>8} {'reach':>6} {'trials/min':>10} {'cand/min':>9} {'BOPs red. @<=1.5 test':>22} {'final HV':>9}"
    print(header)
    print("-" * len(header))
    for arm in ARMS:
        mine = [r for r in runs if r.arm == arm]
        if not mine:
            continue
        hv = statistics.mean(hypervolume(r.study) for r in mine)  # type: ignore[arg-type]
        reference = statistics.mean(random_final.values()) if random_final else 0.0
        ratio = hv / reference if reference > 0 else None
        t95 = [r.seconds_to(0.95 * random_final[r.seed]) for r in mine if r.seed in random_final]
        t100 = [r.seconds_to(random_final[r.seed]) for r in mine if r.seed in random_final]
        reached = [t for t in t100 if t is not None]
        minutes = sum(r.wall for r in mine) / 60
        trials = sum(len(r.completed()) for r in mine) / minutes
        candidates = sum(r.candidates() for r in mine) / minutes
        best = best_reduction_on_test(spec, mine)
        best_text = f"{best[0]:.1f}x ({best[1]:+.2f} pts)" if best else "none"
        final_hv = statistics.mean(final[0][arm]) if final and final[0].get(arm) else None
        print(
            f"{arm:<12} {hv:>8.4f} {fmt(ratio, '.3f'):>8} {fmt(statistics.mean([t for t in t95 if t is not None]) if any(t is not None for t in t95) else None):>8}"
            f" {fmt(statistics.mean(reached) if reached else None):>8} {f'{len(reached)}/{len(t100)}':>6} {trials:>10.1f} {candidates:>9.1f} {best_text:>22} {fmt(final_hv, '.4f'):>9}",
            flush=True,
        )
    print("t95%/t100%: mean wall seconds (over the seeds that got there) to 95% / 100% of random's final hypervolume of the same seed;")
    print("reach: seeds that reached 100%. Random reaches its own final value at its last front change, not at the budget's end.")
    print("cand/min: candidates judged (fine-tuned, or stopped at a lower rung) per minute; final HV: the hypervolume of the front after final training.")
    if final and final[1]:
        from autoprune.search.finalize import spearman

        short, predicted, last = zip(*final[1])
        print(
            f"over {len(last)} finalized candidates: Spearman(fine-tuned accuracy, final accuracy) {spearman(list(short), list(last)):+.3f}; "
            f"Spearman(-predicted loss increase, final accuracy) {spearman([-p for p in predicted], list(last)):+.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", choices=list(DATASETS), default=["mnist1d", "digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-seconds", type=float, default=40.0, help="wall time of every arm and seed")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--finetune-steps", type=int, default=None, help="fine-tune steps of the default space (150 unless given)")
    parser.add_argument("--jobs", type=int, default=1, help="searches at a time, each in its own process on one core (default 1: one after another here)")
    parser.add_argument("--no-tracking", action="store_true", help="no MLflow: every search's tracker does nothing")
    parser.add_argument("--final-steps", type=int, default=None, help="finalize every arm's search with this many steps of final training (default: none)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    if not 1 <= args.jobs <= cores:
        parser.error(f"--jobs {args.jobs}: must be between 1 and the {cores} cores of this machine (more would share cores and skew the equal wall time)")
    torch.set_num_threads(1)

    workdir = Path(tempfile.mkdtemp(prefix="autoprune-bench-"))
    os.environ.setdefault(CACHE_ENV, str(workdir / "cache"))
    if args.no_tracking:
        without_tracking()
    space = space_with_steps(workdir, args.finetune_steps)
    for dataset in args.dataset:
        clock = time.perf_counter()
        warm(workdir, DATASETS[dataset], space, tracking=not args.no_tracking)
        print(f"{dataset}: base model, S/N record and sensitivity table ready in {time.perf_counter() - clock:.0f} s", flush=True)
        jobs = [
            Job(dataset, arm, seed, args.budget_seconds, space, workdir, os.environ[CACHE_ENV], tracking=not args.no_tracking)
            for seed in args.seeds for arm in args.arms
        ]
        runs = []
        for finished in searches(jobs, processes=args.jobs):
            run = finished.run()
            runs.append(run)
            print(f"  {run.arm:>12} seed {run.seed}: hypervolume {hypervolume(run.study):.4f}, {len(run.completed())} trials, {run.candidates()} candidates, {run.wall:.0f} s", flush=True)  # type: ignore[arg-type]
            if finished.mlflow_imported and args.no_tracking:
                print(f"  warning: {run.arm} seed {run.seed} imported mlflow despite --no-tracking", flush=True)
        if args.no_tracking and "mlflow" in sys.modules:
            print("warning: this process imported mlflow despite --no-tracking", flush=True)
        final = finalized(DATASETS[dataset], runs, steps=args.final_steps, workdir=workdir) if args.final_steps else None
        report(dataset, runs, args.budget_seconds, jobs=args.jobs, final=final)


if __name__ == "__main__":
    main()
