"""A user's trained weights, read without unpickling anything: safetensors, or a state dict via weights_only."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from autoprune.errors import AutopruneError


def read_state_dict(path: str | Path, *, field: str = "--weights") -> dict[str, torch.Tensor]:
    """Tensors by name from a ``.safetensors`` file or a ``torch.save``d state dict (``weights_only=True``).

    A checkpoint that wraps the state dict (``{"state_dict": ...}`` or ``{"model": ...}``) is unwrapped; any
    object that is not plain tensors and containers is refused by torch, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise AutopruneError(field, str(path), "is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise AutopruneError(field, str(path), f"is not a readable safetensors file ({_first_line(exc)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, a refused global, a truncated zip: all mean the same to the user
        raise AutopruneError(field, str(path), f"is not a safetensors file nor a state dict torch loads with weights_only=True ({_first_line(exc)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AutopruneError(field, str(path), "holds no state dict (a mapping of names to tensors)")
    return state


def load_weights(model: nn.Module, path: str | Path, *, field: str = "--weights") -> nn.Module:
    """Load ``path`` into ``model`` strictly: a missing or unexpected key or a shape mismatch is one line.

    A model with attention or recurrent layers takes a file of its own layers' keys (``in_proj_weight``,
    ``weight_ih_l0``) or of their Linear-layer equivalents' (what autoprune saves); it comes back converted
    (``autoprune.models.convert``) either way: use the returned model.
    """
    from autoprune.models.convert import convert_model, needs_conversion

    state = read_state_dict(path, field=field)
    if needs_conversion(model):
        if set(state) == set(model.state_dict()):
            return convert_model(_load(model, state, path, field))
        model = convert_model(model)
    return _load(model, state, path, field)


def _load(model: nn.Module, state: dict, path: str | Path, field: str) -> nn.Module:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise AutopruneError(field, str(path), f"does not fit the model: keys {detail}")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        raise AutopruneError(field, str(path), f"does not fit the model: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model {tuple(own[wrong[0]].shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]
