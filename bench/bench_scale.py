"""Does the framework's cost per trial stay flat as a study grows, and how much of a real search is framework?

A study of ``--trials`` trials (default 2,000) whose evaluation is instant: a stub evaluator, defined
here and nowhere else, scores a policy from its bits and keep ratios in microseconds, so every second
measured is the framework's (ask, policy, record, tell, front, progress, MLflow). MLflow tracking is on,
on a SQLite store, as in a default search. Prints the median framework seconds per trial over the first
100 and the last 100 trials, and their ratio (target <= 1.5).

The sampler defaults to ``random``: TPE's own cost grows with the trials it models (that is Optuna's
algorithm, not this framework's bookkeeping); ``--sampler tpe`` measures it anyway.

Then (``--overhead-trials``, default 60) the default search of real trials on digits (the shipped space and
objectives), its base model trained before the clock starts: the share of its wall time spent outside compressing
and scoring trials (target <= 5%), with MLflow tracking and again without, each in a fresh process, interleaved
``--overhead-repeats`` times (default 3), medians and where the framework's time goes.

    python bench/bench_scale.py --trials 2000 --overhead-trials 60
    python bench/bench_scale.py --trials 0 --overhead-trials 60      # the overhead part alone
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parent.parent
WINDOW = 100


class _StubBase:
    val_accuracy = 90.0
    test_accuracy = 90.0
    train_seconds = 0.0
    extras: dict[str, Any] = {}


class StubEvaluator:
    """Metrics from the policy alone: accuracy rises with bits and width, BOPs with their product."""

    base = _StubBase()

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def base_summary(self) -> dict[str, Any]:
        cost = {"macs": 1e6, "bops": 1.024e9, "esn_a": 1e6, "esn_d": 1e6, "esn_d_prime": 1e6, "memory_mb": 1.0, "params": 1e4}
        return {"val_accuracy": 90.0, "test_accuracy": 90.0, "train_seconds": 0.0, "cost": cost, "performance_density": 90.0}

    def evaluate(self, policy: Any) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
        self.calls.append((time.perf_counter(), time.process_time()))
        layers = {name: lp.model_dump() for name, lp in policy.layers.items()}
        bits = [(lp.w_bits, lp.a_bits, lp.keep_ratio) for lp in policy.layers.values()] or [(8, 8, 1.0)]
        bops = sum(w * a * k * k for w, a, k in bits) / len(bits) * 1e6
        accuracy = 90.0 - sum(8.0 / w + 4.0 / a + (1.0 - k) * 5 for w, a, k in bits) / len(bits)
        metrics = {
            "accuracy": accuracy, "accuracy_drop": 90.0 - accuracy, "macs": 1e6, "bops": bops, "esn_a": 1e6, "esn_d": 1e6,
            "esn_d_prime": 1e6, "memory_mb": 1.0, "params": 1e4, "performance_density": accuracy, "bops_reduction": 1.024e9 / bops,
            "compress_seconds": 0.0, "trial_seconds": 0.0,
        }
        return metrics, layers

    def run(self, job: Any) -> tuple[dict[str, float], dict[str, dict[str, Any]], dict[str, Any]]:
        from autoprune.policy import Policy

        return (*self.evaluate(Policy.from_dict(job.policy or {})), {})


def search_overhead(trials: int, *, repeats: int) -> None:
    """The default search (the shipped space and objectives, as ``make run`` runs it) timed with MLflow tracking,
    as users run it, and with a tracker that does nothing; each run in a fresh process with the base model, its
    sensitivity table and the dataset already cached, the two interleaved ``repeats`` times, since neighbours on a
    shared machine move one run's trial time by several percent. Prints each run, then the medians.

    Framework overhead is 1 - (seconds compressing and scoring trials) / wall. Where it goes: before the first
    trial (storage, priors), inside a trial but outside its evaluation (ask, sampling, records, tell), between
    trials (front, progress, tracker calls) and after the last (MLflow's final plots). Tracking's cost is also
    measured against the untracked runs' trial time, because its thread's work inside the trials (it holds the
    interpreter the training loop needs) counts as trial time in the first figure."""
    import json
    import subprocess
    import sys

    from autoprune.task import Task, TaskSpec

    Task(TaskSpec()).base(progress=False)
    _warm_mlflow_schema()
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for repeat in range(repeats):
        for tracking in (True, False):
            command = [sys.executable, __file__, "--overhead-run", str(trials)] + ([] if tracking else ["--no-tracking"])
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            runs[tracking].append(run)
            print(f"run {repeat + 1}, tracking {'on ' if tracking else 'off'}: {_phases(run)}")
    medians = {tracking: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for tracking, rs in runs.items()}
    for tracking, run in medians.items():
        print(f"default {trials}-trial search on digits, tracking {'on ' if tracking else 'off'}, median of {repeats}: {_phases(run)}; "
              f"framework overhead {100 * (1 - run['trials'] / run['wall']):.1f}% (target <= 5%)")
    on, off = medians[True], medians[False]
    print(f"tracking's cost: {on['wall'] - off['wall']:+.1f} s of wall time ({on['wall'] / off['wall']:.3f}x), "
          f"{on['trials'] - off['trials']:+.1f} s of it inside the trials; "
          f"overhead of the tracked search against the untracked trials' time: {100 * (1 - off['trials'] / on['wall']):.1f}%")


def _warm_mlflow_schema() -> None:
    """A throwaway store, so that every tracked run starts its store from the empty schema kept in the cache, as
    every search after a user's first does (the first builds it, about 1.5 s more), like the base model above."""
    from autoprune.tracking.store import create_whole

    with tempfile.TemporaryDirectory(prefix="autoprune-schema-") as scratch:
        create_whole(f"sqlite:///{Path(scratch) / 'mlflow.db'}")


def _phases(run: dict[str, float]) -> str:
    return (f"{run['wall']:.1f} s wall, {run['trials']:.1f} s compressing and scoring; framework {run['before']:.2f} s before the first trial, "
            f"{run['inside']:.2f} s inside trials, {run['between']:.2f} s between, {run['after']:.2f} s after the last")


def overhead_run(trials: int, *, tracking: bool) -> None:
    """One timed default search (a child of ``search_overhead``); prints its times as one JSON line."""
    import datetime as dt
    import json

    from autoprune.api import search_config
    from autoprune.search import runner
    from autoprune.search.record import read_trial

    if not tracking:
        from bench_search import without_tracking  # this folder is the script's, so on sys.path

        without_tracking()
    workdir = Path(tempfile.mkdtemp(prefix="autoprune-overhead-"))
    # the shipped space and objectives, as ``autoprune search`` and ``make run`` use them (a SearchConfig
    # without them searches an empty space: every trial the float model, which once stood in for this bench)
    config = search_config(
        space_path=_shipped("search_spaces", "default.yaml"), objectives_path=_shipped("objectives", "accuracy_bops.yaml"),
        study="overhead", storage=f"sqlite:///{workdir / 'study.db'}", trials=trials,
        tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}", progress=False,
    )
    started = dt.datetime.now()
    start = time.perf_counter()
    outcome = runner.run_search(config)
    wall = time.perf_counter() - start
    ended = dt.datetime.now()
    told = sorted((t for t in outcome.study.trials if t.datetime_start and t.datetime_complete), key=lambda t: t.datetime_start)
    trial_seconds = sum((read_trial(t).metrics or {}).get("trial_seconds", 0.0) for t in told)
    held = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in told)
    print(json.dumps({
        "wall": wall, "trials": trial_seconds, "inside": held - trial_seconds,
        "before": (told[0].datetime_start - started).total_seconds(), "after": (ended - told[-1].datetime_complete).total_seconds(),
        "between": sum((b.datetime_start - a.datetime_complete).total_seconds() for a, b in zip(told, told[1:])),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--sampler", default="random")
    parser.add_argument("--overhead-trials", type=int, default=60, help="trials of the real default search timed after (0: skip)")
    parser.add_argument("--overhead-repeats", type=int, default=3, help="tracked and untracked runs, interleaved, medians reported")
    parser.add_argument("--overhead-run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-tracking", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.overhead_run:
        overhead_run(args.overhead_run, tracking=not args.no_tracking)
        return
    if args.trials == 0:
        search_overhead(args.overhead_trials, repeats=args.overhead_repeats)
        return
    if args.trials < 2 * WINDOW:
        parser.error(f"--trials must be 0 (the overhead part alone) or at least {2 * WINDOW}")

    from autoprune.api import search_config
    from autoprune.search import loop, progress, study

    workdir = Path(tempfile.mkdtemp(prefix="autoprune-scale-"))
    config = search_config(
        space_path=_shipped("search_spaces", "default.yaml"),
        objectives_path=_shipped("objectives", "accuracy_bops.yaml"),
        study="scale",
        storage=f"sqlite:///{workdir / 'scale.db'}",
        trials=args.trials,
        sampler=args.sampler,
        tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}",
        priors=False,
        progress=False,
    )
    ctx = study.prepare(config)
    stub = StubEvaluator()
    ctx.evaluator = stub
    study.record_base(ctx, stub)
    reporter = progress.Reporter(ctx, tracker=progress.open_tracker(ctx, config.tracking_uri), progress=False)
    ctx.notify = reporter.told
    start = time.perf_counter()
    loop.run_trials(ctx, deadline=None)
    wall = time.perf_counter() - start
    reporter.close(status="FINISHED")

    # The gap between two evaluations is one whole trial cycle of the framework; the stub's own time is ~0.
    # CPU seconds of this process are printed too: on a shared machine, wall time also measures the neighbours.
    n = len(stub.calls)
    print(f"{n} trials, sampler {args.sampler}, MLflow on (SQLite), {wall:.0f} s in all")
    for clock, name in ((0, "wall"), (1, "CPU")):
        gaps = [b[clock] - a[clock] for a, b in zip(stub.calls, stub.calls[1:])]
        first, last = statistics.median(gaps[:WINDOW]), statistics.median(gaps[-WINDOW:])
        print(f"median framework {name} seconds per trial, trials 1-{WINDOW}: {first:.4f}; trials {n - WINDOW + 1}-{n}: {last:.4f}; "
              f"ratio {last / first:.2f} (target <= 1.5)")
    if args.overhead_trials:
        search_overhead(args.overhead_trials, repeats=args.overhead_repeats)


def _shipped(kind: str, name: str) -> Path:
    from autoprune.specs import shipped

    return shipped(kind, name)


if __name__ == "__main__":
    main()
