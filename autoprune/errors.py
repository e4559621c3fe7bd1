"""The one error type users see: it names the field, the bad value and the rule it broke."""

from __future__ import annotations

from typing import Any


class AutopruneError(Exception):
    """Bad input. The CLI prints `error: <message>` on one line and exits with status 2."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        super().__init__(f"{field}: {value!r} {rule}")


class UnsupportedLayerError(AutopruneError):
    """A module type that autoprune cannot compress, reported by its module name."""
