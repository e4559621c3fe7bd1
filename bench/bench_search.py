"""Search-quality benchmark (issue 16): five search arms at equal wall time per arm, side by side.

Arms: random search; TPE; TPE + the S/N bit prior (``--priors snr``); TPE + the sensitivity priors (the
integer program's policies over K cost budgets); TPE + sensitivity priors + multi-fidelity trials (a quarter
of the fine-tune first, the full one only for a candidate that could still reach the front).

Per dataset and arm, over the seeds, it prints:
- the final hypervolume (log-scale BOPs, the float base model as the reference point, autoprune.search.pareto);
- the wall time to reach 95% of random search's final hypervolume (same seed), and to reach all of it;
- full trials and candidates (full + low-fidelity-only) per minute;
- the largest BOPs reduction at <= 1.5 points *test* accuracy drop (front points within 1.5 points on
  validation, re-compressed and checked on the test split, best first).

Every process runs torch on one thread (tiny convs on a shared machine run many times slower with more).
The base model, its S/N record and its sensitivity table are trained/measured once per dataset before the
arms, so that no arm pays for a cache the others read.

    python bench/bench_search.py --dataset digits mnist1d --seeds 0 1 2 --budget-seconds 40 --finetune-steps 50
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from autoprune.policy import Policy  # noqa: E402
from autoprune.search.pareto import front_trials, hypervolume  # noqa: E402
from autoprune.search.record import read_trial  # noqa: E402
from autoprune.search.runner import SearchConfig, run_search  # noqa: E402
from autoprune.task import Task, TaskSpec  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPACE = REPO / "autoprune/specs/search_spaces/default.yaml"
OBJECTIVES = REPO / "autoprune/specs/objectives/accuracy_bops.yaml"
DATASETS = {"digits": TaskSpec(), "mnist1d": TaskSpec(dataset="mnist1d", model="mnist1d_cnn")}
# name -> (sampler, priors, fidelity)
ARMS: dict[str, tuple[str, tuple[str, ...], float | None]] = {
    "random": ("random", (), None),
    "tpe": ("tpe", (), None),
    "tpe+snr": ("tpe", ("snr",), None),
    "tpe+sens": ("tpe", ("sensitivity",), None),
    "tpe+sens+mf": ("tpe", ("sensitivity",), 0.25),
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


def search(workdir: Path, spec: TaskSpec, *, arm: str, seed: int, seconds: float, space: Path) -> Run:
    sampler, priors, fidelity = ARMS[arm]
    config = SearchConfig(
        task=spec, space_path=space, objectives_path=OBJECTIVES, study_name=f"{spec.dataset}-{arm}-{seed}",
        storage=f"sqlite:///{workdir / f'{spec.dataset}-{arm}-{seed}.db'}", trials=UNBOUNDED_TRIALS, timeout=seconds,
        sampler=sampler, seed=seed, tracking_uri=tracking_uri(workdir), priors=priors,
        fidelity=fidelity, progress=False,
    )
    start = dt.datetime.now()
    clock = time.perf_counter()
    outcome = run_search(config)
    return Run(arm, seed, outcome.study, start, time.perf_counter() - clock)


def warm(workdir: Path, spec: TaskSpec, space: Path) -> None:
    """Train the base model and measure its sensitivity table once, outside every arm's time."""
    from autoprune.search.priors import sensitivity_policies
    from autoprune.search.runner import open_tracker, prepare

    config = SearchConfig(
        task=spec, space_path=space, objectives_path=OBJECTIVES, study_name="warm", storage=f"sqlite:///{workdir / 'warm.db'}", tracking_uri=tracking_uri(workdir), progress=False
    )
    ctx = prepare(config)
    sensitivity_policies(ctx, ctx.ensure_evaluator(progress=False))
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


def report(dataset: str, runs: list[Run], seconds: float) -> None:
    spec = DATASETS[dataset]
    random_final = {r.seed: hypervolume(r.study) for r in runs if r.arm == "random"}  # type: ignore[arg-type]
    print(f"\n{dataset} ({spec.model}), {seconds:.0f} s per arm, seeds {sorted(random_final)}")
    header = f"{'arm':<12} {'HV mean':>8} {'xrandom':>8} {'t95% s':>8} {'t100% s':>8} {'reach':>6} {'trials/min':>10} {'cand/min':>9} {'BOPs red. @<=1.5 test':>22}"
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
        print(
            f"{arm:<12} {hv:>8.4f} {fmt(ratio, '.3f'):>8} {fmt(statistics.mean([t for t in t95 if t is not None]) if any(t is not None for t in t95) else None):>8}"
            f" {fmt(statistics.mean(reached) if reached else None):>8} {f'{len(reached)}/{len(t100)}':>6} {trials:>10.1f} {candidates:>9.1f} {best_text:>22}",
            flush=True,
        )
    print("t95%/t100%: mean wall seconds (over the seeds that got there) to 95% / 100% of random's final hypervolume of the same seed;")
    print("reach: seeds that reached 100%. Random reaches its own final value at its last front change, not at the budget's end.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", choices=list(DATASETS), default=["mnist1d", "digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-seconds", type=float, default=40.0, help="wall time of every arm and seed")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--finetune-steps", type=int, default=None, help="fine-tune steps of the default space (150 unless given)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    workdir = Path(tempfile.mkdtemp(prefix="autoprune-bench-"))
    os.environ.setdefault("AUTOPRUNE_CACHE", str(workdir / "cache"))
    space = space_with_steps(workdir, args.finetune_steps)
    for dataset in args.dataset:
        spec = DATASETS[dataset]
        clock = time.perf_counter()
        warm(workdir, spec, space)
        print(f"{dataset}: base model, S/N record and sensitivity table ready in {time.perf_counter() - clock:.0f} s", flush=True)
        runs = []
        for seed in args.seeds:
            for arm in args.arms:
                run = search(workdir, spec, arm=arm, seed=seed, seconds=args.budget_seconds, space=space)
                runs.append(run)
                print(f"  {arm:>12} seed {seed}: hypervolume {hypervolume(run.study):.4f}, {len(run.completed())} trials, {run.candidates()} candidates, {run.wall:.0f} s", flush=True)  # type: ignore[arg-type]
        report(dataset, runs, args.budget_seconds)


if __name__ == "__main__":
    main()
