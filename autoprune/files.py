"""Files autoprune writes: whole or not at all, and refused before any work when they cannot be written."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from autoprune.errors import AutopruneError

CACHE_ENV = "AUTOPRUNE_CACHE"


def cache_root() -> Path:
    """Where base models, learned models, the built-in datasets' arrays and other work worth keeping
    between runs are kept (``AUTOPRUNE_CACHE``, default ``.autoprune/cache``)."""
    return Path(os.environ.get(CACHE_ENV, ".autoprune/cache"))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write (by any writer: safetensors, onnx, open), renamed over
    ``path`` when the block ends, removed when it raises: a reader never sees a half-written file. The
    process id in its name keeps processes that write the same file at once apart."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def check_writable(field: str, path: str | Path) -> None:
    """Refuse an output path that could not be written, before the work whose result it would hold: its
    nearest existing ancestor must be a folder this process may write into."""
    target = Path(path).expanduser().absolute()
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AutopruneError(field, str(path), f"cannot be written: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise AutopruneError(field, str(path), f"cannot be written: the folder {ancestor} is not writable")
