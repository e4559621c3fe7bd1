"""Search-quality benchmarks on the default task, measured side by side in one run.

1. Hypervolume of each sampler's front at the same trial budget, over several seeds (picks the default).
2. The front of the default sampler against uniform-precision baselines at full width (W8A8, W4A4,
   W2A2, W4A8: seed 000's quantize-only strategy): how many it dominates or matches.
3. The largest BOPs reduction against the float model at <= 1.5 points validation accuracy drop.
4. Overhead: the share of the search's wall time spent outside compress-and-evaluate.

    python bench/bench_search.py --trials 30 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from autoprune.policy import LayerPolicy, Policy  # noqa: E402
from autoprune.search.pareto import front_trials, hypervolume, scored_trials  # noqa: E402
from autoprune.search.record import read_trial  # noqa: E402
from autoprune.search.runner import SearchConfig, run_search  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASELINES = {"W8A8": (8, 8), "W4A4": (4, 4), "W2A2": (2, 2), "W4A8": (4, 8)}


def search(workdir: Path, *, sampler: str, seed: int, trials: int):
    config = SearchConfig(
        space_path=REPO / "autoprune/specs/search_spaces/default.yaml",
        objectives_path=REPO / "autoprune/specs/objectives/accuracy_bops.yaml",
        study_name=f"{sampler}-{seed}",
        storage=f"sqlite:///{workdir / 'bench.db'}",
        trials=trials,
        sampler=sampler,
        seed=seed,
        tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}",
        priors=False,
        progress=False,
    )
    start = time.perf_counter()
    outcome = run_search(config)
    return outcome.study, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "random"])
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="autoprune-bench-"))
    os.environ.setdefault("AUTOPRUNE_CACHE", str(workdir / "cache"))
    studies: dict[str, list] = {s: [] for s in args.samplers}
    walls: list[tuple[float, float]] = []
    for seed in args.seeds:
        for sampler in args.samplers:
            study, wall = search(workdir, sampler=sampler, seed=seed, trials=args.trials)
            studies[sampler].append(study)
            inside = sum(read_trial(t).metrics["trial_seconds"] for t in scored_trials(study))
            walls.append((wall, inside))
            print(f"  {sampler:>6} seed {seed}: hypervolume {hypervolume(study):.4f}, front {len(front_trials(study))}, {wall:.0f} s", flush=True)

    print(f"\n1. Hypervolume at {args.trials} trials over seeds {args.seeds} (log-scale BOPs, see autoprune.search.pareto)")
    means = {s: statistics.mean(hypervolume(st) for st in sts) for s, sts in studies.items()}
    reference = means.get("random") or max(means.values())
    for sampler, mean in sorted(means.items(), key=lambda kv: -kv[1]):
        values = ", ".join(f"{hypervolume(st):.4f}" for st in studies[sampler])
        print(f"   {sampler:>6}: mean {mean:.4f} ({values}); ratio to random {mean / reference:.3f}")
    best = max(means, key=means.get)  # type: ignore[arg-type]
    print(f"   best sampler by mean hypervolume: {best}")

    from autoprune.search.evaluate import Evaluator
    from autoprune.task import Task

    evaluator = Evaluator.for_task(Task(), progress=False)
    default_front = [read_trial(t).metrics for st in studies[best] for t in front_trials(st)]
    print(f"\n2. Front of {best} (all seeds pooled) against uniform-precision baselines at full width (150 QAT steps)")
    covered = 0
    for label, (w, a) in BASELINES.items():
        metrics, _ = evaluator.evaluate(Policy(layers={"_default": LayerPolicy(w_bits=w, a_bits=a)}))
        match = [m for m in default_front if m["accuracy"] >= metrics["accuracy"] and m["bops"] <= metrics["bops"]]
        covered += bool(match)
        best_match = max(match, key=lambda m: metrics["bops"] / m["bops"]) if match else None
        note = f"dominated/matched by a front point with {metrics['bops'] / best_match['bops']:.1f}x fewer BOPs at {best_match['accuracy']:.2f}%" if best_match else "not dominated"
        print(f"   {label}: accuracy {metrics['accuracy']:.2f}%, BOPs {metrics['bops']:.3g} ({metrics['bops_reduction']:.1f}x) -> {note}")
    print(f"   baselines dominated or matched: {covered}/{len(BASELINES)}")

    print("\n3. Largest BOPs reduction vs the float model at <= 1.5 points validation accuracy drop (all trials)")
    feasible = [m for sts in studies.values() for st in sts for t in scored_trials(st) if (m := read_trial(t).metrics)["accuracy_drop"] <= 1.5]
    if feasible:
        top = max(feasible, key=lambda m: m["bops_reduction"])
        print(f"   {top['bops_reduction']:.1f}x at {top['accuracy']:.2f}% ({-top['accuracy_drop']:+.2f} points; base {evaluator.base.val_accuracy:.2f}%)")
    else:
        print("   no trial within 1.5 points")

    total_wall = sum(w for w, _ in walls)
    total_inside = sum(i for _, i in walls)
    print("\n4. Overhead outside compress-and-evaluate (sampler, storage, MLflow, start-up)")
    print(f"   {100 * (1 - total_inside / total_wall):.1f}% of {total_wall:.0f} s wall ({total_inside:.0f} s inside compress-and-evaluate)")


if __name__ == "__main__":
    main()
