"""Validated arguments: pydantic models whose every failure is one ``AutopruneError`` naming the field.

The Python API and the CLI share these models: the CLI parses its flags into them (and shows a field by its
flag), the API builds them from keyword arguments. A wrong type is refused, not converted: ``trials="3"`` or
``trials=1.5`` names ``trials`` and its value instead of running a search of an unexpected size.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from autoprune.errors import AutopruneError


def first_error(exc: ValidationError, *, prefix: str = "") -> AutopruneError:
    """The first pydantic error as one line: the dotted field, the value given, the rule it broke."""
    err = exc.errors()[0]
    location = ".".join(str(p) for p in err.get("loc", ()))
    field = f"{prefix}.{location}" if prefix and location else prefix or location or "arguments"
    value = err.get("input")
    if err.get("type") == "extra_forbidden":
        return AutopruneError(field, location.rsplit(".", 1)[-1], "is not a known argument")
    rule = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
    rule = rule.replace("Input should be", "must be").replace("Input should", "must")
    if isinstance(value, dict) and err.get("type") == "missing":
        value, rule = None, "is required"
    return AutopruneError(field, value, rule)


class Validated(BaseModel):
    """Frozen arguments that refuse unknown names and wrong types, with one-line errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, arbitrary_types_allowed=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise first_error(exc) from None


__all__ = ["Validated", "first_error"]
