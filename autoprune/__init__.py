"""autoprune: search compression policies (pruning, quantization, sparsity) of your own model.

The public API is imported on first use, so ``import autoprune`` stays fast and loads neither torch's heavy
companions (torchvision, onnx) nor the search stack (optuna, mlflow, ray).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Task": "autoprune.task",
    "TaskSpec": "autoprune.task",
    "Policy": "autoprune.policy",
    "LayerPolicy": "autoprune.policy",
    "AutopruneError": "autoprune.errors",
    "apply": "autoprune.api",
    "cost": "autoprune.cost",
    # `search` and `cost` are subpackages made callable (autoprune._callable): they forward to the API.
    "search": "autoprune.search",
    "load": "autoprune.api",
    "finalize": "autoprune.api",
    "SearchResult": "autoprune.api",
    "FrontPoint": "autoprune.api",
    "load_weights": "autoprune.weights",
    "resolve_device": "autoprune.device",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module == f"autoprune.{name}" else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
