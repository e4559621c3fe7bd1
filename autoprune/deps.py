"""Optional packages, imported on first use so that ``import autoprune`` stays lean; a missing one is a
one-line error with the command that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from autoprune.errors import AutopruneError

# top-level package -> the extra of autoprune that installs it
EXTRAS = {"onnx": "deploy", "onnxruntime": "deploy", "torchvision": "vision"}


def require(module: str) -> ModuleType:
    """``module`` (a package of an extra, or a submodule of one), or an AutopruneError naming the pip command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        package = (exc.name or module).split(".")[0]
        extra = EXTRAS.get(package) or EXTRAS.get(module.split(".")[0], "deploy")
        raise AutopruneError(extra, module, f"needs {exc.name or module}, which is not installed: pip install 'autoprune[{extra}]'") from None


__all__ = ["require", "EXTRAS"]
