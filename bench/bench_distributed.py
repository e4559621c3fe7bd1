"""Throughput of the executors, side by side: trials per minute with 1 and 2 workers, local and Ray,
and what starting a local Ray instance costs.

Each configuration runs the same `autoprune search` command line (a fresh study, no priors, the same
sampler seed) as its own process, the way a user runs it. Two rates per run:

- steady: finished trials per minute between the first trial's start and the last trial's end, read
  from the study's timestamps (what more workers buy once everything runs);
- overall: finished trials per minute of the command's whole wall time, start-up included (Ray's
  instance and worker processes, the MLflow store, the cached base model loading).

"local, 2 workers" is `--jobs 2` (the driver plus one `autoprune worker` process); "ray, 2 workers" is
`--executor ray --workers 2`. Torch threads per trial are what each executor picks on this machine.

    python bench/bench_distributed.py --trials 16 --finetune-steps 150
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

# Per-layer bits and widths; --finetune-steps sets the work per trial (150 is the shipped spaces' value).
SPACE = """
layers:
  _default:
    keep_ratio: {{choices: [0.5, 0.75, 1.0]}}
    w_bits: {{choices: [2, 4, 8]}}
    a_bits: {{choices: [4, 8]}}
policy:
  finetune_steps: {steps}
"""
RAY_START = """
import time
t0 = time.perf_counter()
from autoprune.search.ray_executor import ray_session
import ray
t1 = time.perf_counter()
with ray_session(None):
    t2 = time.perf_counter()
    ray.get(ray.remote(lambda: 1).remote())  # the first task also starts a worker process
    t3 = time.perf_counter()
t4 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f} {t3 - t2:.2f} {t4 - t3:.2f}")
"""


def run(workdir: Path, *, executor: str, workers: int, trials: int) -> dict[str, float]:
    name = f"{executor}-{workers}"
    storage = f"sqlite:///{workdir / (name + '.db')}"
    command = [
        sys.executable, "-m", "autoprune.cli", "search", "--space", str(workdir / "space.yaml"), "--trials", str(trials),
        "--study", name, "--storage", storage, "--tracking-uri", f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}",
        "--no-priors", "--quiet", "--executor", executor,
    ]
    command += ["--workers", str(workers)] if executor == "ray" else ["--jobs", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name=name, storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    evaluate = sum(t.user_attrs.get("metrics", {}).get("trial_seconds", 0.0) for t in finished)
    return {
        "trials": len(finished),
        "failed": sum(t.state == TrialState.FAIL for t in finished),
        "wall": wall,
        "steady": 60 * len(finished) / span,
        "overall": 60 * len(finished) / wall,
        "evaluate": evaluate / len(finished),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16, help="trials per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--finetune-steps", type=int, default=150, help="fine-tuning steps per trial: the work each trial does")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="autoprune-bench-distributed-"))
    os.environ.setdefault("AUTOPRUNE_CACHE", str(workdir / "cache"))
    (workdir / "space.yaml").write_text(SPACE.format(steps=args.finetune_steps))
    print(f"machine: {os.cpu_count()} CPUs; {args.trials} trials per run, {args.finetune_steps} fine-tuning steps per trial; work folder {workdir}")

    # Train the base model once, outside every measurement.
    from autoprune.search.evaluate import Evaluator
    from autoprune.task import Task

    Evaluator.for_task(Task(), progress=False)

    timings = subprocess.run([sys.executable, "-c", RAY_START], capture_output=True, text=True, check=True).stdout.split()
    imported, init, first_task, shutdown = (float(x) for x in timings)
    print(
        f"Ray start-up: import {imported:.2f} s, ray.init (local, {os.cpu_count()} CPUs) {init:.2f} s, "
        f"first task (starts a worker) {first_task:.2f} s, shutdown {shutdown:.2f} s"
    )

    rows = []
    for executor in ("local", "ray"):
        for workers in args.workers:
            result = run(workdir, executor=executor, workers=workers, trials=args.trials)
            rows.append((executor, workers, result))
            print(f"  ran {executor} with {workers} worker(s): {result['wall']:.1f} s", flush=True)

    print()
    print(f"{'executor':<9}{'workers':>8}{'trials':>8}{'failed':>8}{'wall s':>9}{'eval s/trial':>14}{'steady /min':>13}{'overall /min':>14}")
    for executor, workers, r in rows:
        print(
            f"{executor:<9}{workers:>8}{r['trials']:>8.0f}{r['failed']:>8.0f}{r['wall']:>9.1f}{r['evaluate']:>14.2f}"
            f"{r['steady']:>13.1f}{r['overall']:>14.1f}"
        )
    base = {executor: r["steady"] for executor, workers, r in rows if workers == min(args.workers)}
    for executor, workers, r in rows:
        if workers != min(args.workers):
            print(f"{executor}: {workers} workers run {r['steady'] / base[executor]:.2f}x the steady rate of {min(args.workers)}")


if __name__ == "__main__":
    main()
