"""The specs shipped with autoprune (``search_spaces/*.yaml``, ``objectives/*.yaml``), package data found
through importlib.resources, so that an installed autoprune finds them from any folder."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from autoprune.errors import AutopruneError

KINDS = {"search_spaces": "--space", "objectives": "--objectives"}


def names(kind: str) -> list[str]:
    """The shipped specs of a kind, by name (``default``, ``uniform``, ...)."""
    folder = resources.files(__name__) / kind
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith((".yaml", ".yml")))


def shipped(kind: str, value: str) -> Path:
    """A spec path as given, or the name of a shipped spec (``default`` -> search_spaces/default.yaml)."""
    path = Path(value)
    if path.is_file():
        return path
    candidate = resources.files(__name__) / kind / (value if value.endswith((".yaml", ".yml")) else f"{value}.yaml")
    if candidate.is_file():
        # a wheel installs package data as plain files, so the resource is a real path
        return Path(str(candidate))
    raise AutopruneError(KINDS[kind], value, f"is neither a file nor a shipped spec ({', '.join(names(kind))})")


__all__ = ["shipped", "names"]
