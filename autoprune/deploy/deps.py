"""The deploy extra's packages, imported on first use so that ``import autoprune`` stays lean."""

from __future__ import annotations

import importlib
from types import ModuleType

from autoprune.errors import AutopruneError

PIP_HINT = "pip install 'autoprune[deploy]'"


def require(module: str) -> ModuleType:
    """``onnx`` or ``onnxruntime`` (or a submodule), or an AutopruneError naming the pip command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise AutopruneError("deploy", module, f"needs {exc.name or module}, which is not installed: {PIP_HINT}") from None
