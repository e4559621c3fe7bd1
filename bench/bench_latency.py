"""Does the cost model, and does the latency model, rank compressed models as onnxruntime runs them?

For each model, a set of policies (float, uniform W8A8 on the mid-tread grid (int8 weights: onnxruntime's integer
kernels) and on the default mid-rise grid (int16 weights), W4A4, keep 0.5, keep 0.5 at W8A8, and ``--mixed``
seeded per-layer mixes of keep ratio, weight and activation bits and grid) is compressed without data (weights on the
quantizer's grid, activation ranges calibrated on random inputs: a time does not depend on the values),
exported by the QDQ path and timed whole on onnxruntime (the median of ``--repeats`` runs per batch, one intra-op
thread, CPU time of the calling thread, as the latency model times its layers); the latency
model (``autoprune.deploy.latency``) predicts the same model from its per-layer table. The float model is also
timed in PyTorch (one thread). Reported: one row per policy (BOPs, measured ms, model ms, error, layers on integer kernels), the Spearman correlation of
BOPs against the measured latency and of the latency model against it, and the latency model's median relative
error (target: within 15%).

    python bench/bench_latency.py --models mnist1d_cnn resnet18 --mixed 8 --out bench_latency.json

``resnet18`` is torchvision's (the ``vision`` extra) at ``--resnet-input`` (3x64x64 by default). Each model's
latency table is cached under ``AUTOPRUNE_CACHE``; ``--fresh`` measures it again in a temporary cache. Timings on
a loaded machine are noisy: say so beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from autoprune.deploy.latency import LATENCY_BATCH, LatencyModel, random_calibrated  # noqa: E402
from autoprune.deploy.verify import INTEGER_KERNELS  # noqa: E402
from autoprune.models import build_model, compressible_layers  # noqa: E402
from autoprune.policy import Policy  # noqa: E402


def model_of(name: str, resnet_input: tuple[int, int, int]) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "resnet18":
        from autoprune.vision import import_torchvision

        return import_torchvision().models.resnet18(num_classes=10).eval(), resnet_input
    model = build_model(name).eval()
    from autoprune.models import default_input_shape

    shape = default_input_shape(name)
    assert shape is not None
    return model, shape


def policies(model: nn.Module, *, mixed: int, seed: int) -> dict[str, dict[str, Any]]:
    # W8A8 on a mid-tread grid (clip_uniform) stores int8 weights, which onnxruntime's integer kernels take; the
    # default mid-rise grid needs 9 bits at 8 (int16 weights, float kernels)
    tread = {"kind": "clip_uniform"}
    fixed: dict[str, dict[str, Any]] = {
        "float": {"input_bits": 32},
        "W8A8": {"layers": {"_default": {"w_bits": 8, "a_bits": 8}}, "quantizer": tread},
        "W8A8 midrise": {"layers": {"_default": {"w_bits": 8, "a_bits": 8}}},
        "W4A4": {"layers": {"_default": {"w_bits": 4, "a_bits": 4}}},
        "keep 0.5": {"layers": {"_default": {"keep_ratio": 0.5}}, "input_bits": 32},
        "keep 0.5 W8A8": {"layers": {"_default": {"keep_ratio": 0.5, "w_bits": 8, "a_bits": 8}}, "quantizer": tread},
    }
    rng = random.Random(seed)
    names = list(compressible_layers(model))
    for index in range(mixed):
        # one keep ratio per policy (layers joined by a residual add share their channels); the output layer keeps
        # its outputs (the classes); bits drawn per layer
        keep = rng.choice([0.5, 0.75, 1.0])
        layers = {
            n: {"keep_ratio": 1.0 if n == names[-1] else keep, "w_bits": rng.choice([2, 4, 6, 8, 32]), "a_bits": rng.choice([4, 8, 32])}
            for n in names
        }
        fixed[f"mixed {index}"] = {"layers": layers, "input_bits": rng.choice([8, 32]), "quantizer": rng.choice([tread, {"kind": "midrise"}])}
    return fixed


def torch_ms(model: nn.Module, shape: tuple[int, ...], *, repeats: int) -> float:
    # timed as the latency model times onnxruntime: the CPU time of the calling thread (torch has one thread)
    x = torch.randn(LATENCY_BATCH, *shape)
    times = []
    with torch.no_grad():
        for index in range(repeats + 3):
            start = time.thread_time()
            model(x)
            if index >= 3:
                times.append(1e3 * (time.thread_time() - start))
    return statistics.median(times)


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2.0
        i = j + 1
    return result


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def bench_model(name: str, *, resnet_input: tuple[int, int, int], mixed: int, seed: int, repeats: int, float_weights: bool = False) -> dict[str, Any]:
    model, shape = model_of(name, resnet_input)
    latency = LatencyModel(model, input_shape=shape, repeats=repeats, float_weights_off_kernel=float_weights)
    start = time.perf_counter()
    rows = []
    for label, spec in policies(model, mixed=mixed, seed=seed).items():
        result = random_calibrated(model, Policy.model_validate({**spec, "finetune_steps": 0}), shape)
        check = latency.check(result)
        rows.append({
            "policy": label, "bops": result.cost(shape).total.bops, "onnx_ms": check.measured_ms, "model_ms": check.model_ms,
            "error": check.relative_error, "integer_layers": sum(k in INTEGER_KERNELS for k in check.kernels.values()),
            "layers": len(compressible_layers(result.model)),
        })
    table_seconds = time.perf_counter() - start
    bops, measured, predicted = ([r[k] for r in rows] for k in ("bops", "onnx_ms", "model_ms"))
    by_label = {r["policy"]: r for r in rows}
    return {
        "model": name, "float_weights_off_kernel": float_weights, "input_shape": list(shape), "batch": LATENCY_BATCH, "threads": latency.threads, "rows": rows,
        "torch_float_ms": torch_ms(model, shape, repeats=repeats),
        "spearman_bops_vs_measured": spearman(bops, measured),
        "spearman_model_vs_measured": spearman(predicted, measured),
        "median_abs_error": statistics.median(abs(r["error"]) for r in rows),
        "w8a8_faster_than_float_onnx": by_label["W8A8"]["onnx_ms"] < by_label["float"]["onnx_ms"],
        "seconds": table_seconds, "table": str(latency.path),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"### {report['model']} ({'x'.join(map(str, report['input_shape']))}), batch {report['batch']}, {report['threads']} thread"
        + (", float weights on float kernels" if report["float_weights_off_kernel"] else ""),
        "",
        f"Spearman BOPs vs measured {report['spearman_bops_vs_measured']:.2f}, "
        f"latency model vs measured {report['spearman_model_vs_measured']:.2f}; median |error| of the latency model "
        f"{100 * report['median_abs_error']:.1f}%.",
        "",
        "| policy | BOPs | onnxruntime ms (measured) | latency model ms | error | integer kernels |",
        "|---|---|---|---|---|---|",
    ]
    float_bops = report["rows"][0]["bops"]
    lines.append(f"| float, PyTorch | {float_bops:.3g} | {report['torch_float_ms']:.3f} (PyTorch) | - | - | - |")
    for r in report["rows"]:
        lines.append(
            f"| {r['policy']} | {r['bops']:.3g} | {r['onnx_ms']:.3f} | {r['model_ms']:.3f} | {100 * r['error']:+.1f}% "
            f"| {r['integer_layers']}/{r['layers']} |"
        )
    lines.append(f"\nW8A8 (clip_uniform) measured faster than the float model on onnxruntime: {report['w8a8_faster_than_float_onnx']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mnist1d_cnn", "resnet18"])
    parser.add_argument("--mixed", type=int, default=8, help="seeded mixed per-layer policies per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per measurement (median)")
    parser.add_argument("--resnet-input", type=int, nargs=3, default=[3, 64, 64])
    parser.add_argument(
        "--float-weights-off-kernel", action="store_true",
        help="export (and model) with the weights of layers onnxruntime runs on float kernels stored as float32",
    )
    parser.add_argument("--fresh", action="store_true", help="measure every table again, in a temporary cache")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fresh:
        os.environ["AUTOPRUNE_CACHE"] = tempfile.mkdtemp(prefix="bench-latency-")
    reports = []
    for name in args.models:
        report = bench_model(
            name, resnet_input=tuple(args.resnet_input), mixed=args.mixed, seed=args.seed, repeats=args.repeats,
            float_weights=args.float_weights_off_kernel,
        )
        print(markdown(report), flush=True)
        reports.append(report)
    if args.out:
        args.out.write_text(json.dumps(reports, indent=1) + "\n")


if __name__ == "__main__":
    main()
