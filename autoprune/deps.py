"""Optional packages, imported on first use so that ``import autoprune`` stays lean; a missing one is a
one-line error with the command that installs it."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
from types import ModuleType
from typing import Any

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


VISION_HINT = "pip install 'autoprune[vision]'"

# torchvision's compiled ops declare these schemas; its Python side registers fake kernels for them at import,
# which fails when the compiled library cannot load (a CUDA wheel beside a CPU torch). The datasets, transforms
# and models autoprune uses never call them.
_FALLBACK_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# A torch.library.Library drops its registrations when garbage-collected, so it lives as long as the process.
_fallback_lib: Any = None


def _define_fallback_schemas() -> None:
    import torch

    global _fallback_lib
    missing = [op for op in _FALLBACK_SCHEMAS if not hasattr(torch.ops.torchvision, op)]
    if not missing:
        return
    if _fallback_lib is None:
        _fallback_lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in missing:
        _fallback_lib.define(_FALLBACK_SCHEMAS[op])


def _forget_torchvision() -> None:
    # A failed import leaves half-initialised submodules behind; the retry must start from scratch.
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]


def torchvision_mismatch() -> str | None:
    """What says the installed torchvision was built for another torch than the installed one, or None
    (torchvision pins the torch release it was built against: ``torch==2.13.0`` for 0.28.0)."""
    import torch

    try:
        requires = importlib.metadata.requires("torchvision") or []
        version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return None
    pinned = next((m.group(1) for r in requires if (m := re.match(r"torch\s*\(?==\s*([\w.]+)", r))), None)
    installed = torch.__version__.split("+")[0]
    if pinned is None or pinned == installed:
        return None
    return f"torchvision {version} is built for torch {pinned}, but torch {installed} is installed: pip install the torchvision of torch {installed}"


def import_torchvision(*, field: str, value: Any) -> ModuleType:
    """torchvision, imported on first use; a failure is one line against ``field`` and ``value`` (a dataset, a
    model reference). A torchvision built for another torch release is refused, saying so; a CUDA build beside a
    CPU torch of the same release imports with the two op schemas its Python side needs defined here."""
    if "torchvision" not in sys.modules:
        mismatch = torchvision_mismatch() if importlib.util.find_spec("torchvision") is not None else None
        if mismatch is not None:
            raise AutopruneError(field, value, f"needs a torchvision that matches torch: {mismatch}")
    try:
        return importlib.import_module("torchvision")
    except ModuleNotFoundError as exc:
        missing = "" if exc.name in (None, "torchvision") else f" (its dependency {exc.name!r} is missing)"
        raise AutopruneError(field, value, f"needs torchvision{missing}: {VISION_HINT}") from None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise AutopruneError(field, value, f"needs a working torchvision; importing it failed ({_first_line(exc)}): {VISION_HINT}") from exc
        first_error = exc
    _forget_torchvision()
    _define_fallback_schemas()
    try:
        return importlib.import_module("torchvision")
    except Exception as exc:  # noqa: BLE001 - reported as one line, with the original chained
        raise AutopruneError(field, value, f"needs a working torchvision; importing it failed ({_first_line(exc)}): {VISION_HINT}") from first_error


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


__all__ = ["require", "EXTRAS", "import_torchvision", "torchvision_mismatch"]
