"""One chosen point made deployable: its ONNX file and packed weights, checked against PyTorch in one place.

``autoprune export --format onnx`` and ``autoprune apply --out model.onnx`` both call ``deploy_point``, so the
report of either holds the same fields: accuracies of PyTorch's compressed model and of onnxruntime on the
test split with their top-1 agreement, the packed file's measured size beside the cost model's memory, and
onnxruntime's CPU latency per batch beside PyTorch's float base model, timed side by side in one run, beside the
latency model's estimate for the same model and the cost model's BOPs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from autoprune.compress import CompressionResult
from autoprune.deploy.latency import LATENCY_BATCH, LATENCY_THREADS, LatencyModel
from autoprune.deploy.onnx_export import export_onnx
from autoprune.deploy.packed import pack_weights
from autoprune.deploy.verify import INTEGER_KERNELS, compare_onnx, measure_latency, runtime_kernels

LATENCY_REPEATS = 20


class DeployedPoint(BaseModel):
    """What the export report says of one point; accuracies and agreement in percent, sizes in megabits."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    onnx_file: str
    packed_file: str | None
    test_samples: int
    torch_test_accuracy: float
    onnx_test_accuracy: float
    top1_agreement: float
    max_abs_diff: float
    packed_weight_mbit: float | None
    cost_weight_mbit: float | None
    cost_memory_mbit: float | None
    packed_over_cost_weight: float | None
    latency_batch: int
    onnx_ms: float
    torch_float_base_ms: float
    # the latency model's estimate of the same file (autoprune.deploy.latency) beside the file timed as the model
    # times its layers (CPU time of one thread, median), and the cost model's BOPs
    latency_model_ms: float
    latency_measured_ms: float
    bops: float
    runtime_kernels: dict[str, str] = {}
    """Per layer, the operator onnxruntime runs it with (``autoprune.deploy.verify.runtime_kernels``)."""
    integer_kernel_layers: tuple[str, ...] = ()
    """Layers on integer kernels; of them, those with weights or input below 8 bits run their sub-8-bit
    values on 8-bit kernels (onnxruntime has none narrower); every other layer runs in float."""
    sub8_on_integer_kernels: tuple[str, ...] = ()


def _cpu_batches(task: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # onnxruntime runs on the CPU: PyTorch's side of the comparison reads the same CPU batches.
    for x, y, *_ in task.loader("test", batch_size=256):
        yield x.cpu(), y.cpu()


def example_input(task: Any, *, samples: int = 4) -> Any:
    """A few test inputs as a float32 array: the MLflow model's input example."""
    from autoprune.task import batch_inputs

    x = batch_inputs(next(iter(task.loader("test", batch_size=samples))))
    return x[:samples].cpu().float().numpy()


def deploy_point(
    result: CompressionResult, *, task: Any, base_model: nn.Module, onnx_path: str | Path, packed_path: str | Path | None = None,
    latency: LatencyModel | None = None,
) -> DeployedPoint:
    """Write ``onnx_path`` (and the packed weights at ``packed_path``) for ``result`` and measure them; ``latency``:
    the latency model of ``base_model`` on this machine (built when not given)."""
    result.model.cpu().eval()
    shape = tuple(task.input_shape)
    exported = export_onnx(result, onnx_path, input_shape=shape)
    kernels = runtime_kernels(onnx_path)
    integer = tuple(name for name, op in kernels.items() if op in INTEGER_KERNELS)
    narrow = tuple(
        name for name in integer
        if exported.layers[name].w_bits < 8 or (exported.layers[name].act is not None and exported.layers[name].act.bits < 8)
    )
    comparison = compare_onnx(result, onnx_path, _cpu_batches(task))
    packed = pack_weights(result, packed_path, input_shape=shape) if packed_path is not None else None
    timed = measure_latency(
        onnx_path, torch_models={"float base": base_model.cpu().eval()}, input_shape=shape, batch_size=LATENCY_BATCH, repeats=LATENCY_REPEATS,
        threads=LATENCY_THREADS,
    )
    check = (latency or LatencyModel(base_model, input_shape=shape)).check(result)
    return DeployedPoint(
        onnx_file=str(onnx_path),
        packed_file=str(packed_path) if packed_path is not None else None,
        test_samples=comparison.samples,
        torch_test_accuracy=comparison.torch_accuracy,
        onnx_test_accuracy=comparison.onnx_accuracy,
        top1_agreement=comparison.top1_agreement,
        max_abs_diff=comparison.max_abs_diff,
        packed_weight_mbit=packed.measured_weight_mbit if packed else None,
        cost_weight_mbit=packed.cost_weight_mbit if packed else None,
        cost_memory_mbit=packed.cost_memory_mbit if packed else None,
        packed_over_cost_weight=packed.ratio if packed else None,
        latency_batch=timed.batch_size,
        onnx_ms=timed.onnx_ms,
        torch_float_base_ms=timed.torch_ms["float base"],
        latency_model_ms=check.model_ms,
        latency_measured_ms=check.measured_ms,
        bops=result.cost(shape).total.bops,
        runtime_kernels=kernels,
        integer_kernel_layers=integer,
        sub8_on_integer_kernels=narrow,
    )
