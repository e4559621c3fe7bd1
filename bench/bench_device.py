"""Trials per minute of a short search on ResNet-20 with random 3x32x32 data, and the seconds of final
training (``--final-steps`` more steps of the recipe on one fine-tuned policy), on each device asked for.

The same user task (random weights stand in for a checkpoint; random data needs no download), the same
space, sampler and seed on every device; a trial's time is its own (Optuna's start to complete), so study
set-up and the base model's evaluation are not counted.

    python bench/bench_device.py --devices cuda cpu --trials 6 --final-steps 500
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import autoprune  # noqa: E402
from autoprune.models import build_model  # noqa: E402

SPACE = {
    "layers": {"_default": {"keep_ratio": {"low": 0.5, "high": 1.0, "step": 0.25}, "w_bits": {"low": 4, "high": 8}, "a_bits": {"low": 4, "high": 8}}},
    "policy": {"order": "prune_then_quantize", "finetune_steps": 100, "batch_size": 128, "calibration_batches": 4},
}


def random_task(*, samples: int, device: str) -> autoprune.Task:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    cut = samples * 3 // 4
    torch.manual_seed(0)
    return autoprune.Task.from_model(
        build_model("resnet20", num_classes=10), train=TensorDataset(x[:cut], y[:cut]), val=TensorDataset(x[cut:], y[cut:]),
        signal_steps=0, device=device,
    )


def trials_per_minute(device: str, *, trials: int, samples: int, workdir: Path) -> tuple[float, float]:
    task = random_task(samples=samples, device=device)
    result = autoprune.search(
        task, space=SPACE, objectives="accuracy_bops", trials=trials, sampler="random", priors=False, device=device,
        study=f"bench-{device.replace(':', '-')}", storage=f"sqlite:///{workdir / 'bench.db'}",
        tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", quiet=True,
    )
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in result.study.get_trials() if t.state.name == "COMPLETE"]
    mean = statistics.mean(seconds)
    return 60.0 / mean, mean


def final_training_seconds(device: str, *, steps: int, samples: int) -> float:
    """Wall seconds of ``steps`` steps of final training (distilled, best checkpoint kept) of one policy."""
    import time

    from autoprune.compress import compress, train_further
    from autoprune.policy import Policy

    task = random_task(samples=samples, device=device)
    base = task.base(progress=False).model
    policy = Policy.from_dict({"layers": {"_default": {"keep_ratio": 0.75, "w_bits": 6, "a_bits": 6}}, **SPACE["policy"]})
    tuned = compress(base, policy, task=task)
    start = time.perf_counter()
    train_further(tuned, base, task=task, steps=steps)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--final-steps", type=int, default=500, help="steps of the final-training timing (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for device in args.devices:
            rate, mean = trials_per_minute(device, trials=args.trials, samples=args.samples, workdir=Path(tmp))
            rates[device] = rate
            name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
            print(f"{device:8s} ({name}): {rate:6.1f} trials/min ({mean:.2f} s per trial, {args.trials} trials)")
            if args.final_steps:
                print(f"{device:8s} final training: {final_training_seconds(device, steps=args.final_steps, samples=args.samples):.1f} s for {args.final_steps} steps")
        if len(rates) == 2:
            (fast, a), (slow, b) = sorted(rates.items(), key=lambda kv: -kv[1])
            print(f"{fast} runs {a / b:.1f}x the trials per minute of {slow}")


if __name__ == "__main__":
    main()
