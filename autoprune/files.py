"""Files autoprune writes: whole or not at all, and refused before any work when they cannot be written.

Every file and folder a command writes goes through ``atomic_path`` or ``atomic_folder``: the content is
written to a hidden sibling named after this host and process, then renamed into place. A process killed
mid-write leaves that sibling behind; the next write of the same path removes the ones whose process is
gone (another host's are left alone: its process ids mean nothing here), and a folder caught between its
old and new version gets its old version back.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

from autoprune.errors import AutopruneError
from autoprune.processes import alive

CACHE_ENV = "AUTOPRUNE_CACHE"
# what marks a folder as autoprune's own export, which a new export may replace
EXPORT_MARKER = "report.json"


def cache_root() -> Path:
    """Where base models, learned models, the built-in datasets' arrays and other work worth keeping
    between runs are kept (``AUTOPRUNE_CACHE``, default ``.autoprune/cache``)."""
    return Path(os.environ.get(CACHE_ENV, ".autoprune/cache"))


def _scratch(path: Path, suffix: str) -> Path:
    """This process's hidden sibling of ``path``: ``.NAME.HOST.PID.SUFFIX``."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(path: str | Path) -> list[Path]:
    """Remove the hidden siblings of ``path`` that processes of this host left when they died mid-write;
    a folder that such a process had moved aside and not yet replaced is put back first. Returns what was
    removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}.{socket.gethostname()}."
    removed = []
    for sibling in sorted(path.parent.glob(f".{glob.escape(path.name)}.*")):
        rest = sibling.name.removeprefix(prefix)
        pid, _, suffix = rest.partition(".")
        if rest == sibling.name or not pid.isdigit() or suffix not in ("tmp", "old") or alive(int(pid)):
            continue
        if suffix == "old" and not path.exists():
            sibling.replace(path)  # killed between moving the old version aside and moving the new one in
            continue
        _remove(sibling)
        removed.append(sibling)
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write (by any writer: safetensors, onnx, open), renamed over
    ``path`` when the block ends, removed when it raises: a reader never sees a half-written file. The
    host and process in its name keep processes that write the same file at once apart."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = _scratch(path, "tmp")
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


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A hidden sibling folder to fill, swapped in for the folder ``path`` when the block ends (the previous
    version is removed only once the new one is in place), removed when it raises: an interrupted write never
    leaves a half-written folder, and never destroys the previous one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    staging, old = _scratch(path, "tmp"), _scratch(path, "old")
    _remove(staging)
    staging.mkdir()
    staging.chmod(0o755)
    try:
        yield staging
        if path.exists():
            path.replace(old)
            staging.replace(path)
            _remove(old)
        else:
            staging.replace(path)
    finally:
        _remove(staging)


def check_writable(field: str, path: str | Path, *, kind: Literal["file", "folder"] = "file", replaces: str | None = None) -> None:
    """Refuse an output path that could not be written, before the work whose result it would hold: its
    nearest existing ancestor must be a folder this process may write into, and what is there already must
    be of the ``kind`` written. A folder output replaces an existing folder only when it is empty or holds
    the file ``replaces`` names (an earlier output of the same kind): a user's own folder is never swapped out."""
    target = Path(path).expanduser().absolute()
    if target.exists() or target.is_symlink():
        if kind == "folder" and not target.is_dir():
            raise AutopruneError(field, str(path), "is a file, not a folder: give a folder to write into (the file is left as it is)")
        if kind == "file" and target.is_dir():
            raise AutopruneError(field, str(path), "is a folder, not a file: give a file name")
        if kind == "folder" and replaces is not None and any(target.iterdir()) and not (target / replaces).is_file():
            raise AutopruneError(field, str(path), f"is a folder of other files (no {replaces}): give a new or empty folder, it would be replaced")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AutopruneError(field, str(path), f"cannot be written: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise AutopruneError(field, str(path), f"cannot be written: the folder {ancestor} is not writable")
