"""Training-time S/N on the default task (seed 000 sec. 2.3, 2.7, App. B), measured side by side in one run.

    python bench/bench_signals.py --trials 20 --seeds 0 1 2 --repeats 5

1. Overhead of SignalTracker on base-model training time: fresh trainings without it, with it, and with it plus
   the per-epoch validation accuracy that Evaluator.for_task asks for, interleaved; medians and ratios (target < 10%).
2. Warm vs cold start: the same search (default space, accuracy/BOPs, TPE, same budget) with and without the
   prior policies, per seed: final hypervolume and the trials each needs to reach 95% of the cold search's final
   hypervolume.
3. Fig. 3 / App. B: validation accuracy vs total ESN_a during training (S/N record) and after post-training
   quantization of the trained model at 1..8 weight bits; rank correlations within each curve and how well the
   two curves agree; then the kappa=1 per-layer prior bits against one uniform bit-width at equal ESN_a,
   post-training and after a short fine-tune.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

WORKDIR = Path(tempfile.mkdtemp(prefix="autoprune-bench-signals-"))
# Chosen before autoprune is imported so that no import can read the default cache first; an empty cache makes part 3
# train the base model here, with the tracker. setdefault leaves a caller's own AUTOPRUNE_CACHE in charge.
os.environ.setdefault("AUTOPRUNE_CACHE", str(WORKDIR / "cache"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from autoprune.compress import compress  # noqa: E402
from autoprune.policy import LayerPolicy, Policy  # noqa: E402
from autoprune.search.evaluate import Evaluator  # noqa: E402
from autoprune.search.pareto import hypervolume_history  # noqa: E402
from autoprune.search.priors import prior_policies  # noqa: E402
from autoprune.api import search_config  # noqa: E402
from autoprune.search.runner import run_search  # noqa: E402
from autoprune.signals import SignalTracker  # noqa: E402
from autoprune.task import Task, accuracy, train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
UNIFORM_BITS = range(1, 9)


# --- 1. tracker overhead --------------------------------------------------------------------------


def time_training(task: Task, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds of each training. CPU time is kept too because other jobs on this shared CPU
    stretch wall time by whatever they happen to run, while they stretch CPU time much less."""
    variants = {
        "no tracker": lambda: [],
        "tracker": lambda: [SignalTracker()],
        "tracker + val accuracy": lambda: [SignalTracker(val_accuracy=lambda m: accuracy(m, task.splits.val))],
    }
    # The first training in a process pays one-off start-up costs (data loading, kernel set-up) that belong to no variant.
    train(task.build(), task.splits.train, dataclasses.replace(task.spec.train, epochs=1), seed=task.spec.seed, progress=False)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        # Rotating the order spreads drifts in the load of this shared CPU over all variants.
        for name in names[r % len(names):] + names[: r % len(names)]:
            model = task.build()
            start, start_cpu = time.perf_counter(), time.process_time()
            train(model, task.splits.train, task.spec.train, seed=task.spec.seed, callbacks=variants[name](), progress=False)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def overhead(seconds: dict[str, float], name: str) -> float:
    return 100 * (seconds[name] / seconds["no tracker"] - 1)


def print_overheads(timings: dict[str, dict[str, float]]) -> None:
    for label, t in timings.items():
        print(
            f"   {label:>12}: " + ", ".join(f"{n} {v:.2f} s" for n, v in t.items())
            + f"; overhead: tracker {overhead(t, 'tracker'):+.1f}%, tracker + val accuracy {overhead(t, 'tracker + val accuracy'):+.1f}%",
            flush=True,
        )


# --- 2. warm vs cold ------------------------------------------------------------------------------


def search(*, seed: int, trials: int, priors: bool):
    config = search_config(
        space_path=REPO / "autoprune/specs/search_spaces/default.yaml",
        objectives_path=REPO / "autoprune/specs/objectives/accuracy_bops.yaml",
        study=f"{'warm' if priors else 'cold'}-{seed}",
        storage=f"sqlite:///{WORKDIR / 'bench.db'}",
        trials=trials,
        sampler="tpe",
        seed=seed,
        tracking_uri=f"sqlite:///{WORKDIR / 'mlruns' / 'mlflow.db'}",
        priors=priors,
        progress=False,
    )
    return run_search(config)


def trials_to_reach(history: list[float], target: float) -> int | None:
    return next((i + 1 for i, hv in enumerate(history) if hv >= target), None)


def fmt_reach(n: int | None, budget: int) -> str:
    return f"{n}" if n is not None else f">{budget}"


def mean_reach(rows: list[dict], key: str, budget: int) -> float:
    """A search that never reached the target counts as budget + 1: a lower bound on what it would have needed."""
    return statistics.mean(r[key] if r[key] is not None else budget + 1 for r in rows)


# --- 3. Fig. 3 / App. B ---------------------------------------------------------------------------


def quantized(evaluator: Evaluator, layers: dict[str, LayerPolicy], finetune_steps: int) -> tuple[float, float]:
    """Validation accuracy and total ESN_a of the base model compressed with weight bits only."""
    task = evaluator.task
    result = compress(evaluator.base.model, Policy(layers=layers, finetune_steps=finetune_steps, bn_recalibration=True), task=task)
    return accuracy(result.model, task.splits.val), result.cost(task.input_shape).total.esn_a


def uniform_curve(evaluator: Evaluator, finetune_steps: int) -> list[tuple[int, float, float]]:
    return [(b, *quantized(evaluator, {"_default": LayerPolicy(w_bits=b, a_bits=32)}, finetune_steps)) for b in UNIFORM_BITS]


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's rho; nan when it is undefined (fewer than two points or a constant input)."""
    if len(x) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(x, y).statistic)


def fmt_rho(rho: float) -> str:
    return "undefined" if math.isnan(rho) else f"{rho:+.3f}"


def at_esn(curve_esn: list[float], curve_acc: list[float], esn: float) -> float:
    """A curve's accuracy at one ESN_a, linear in log ESN_a between the neighbouring points (clamped at the ends)."""
    order = np.argsort(np.log10(curve_esn))
    return float(np.interp(math.log10(esn), np.log10(curve_esn)[order], np.asarray(curve_acc)[order]))


def compare_prior(evaluator: Evaluator, prior_bits: dict[str, int], curve: list[tuple[int, float, float]], finetune_steps: int, one_sample: float) -> dict:
    """The prior policy against the uniform ``curve`` (measured with the same fine-tune) at the prior's ESN_a."""
    acc, esn = quantized(evaluator, {name: LayerPolicy(w_bits=b, a_bits=32) for name, b in prior_bits.items()}, finetune_steps)
    esns, accs = [e for _, _, e in curve], [a for _, a, _ in curve]
    closest = min(curve, key=lambda p: abs(math.log10(p[2]) - math.log10(esn)))
    uniform_acc = at_esn(esns, accs, esn)
    diff = acc - uniform_acc
    winner = "tie (within one validation sample)" if abs(diff) < one_sample else ("per-layer prior" if diff > 0 else "uniform bit-width")
    inside = min(esns) <= esn <= max(esns)
    return {"curve": curve, "acc": acc, "esn": esn, "closest": closest, "uniform_acc": uniform_acc, "diff": diff, "winner": winner, "inside": inside}


def print_prior_comparison(label: str, c: dict) -> None:
    print(f"   {label}:")
    print("     uniform: " + ", ".join(f"W{b} {acc:.2f}% @ {esn:.3g}" for b, acc, esn in c["curve"]))
    b, acc, esn = c["closest"]
    print(f"     prior (kappa=1): {c['acc']:.2f}% @ ESN_a {c['esn']:.3g}; closest uniform W{b}: {acc:.2f}% @ {esn:.3g}")
    where = "" if c["inside"] else " (outside the uniform range: clamped to its end)"
    print(f"     uniform interpolated to the prior's ESN_a{where}: {c['uniform_acc']:.2f}% -> prior {c['diff']:+.2f} points: {c['winner']}")


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # Five rather than three: this CPU is shared, and a single training can take twice its usual time.
    parser.add_argument("--repeats", type=int, default=5, help="timed trainings per variant in part 1")
    parser.add_argument("--finetune-steps", type=int, default=150, help="fine-tune of the repeated prior comparison in part 3")
    args = parser.parse_args()

    task = Task()
    print(f"work dir {WORKDIR}; AUTOPRUNE_CACHE={os.environ['AUTOPRUNE_CACHE']}", flush=True)

    print(f"\n1. SignalTracker overhead on base-model training ({task.spec.train.epochs} epochs, {args.repeats} interleaved repeats each)", flush=True)
    wall, cpu = time_training(task, args.repeats)
    for name in wall:
        print(f"   {name:>22}: wall {', '.join(f'{s:.2f}' for s in wall[name])} s; CPU {', '.join(f'{s:.2f}' for s in cpu[name])} s")
    timings = {
        "wall median": {name: statistics.median(s) for name, s in wall.items()},
        "wall fastest": {name: min(s) for name, s in wall.items()},
        "CPU median": {name: statistics.median(s) for name, s in cpu.items()},
    }
    print_overheads(timings)

    # Trained here with the tracker and its validation callable (the cache is empty), then reused by every search.
    start = time.perf_counter()
    evaluator = Evaluator.for_task(task, progress=False)
    base_note = "loaded from an existing cache" if evaluator.base.from_cache else f"trained in {time.perf_counter() - start:.1f} s"
    signals = evaluator.base.extras["signals"]
    one_sample = 100.0 / len(task.splits.val)

    print(f"\n2. Warm vs cold start: TPE, default space, accuracy/BOPs, {args.trials} trials, seeds {args.seeds}", flush=True)
    rows = []
    for seed in args.seeds:
        cold = search(seed=seed, trials=args.trials, priors=False)
        warm = search(seed=seed, trials=args.trials, priors=True)
        cold_hist, warm_hist = hypervolume_history(cold.study), hypervolume_history(warm.study)
        target = 0.95 * cold_hist[-1]
        # A budget smaller than the number of priors leaves some of them waiting, never run.
        enqueued = [t for t in warm.study.get_trials(deepcopy=False) if "prior" in t.user_attrs and t.state.is_finished()]
        k = len(enqueued)
        row = {
            "seed": seed, "cold_hv": cold_hist[-1], "warm_hv": warm_hist[-1],
            "cold_reach": trials_to_reach(cold_hist, target), "warm_reach": trials_to_reach(warm_hist, target),
            "k": k, "cold_hv_k": cold_hist[k - 1] if k else math.nan, "warm_hv_k": warm_hist[k - 1] if k else math.nan,
            "enqueued": enqueued,
        }
        rows.append(row)
        print(
            f"   seed {seed}: final HV cold {row['cold_hv']:.4f}, warm {row['warm_hv']:.4f} ({row['warm_hv'] - row['cold_hv']:+.4f}); "
            f"trials to 95% of cold final ({target:.4f}): cold {fmt_reach(row['cold_reach'], args.trials)}, warm {fmt_reach(row['warm_reach'], args.trials)}; "
            f"HV after the first {k} trials: cold {row['cold_hv_k']:.4f}, warm {row['warm_hv_k']:.4f}; "
            f"{cold.seconds:.0f} s / {warm.seconds:.0f} s",
            flush=True,
        )
    for t in rows[0]["enqueued"]:
        m = t.user_attrs.get("metrics")
        outcome = f"accuracy {m['accuracy']:.2f}%, BOPs reduction {m['bops_reduction']:.1f}x" if m else f"failed: {t.user_attrs.get('failure')}"
        print(f"   enqueued {t.user_attrs['prior']} (trial {t.number}): {outcome}; params {t.params}")

    print(f"\n3. Fig. 3 / App. B (base model {base_note}, val accuracy {evaluator.base.val_accuracy:.2f}%, one val sample = {one_sample:.2f} points)")
    train_esn, train_acc = signals["total"]["esn_a"], signals["val_accuracy"]
    print("   (a) during training, per epoch: " + ", ".join(f"{j}: {a:.1f}% @ {e:.3g}" for j, (a, e) in enumerate(zip(train_acc, train_esn))))
    rho_train = rank_correlation(train_esn, train_acc)
    ptq = uniform_curve(evaluator, 0)
    rho_ptq = rank_correlation([e for _, _, e in ptq], [a for _, a, _ in ptq])
    print(f"       Spearman(accuracy, ESN_a) over epochs: {fmt_rho(rho_train)}")
    print("   (b) post-training quantization, uniform weight bits (a_bits 32), vs the training curve at the same ESN_a:")
    lo, hi = min(train_esn), max(train_esn)
    inside = []
    for b, acc, esn in ptq:
        if lo <= esn <= hi:
            predicted = at_esn(train_esn, train_acc, esn)
            inside.append((acc, predicted))
            note = f"training curve {predicted:.2f}% ({predicted - acc:+.2f})"
        else:
            note = f"outside the training curve's ESN_a range [{lo:.3g}, {hi:.3g}]"
        print(f"       W{b}: {acc:.2f}% @ ESN_a {esn:.3g}; {note}")
    print(f"       Spearman(accuracy, ESN_a) over bit-widths: {fmt_rho(rho_ptq)}")
    mad = statistics.mean(abs(a - p) for a, p in inside) if inside else math.nan
    rho_agree = rank_correlation([a for a, _ in inside], [p for _, p in inside])
    print(f"       agreement on the {len(inside)}/{len(ptq)} points inside the training range: mean |training - PTQ| {mad:.2f} points, Spearman {fmt_rho(rho_agree)}")

    prior = prior_policies(evaluator)[1.0]
    prior_bits = {name: lp.w_bits for name, lp in prior.layers.items()}
    print(f"   (c) kappa=1 prior weight bits (plateau epoch of the S/N record): {prior_bits}")
    comparisons = {0: compare_prior(evaluator, prior_bits, ptq, 0, one_sample)}
    print_prior_comparison("post-training (finetune_steps=0)", comparisons[0])
    if args.finetune_steps:
        comparisons[args.finetune_steps] = compare_prior(evaluator, prior_bits, uniform_curve(evaluator, args.finetune_steps), args.finetune_steps, one_sample)
        print_prior_comparison(f"fine-tuned (finetune_steps={args.finetune_steps})", comparisons[args.finetune_steps])

    budget = args.trials
    print("\n=== SUMMARY ===")
    print(f"1. base-model training, {args.repeats} interleaved runs per variant (target: tracker overhead < 10%)")
    print_overheads(timings)
    print(f"2. warm vs cold, {budget} trials, seeds {args.seeds}:")
    for r in rows:
        print(f"   seed {r['seed']}: HV cold {r['cold_hv']:.4f} warm {r['warm_hv']:.4f}; trials to 95% cold {fmt_reach(r['cold_reach'], budget)} warm {fmt_reach(r['warm_reach'], budget)}")
    print(
        f"   mean: HV cold {statistics.mean(r['cold_hv'] for r in rows):.4f} warm {statistics.mean(r['warm_hv'] for r in rows):.4f}; "
        f"trials to 95% cold {mean_reach(rows, 'cold_reach', budget):.1f} warm {mean_reach(rows, 'warm_reach', budget):.1f} "
        f"(a search that never reached it counts as {budget + 1})"
    )
    print(f"3. (a) Spearman(acc, ESN_a) during training {fmt_rho(rho_train)}; (b) after PTQ {fmt_rho(rho_ptq)}")
    print(f"   curves agree on {len(inside)}/{len(ptq)} PTQ points in range: mean |diff| {mad:.2f} points, Spearman {fmt_rho(rho_agree)}")
    for steps, c in comparisons.items():
        print(
            f"   (c) finetune_steps={steps}: prior {c['acc']:.2f}% @ {c['esn']:.3g} vs uniform {c['uniform_acc']:.2f}% at equal ESN_a "
            f"({c['diff']:+.2f} points): {c['winner']}"
        )


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(WORKDIR, ignore_errors=True)
