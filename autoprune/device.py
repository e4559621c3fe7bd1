"""Where compression, fine-tuning and evaluation run: a torch device chosen once, checked before any work.

The cost model never depends on it: it reads weights and shapes, on a CPU copy when needed.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from autoprune.errors import AutopruneError

_DEVICE = re.compile(r"^(cpu|cuda)(:\d+)?$")


def resolve_device(value: str | torch.device | None = None, *, field: str = "device") -> torch.device:
    """``None`` means CUDA when it is available, else the CPU; ``cuda`` without CUDA is an error, not a fallback."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(value)
    match = _DEVICE.match(text)
    if not match or (match.group(1) == "cpu" and match.group(2)):
        raise AutopruneError(field, text, "is not a device (cpu, cuda or cuda:N)")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AutopruneError(field, text, "asks for CUDA, which this machine does not have (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AutopruneError(field, text, f"names a GPU this machine lacks (it has {torch.cuda.device_count()})")
    return device


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, or tuple / list / dict of them) on ``device``; anything else passes through."""
    if isinstance(batch, torch.Tensor):
        # Non-blocking only pays off from pinned memory, which the loaders use on CUDA.
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def device_of(model: torch.nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
