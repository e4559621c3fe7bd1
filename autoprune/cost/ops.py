"""Multiplications and elementwise work that no Conv / Linear / MatMul module accounts for, seen at the
dispatch level (a ``TorchDispatchMode``), so a user's functional code (``q @ k.transpose(-2, -1)``,
``torch.einsum``, ``F.scaled_dot_product_attention``, ``F.linear(x, self.w)``) is counted too.

Each op is charged to the innermost module whose forward issued it and named ``<module>.<op>`` (``.1``,
``.2`` ... for the next ones in the same module). Ops issued inside a module the cost model counts on its own
(Conv, Linear, MatMul, Embedding) are skipped: they are already its rows. MACs come from PyTorch's flop
formulas (``torch.utils.flop_counter``: flops = 2 x MACs); scaled-dot-product attention, whose CPU kernel that
table lacks, is counted here as Q K^T plus A V. An op that reads a parameter and is neither counted nor known
to multiply nothing is *uncounted*: listed by module name, never dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten

ELEMENTWISE = {
    "native_layer_norm": "layer_norm", "native_group_norm": "group_norm", "_fused_rms_norm": "rms_norm",
    "rms_norm": "rms_norm", "_native_batch_norm_legit_no_training": "batch_norm", "_native_batch_norm_legit": "batch_norm",
    "native_batch_norm": "batch_norm", "_softmax": "softmax", "_log_softmax": "log_softmax", "gelu": "gelu",
    "silu": "silu", "hardswish": "hardswish", "sigmoid": "sigmoid", "tanh": "tanh",
}
"""Normalizations and nonlinearities listed with their element counts (no MACs)."""

# Ops that read a parameter without multiplying it by anything: a class token concatenated, a positional
# embedding added, a scale applied elementwise. Their parameters are memory, not MACs.
_NO_PRODUCT = {
    "add", "sub", "mul", "div", "cat", "stack", "expand", "view", "_unsafe_view", "reshape", "t", "transpose",
    "permute", "unsqueeze", "squeeze", "select", "slice", "index", "index_select", "embedding", "clone", "copy_",
    "detach", "alias", "_to_copy", "contiguous", "repeat", "flatten", "split", "split_with_sizes", "chunk",
    "unbind", "where", "masked_fill", "addcmul", "lerp", "fill_", "zero_", "neg", "exp", "pow", "rsqrt", "sqrt",
    "mean", "sum", "as_strided", "new_zeros", "zeros_like", "ones_like", "empty_like", "lift_fresh", "_reshape_alias",
    "expand_as", "view_as", "clamp", "abs", "max", "min", "amax", "amin", "gather", "roll", "constant_pad_nd",
}


@dataclass(frozen=True)
class OpCost:
    """A multiplication counted at the dispatch level: float operands, no weights of its own to read."""

    name: str
    op: str
    macs: float
    in_elements: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ElementCount:
    """A normalization or nonlinearity (or a parameter only added or concatenated): listed, no MACs."""

    name: str
    op: str
    elements: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Uncounted:
    """Something that multiplies which the cost model cannot count: named so it is never silently dropped."""

    name: str
    what: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sdpa_macs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Q K^T plus A V of one scaled-dot-product attention: (..., L, E) x (..., S, E), (..., S, Ev)."""
    rows = q.shape[:-1].numel()
    return rows * k.shape[-2] * (q.shape[-1] + v.shape[-1])


@dataclass
class OpRecorder(TorchDispatchMode):
    """Records, during one traced forward, the ops issued outside the counted modules.

    ``stack`` holds the names of the modules whose forward is running (pushed and popped by hooks the
    tracer installs); ``skip`` the names of modules counted on their own; ``params`` the parameters' storages.
    """

    params: dict[int, str] = field(default_factory=dict)
    skip: set[str] = field(default_factory=set)
    stack: list[str] = field(default_factory=list)
    ops: list[OpCost] = field(default_factory=list)
    # (module, op) -> elements over every call: a recurrent layer's gates add up over its steps
    element_counts: dict[tuple[str, str], int] = field(default_factory=dict)
    uncounted: list[Uncounted] = field(default_factory=list)
    passive_params: set[str] = field(default_factory=set)
    _names: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def elements(self) -> list[ElementCount]:
        return [ElementCount(f"{module}.{op}" if module else op, op, n) for (module, op), n in self.element_counts.items()]

    def enter(self, module: str) -> None:
        self.stack.append(module)

    def leave(self) -> None:
        self.stack.pop()

    def _name(self, module: str, op: str) -> str:
        base = f"{module}.{op}" if module else op
        index = self._names[base]
        self._names[base] += 1
        return base if index == 0 else f"{base}.{index}"

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        module = self.stack[-1] if self.stack else ""
        if module in self.skip:
            return out
        packet = func._overloadpacket
        op = packet.__name__
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        read = sorted({self.params[t.untyped_storage().data_ptr()] for t in tensors if t.untyped_storage().data_ptr() in self.params})
        in_elements = sum(t.numel() for t in tensors)
        if packet in flop_registry:
            macs = flop_registry[packet](*args, **kwargs, out_val=out) / 2
            self.ops.append(OpCost(self._name(module, op), op, float(macs), in_elements))
        elif op.startswith("_scaled_dot_product") and "backward" not in op:
            self.ops.append(OpCost(self._name(module, "scaled_dot_product_attention"), op, float(sdpa_macs(*args[:3])), in_elements))
        elif op in ELEMENTWISE:
            first = out[0] if isinstance(out, (tuple, list)) else out
            key = (module, ELEMENTWISE[op])
            self.element_counts[key] = self.element_counts.get(key, 0) + first.numel()
        elif read and (op in _NO_PRODUCT or op.rstrip("_") in _NO_PRODUCT):
            self.passive_params.update(read)
        elif read:
            self.uncounted.append(Uncounted(self._name(module, op), f"aten.{op} on {', '.join(read)}", "an op on parameters the cost model has no formula for"))
        return out
