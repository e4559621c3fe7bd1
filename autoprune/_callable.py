"""A package that is also a function of the API: ``autoprune.search(task)`` and ``autoprune.cost(model, ...)``.

Importing ``autoprune.search.runner`` binds the attribute ``autoprune.search`` to the package, whatever the
API put there; so the package itself is made callable, forwarding to the API function it names.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class CallablePackage(types.ModuleType):
    __api__: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, _, name = self.__api__.partition(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


def make_callable(package: str, target: str) -> None:
    """Let the package ``package`` be called as ``target`` (``module:function``)."""
    module = sys.modules[package]
    module.__class__ = CallablePackage
    module.__api__ = target  # type: ignore[attr-defined]
