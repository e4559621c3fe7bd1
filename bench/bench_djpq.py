"""DJPQ (seed 002) against its two-stage baseline and the default TPE policy search, at equal wall time.

For every seed, three studies of the same task run for ``--budget-seconds`` each (the base model is trained
once before, outside the budget): ``djpq`` (each trial one DJPQ run, beta and gamma sampled log-uniformly),
``two_stage`` (VIBNet pruning, then the quantizers learned on the pruned model; sec. 4.2) and ``tpe`` (the
shipped default space). A study starts no trial after its budget but finishes the one it runs, so each may
overrun by one trial. Printed per strategy:

1. hypervolume of each seed's front (``autoprune.search.pareto``: accuracy and log BOPs normalised against
   the float base model, so every study has the same reference point);
2. the largest BOPs reduction against the float model among front points within 1.5 points of the base
   model's TEST accuracy (a learned point is its DJPQ model as learned; a sampled one its policy compressed
   again, which replays it exactly);
3. whether the paper's claim "joint beats two-stage" holds here (higher mean hypervolume and a BOPs reduction
   at least as large).

beta is given relative to the model: the spec samples beta x (MACs x init bits^2), the BOPs term's weight
at the start of training, so one range fits digits and MNIST-1D alike.

    python bench/bench_djpq.py --dataset mnist1d --model mnist1d_cnn --budget-seconds 60 --seeds 0 1 2
    python bench/bench_djpq.py --dataset digits --model digits_cnn --budget-seconds 60 --seeds 0 1 2
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

import torch  # noqa: E402

from autoprune.policy import load_mapping  # noqa: E402
from autoprune.search.pareto import front_trials, hypervolume  # noqa: E402
from autoprune.search.record import read_trial  # noqa: E402
from autoprune.api import search_config  # noqa: E402
from autoprune.search.runner import run_search  # noqa: E402
from autoprune.search.space import SpaceSpec  # noqa: E402
from autoprune.specs import shipped  # noqa: E402
from autoprune.task import Task, TaskSpec  # noqa: E402

STRATEGIES = ("djpq", "two_stage", "tpe")
MAX_DROP = 1.5


def learned_space(strategy: str, *, steps: int, bops_at_init: float, finetune_steps: int) -> SpaceSpec:
    return SpaceSpec.from_dict({
        "strategy": strategy,
        "djpq": {
            # relative strengths 0.03..30 of the BOPs term at the initial bits
            "beta": {"low": 0.03 / bops_at_init, "high": 30.0 / bops_at_init, "log": True},
            "gamma": {"low": 1e-6, "high": 1e-2, "log": True},
            "steps": steps,
            "quant_lr_scale": 1.0,
        },
        "policy": {"finetune_steps": finetune_steps},
    })


def sampled_space(*, finetune_steps: int) -> SpaceSpec:
    raw = load_mapping(shipped("search_spaces", "default"))
    return SpaceSpec.from_dict({**raw, "policy": {**raw["policy"], "finetune_steps": finetune_steps}})


def test_accuracy(record: Any, evaluator: Any) -> float:
    """The front point's test accuracy: the learned DJPQ model as kept, or the policy compressed again."""
    if record.artifact:
        from autoprune.djpq import DJPQModel

        model = DJPQModel.load(record.artifact, evaluator.base.model)
    else:
        from autoprune.compress import compress
        from autoprune.policy import Policy

        model = compress(evaluator.base.model, Policy.from_dict(record.policy), task=evaluator.task).model
    return evaluator.task.evaluate(model, "test", full=True)


def best_reduction(study: Any, evaluator: Any) -> tuple[float, float | None]:
    """(largest BOPs reduction within MAX_DROP test points of the base, its test accuracy) over the front."""
    base = evaluator.base.test_accuracy
    best: tuple[float, float | None] = (1.0, None)
    for trial in front_trials(study):
        record = read_trial(trial)
        reduction = record.metrics["bops_reduction"]
        if reduction <= best[0]:
            continue
        acc = test_accuracy(record, evaluator)
        if base - acc <= MAX_DROP:
            best = (reduction, acc)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--model", default="mnist1d_cnn")
    parser.add_argument("--budget-seconds", type=float, default=60.0, help="wall time of each study (one strategy, one seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--djpq-steps", type=int, default=150, help="training steps of a DJPQ run (each stage of two-stage)")
    parser.add_argument("--finetune-steps", type=int, default=150, help="fine-tuning steps of a sampled policy (and of a learned policy's replay)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny convs on a shared machine: one thread is many times faster than a contended pool

    workdir = Path(tempfile.mkdtemp(prefix="autoprune-bench-djpq-"))
    os.environ.setdefault("AUTOPRUNE_CACHE", str(workdir / "cache"))
    spec = TaskSpec(dataset=args.dataset, model=args.model)
    task = Task(spec)
    from autoprune.search.evaluate import Evaluator

    evaluator = Evaluator.for_task(task, progress=False)  # trains the base model once, outside every budget
    base_total = evaluator.base_cost.total
    bops_at_init = base_total.macs * 6 * 6
    print(f"{args.dataset}/{args.model}: base val {evaluator.base.val_accuracy:.2f}%, test {evaluator.base.test_accuracy:.2f}%, "
          f"BOPs {base_total.bops:.3g}; {args.budget_seconds:.0f} s per study, seeds {args.seeds}", flush=True)
    spaces = {
        "djpq": learned_space("djpq", steps=args.djpq_steps, bops_at_init=bops_at_init, finetune_steps=args.finetune_steps),
        "two_stage": learned_space("two_stage", steps=args.djpq_steps, bops_at_init=bops_at_init, finetune_steps=args.finetune_steps),
        "tpe": sampled_space(finetune_steps=args.finetune_steps),
    }
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    # The MLflow store is created here, not inside the first study's budget.
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking).search_experiments()
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in STRATEGIES}
    for seed in args.seeds:
        for name in STRATEGIES:
            config = search_config(
                task=spec, study=f"{name}-{seed}", storage=f"sqlite:///{workdir / 'bench.db'}", trials=10_000,
                timeout=args.budget_seconds, sampler="tpe", seed=seed, priors=False, progress=False,
                tracking_uri=tracking,
            )
            start = time.perf_counter()
            study = run_search(config, task=task, space=spaces[name]).study
            wall = time.perf_counter() - start
            reduction, acc = best_reduction(study, evaluator)
            row = {"hv": hypervolume(study), "trials": len(study.trials), "front": len(front_trials(study)), "reduction": reduction, "test": acc, "wall": wall}
            results[name].append(row)
            print(f"  {name:>9} seed {seed}: {row['trials']} trials in {wall:.0f} s, hypervolume {row['hv']:.4f}, "
                  f"front {row['front']}, best BOPs x at <= {MAX_DROP} test points: {reduction:.1f}x" + (f" ({acc:.2f}%)" if acc is not None else ""), flush=True)

    print(f"\n{args.dataset}/{args.model}, {args.budget_seconds:.0f} s per study, seeds {args.seeds} "
          f"(base test {evaluator.base.test_accuracy:.2f}%)")
    print(f"{'strategy':>10} | {'trials':>6} | {'hypervolume mean (per seed)':<34} | BOPs reduction at <= {MAX_DROP} test points: mean (per seed)")
    means: dict[str, tuple[float, float]] = {}
    for name, rows in results.items():
        hv = statistics.mean(r["hv"] for r in rows)
        red = statistics.mean(r["reduction"] for r in rows)
        means[name] = (hv, red)
        per_hv = ", ".join(f"{r['hv']:.4f}" for r in rows)
        per_red = ", ".join(f"{r['reduction']:.1f}x" for r in rows)
        trials = statistics.mean(r["trials"] for r in rows)
        print(f"{name:>10} | {trials:6.1f} | {hv:.4f} ({per_hv}){'':<4} | {red:.1f}x ({per_red})")
    (hv_j, red_j), (hv_t, red_t) = means["djpq"], means["two_stage"]
    holds = hv_j > hv_t and red_j >= red_t
    print(f"\njoint beats two-stage here: {'yes' if holds else 'no'} (hypervolume {hv_j:.4f} vs {hv_t:.4f}, BOPs reduction {red_j:.1f}x vs {red_t:.1f}x)")


if __name__ == "__main__":
    main()
