"""From a compressed model to deployable files: ONNX with QDQ nodes, packed weights, checks against PyTorch.

onnx and onnxruntime are the optional extra ``deploy`` (``pip install 'autoprune[deploy]'``), imported on first
use. The MLflow model functions live in ``autoprune.tracking.models``, with the rest of what talks to MLflow.
"""

from autoprune.deploy.levels import WeightLevels, layer_levels, weight_levels
from autoprune.deploy.onnx_export import ActQdq, LayerQdq, OnnxExport, export_onnx, float_copy
from autoprune.deploy.packed import PackedLayer, PackedReport, pack_weights, unpack_weights, write_packed_weights
from autoprune.deploy.verify import (
    INTEGER_KERNELS, Latency, OnnxComparison, compare_onnx, measure_latency, onnx_session, run_onnx, runtime_kernels,
)

__all__ = [
    "export_onnx", "OnnxExport", "LayerQdq", "ActQdq", "float_copy",
    "pack_weights", "write_packed_weights", "unpack_weights", "PackedReport", "PackedLayer",
    "compare_onnx", "measure_latency", "onnx_session", "run_onnx", "OnnxComparison", "Latency", "runtime_kernels", "INTEGER_KERNELS",
    "WeightLevels", "weight_levels", "layer_levels",
]
