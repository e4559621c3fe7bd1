"""Checks of an exported model against PyTorch: same predictions, and CPU latency side by side."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from autoprune.compress import CompressionResult
from autoprune.deps import require


class OnnxComparison(BaseModel):
    """Accuracies and top-1 agreement in percent; the largest |logit difference| over all samples."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    samples: int
    torch_accuracy: float
    onnx_accuracy: float
    top1_agreement: float
    max_abs_diff: float


class Latency(BaseModel):
    """Median milliseconds per batch of ``batch_size`` on the CPU, onnxruntime and each PyTorch model."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    batch_size: int
    threads: int
    repeats: int
    onnx_ms: float
    torch_ms: dict[str, float]


INTEGER_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger")
"""onnxruntime's integer kernels (CPU): what its QDQ fusion turns an 8-bit DequantizeLinear -> layer -> QuantizeLinear into."""


def runtime_kernels(path: str | Path) -> dict[str, str]:
    """Per layer, the operator onnxruntime runs it with after its graph optimizations (``QLinearConv``, ``QGemm``:
    integer kernels; ``Conv``, ``FusedConv``, ``Gemm``: float). Read from the optimized graph onnxruntime writes
    at its extended level, where its QDQ fusions run (the default, higher level adds only layout changes)."""
    import tempfile

    onnx, ort = require("onnx"), require("onnxruntime")
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    kernels: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            continue
        for value in node.input:
            for suffix in (".weight_quantized", ".weight"):
                if value.endswith(suffix):
                    kernels.setdefault(value[: -len(suffix)], node.op_type)
    return kernels


def onnx_session(path: str | Path, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session; ``threads`` fixes its intra-op threads (default: onnxruntime's choice)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, inputs: Any) -> Any:
    """onnxruntime's first output for a float32 array of inputs."""
    import numpy as np

    session = onnx_session(path)
    return session.run(None, {session.get_inputs()[0].name: np.asarray(inputs, dtype=np.float32)})[0]


@torch.no_grad()
def compare_onnx(result: CompressionResult, onnx_path: str | Path, loader: Iterable[Sequence[torch.Tensor]]) -> OnnxComparison:
    """Run the compressed PyTorch model and the ONNX file on the same (inputs, labels) batches."""
    session = onnx_session(onnx_path)
    input_name = session.get_inputs()[0].name
    model = result.model.eval()
    samples = correct_torch = correct_onnx = agree = 0
    max_diff = 0.0
    for x, y, *_ in loader:
        expected = model(x).numpy()
        actual = session.run(None, {input_name: x.numpy().astype(np.float32)})[0]
        labels = y.numpy()
        correct_torch += int((expected.argmax(1) == labels).sum())
        correct_onnx += int((actual.argmax(1) == labels).sum())
        agree += int((expected.argmax(1) == actual.argmax(1)).sum())
        max_diff = max(max_diff, float(np.abs(expected - actual).max()))
        samples += len(labels)
    percent = 100.0 / max(1, samples)
    return OnnxComparison(
        samples=samples, torch_accuracy=correct_torch * percent, onnx_accuracy=correct_onnx * percent,
        top1_agreement=agree * percent, max_abs_diff=max_diff,
    )


@torch.no_grad()
def measure_latency(
    onnx_path: str | Path,
    *,
    torch_models: Mapping[str, nn.Module],
    input_shape: tuple[int, int, int],
    batch_size: int = 64,
    repeats: int = 20,
    warmup: int = 3,
    threads: int = 1,
) -> Latency:
    """CPU latency per batch, onnxruntime beside PyTorch models (the base float model, say), on one input.

    Rounds alternate between the runtimes, so a load change on a shared machine hits all of them alike; each
    runtime gets ``threads`` threads (torch's global setting is restored after) and the median is reported.
    """
    session = onnx_session(onnx_path, threads=threads)
    input_name = session.get_inputs()[0].name
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    feed = {input_name: x.numpy()}
    models = {name: model.eval() for name, model in torch_models.items()}
    runs: dict[str | None, Any] = {None: lambda: session.run(None, feed), **{name: (lambda m=m: m(x)) for name, m in models.items()}}
    times: dict[str | None, list[float]] = {name: [] for name in runs}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for round_ in range(warmup + repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if round_ >= warmup:
                    times[name].append(1e3 * (time.perf_counter() - start))
    finally:
        torch.set_num_threads(previous)
    medians = {name: statistics.median(values) for name, values in times.items()}
    onnx_ms = medians.pop(None)
    return Latency(batch_size=batch_size, threads=threads, repeats=repeats, onnx_ms=onnx_ms, torch_ms=medians)
