"""The user's own code, called by reference (``package.module:function``): a task or model factory.

When it fails, the user needs to know which of *their* functions failed and with what, not autoprune's
traceback: ``UserCodeError`` names the reference (the field that gave it) and carries the user's exception
and the innermost frame of the user's own files (neither autoprune's, nor Python's, nor an installed
package's), which the CLI prints as a second line.
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Any, Callable

from autoprune.errors import AutopruneError

_PACKAGE = Path(__file__).resolve().parent


def _not_users() -> tuple[str, ...]:
    """Folders whose files are not the user's: autoprune's, the standard library's and installed packages'."""
    paths = {str(_PACKAGE)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            paths.add(str(Path(path).resolve()))
    return tuple(p.rstrip(os.sep) + os.sep for p in paths)


def own_frame(exc: BaseException) -> str | None:
    """``file:line in function`` of the innermost frame of the exception's traceback in the user's files."""
    skipped = _not_users()
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    for frame in reversed(frames):
        path = str(Path(frame.filename).resolve()) if not frame.filename.startswith("<") else frame.filename
        if frame.filename.startswith("<") or path.startswith(skipped):
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return None


class UserCodeError(AutopruneError):
    """The user's function ``value`` (given as ``field``) raised: one line with its exception, and the
    innermost frame of the user's own files in ``frame``."""

    def __init__(self, field: str, value: Any, exc: BaseException, *, doing: str = "raised") -> None:
        reason = (str(exc).strip().splitlines() or [""])[0]
        super().__init__(field, value, f"{doing} {type(exc).__name__}" + (f": {reason}" if reason else ""))
        self.frame = own_frame(exc)


def importable_from_working_directory() -> None:
    """Modules of the working directory import, as under ``python -m``: the directory goes first on ``sys.path``.

    The ``autoprune`` console script, unlike ``python -m``, puts only its own folder on ``sys.path``.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()


def _share_with_workers(module: Any) -> None:
    """A module imported from the working directory goes on ``PYTHONPATH``, which the worker processes started
    from here inherit (``search --jobs``, a local Ray: its trials run in folders of their own)."""
    cwd = os.getcwd()
    origin = getattr(module, "__file__", None)
    if origin is None or not str(Path(origin).resolve()).startswith(str(Path(cwd).resolve()) + os.sep):
        return
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in inherited:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *inherited])


def load_reference(reference: str, *, field: str) -> Any:
    """The object a ``package.module:attribute`` reference names, imported now, from the working directory
    too. A module that fails to import (a missing package, a syntax error, code that raises at import) is
    named with what it raised."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise AutopruneError(field, reference, "is not of the form package.module:function")
    importable_from_working_directory()
    if module_name.split(".")[0] == "torchvision":
        from autoprune.deps import import_torchvision

        import_torchvision(field=field, value=reference)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if getattr(exc, "name", None) and module_name.startswith(str(exc.name)):
            raise AutopruneError(field, reference, f"cannot be imported ({exc})") from None
        raise UserCodeError(field, reference, exc, doing="cannot be imported: its module raised") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module at import is theirs
        raise UserCodeError(field, reference, exc, doing="cannot be imported: its module raised") from None
    _share_with_workers(module)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AutopruneError(field, reference, f"names nothing: {module_name} has no {attr!r}") from None


def call_user(field: str, reference: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the user's ``function`` (named ``reference``, given as ``field``); what it raises becomes one
    UserCodeError. An AutopruneError it raises (a Task.from_model argument refused) passes as it is."""
    if not callable(function):
        kind = type(function).__name__
        raise AutopruneError(field, reference, f"names {'an' if kind[:1] in 'aeiou' else 'a'} {kind}, not a function")
    try:
        return function(*args, **kwargs)
    except AutopruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise UserCodeError(field, reference, exc).with_traceback(None) from None


def reference_of(function: Callable[..., Any]) -> str:
    """``module:qualname`` of a function the user handed over (a metric, a loss), for its error line."""
    module = getattr(function, "__module__", None) or "?"
    return f"{module}:{getattr(function, '__qualname__', type(function).__name__)}"


__all__ = ["UserCodeError", "importable_from_working_directory", "load_reference", "call_user", "own_frame", "reference_of"]
