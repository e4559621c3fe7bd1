"""Validated arguments: pydantic models whose every failure is one ``AutopruneError`` naming the field.

The Python API and the CLI share these models: the CLI parses its flags into them (and shows a field by its
flag), the API builds them from keyword arguments. A wrong type is refused, not converted: ``trials="3"`` or
``trials=1.5`` names ``trials`` and its value instead of running a search of an unexpected size.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import re
from collections.abc import Sequence
from typing import Annotated, Any, Callable, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

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
    if err.get("type") == "string_too_short" and (err.get("ctx") or {}).get("min_length") == 1:
        rule = "must not be empty (leave it out for the default)"
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


def _study_name(name: str) -> str:
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise ValueError("must be a name with no path separator (it names the study's folders and MLflow experiment)")
    return name


def _registry_name(name: str) -> str:
    # MLflow's own rule (mlflow.utils.validation._validate_model_name), checked before any export work
    if not name.strip() or any(c in name for c in "/:") or name.startswith(".."):
        raise ValueError("must be a Model Registry name: not blank, without '/' or ':', not starting with '..'")
    return name


StudyName = Annotated[str, AfterValidator(_study_name)]
"""A study's name: it names its folders and its MLflow experiment, so no path separator, no ``..``."""
RegistryName = Annotated[str, AfterValidator(_registry_name)]
"""A name of the MLflow Model Registry."""
def _whole(value: Any) -> Any:
    """A whole number of any integer type (numpy's, torch's) as a Python int; anything else as it is, for the
    strict check to refuse (a string, a fraction, a bool)."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def _real(value: Any) -> Any:
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


def _sizes(value: Any) -> Any:
    """Sizes given as any sequence of whole numbers (a torch.Size, a numpy shape) as a tuple of ints."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return value
    return tuple(_whole(v) for v in value)


Text = Annotated[str, Field(min_length=1)]
"""A name or URL that must say something: an empty one would silently mean the default."""
PositiveInt = Annotated[int, BeforeValidator(_whole), Field(ge=1)]
NaturalInt = Annotated[int, BeforeValidator(_whole), Field(ge=0)]
PositiveFloat = Annotated[float, BeforeValidator(_real), Field(gt=0, allow_inf_nan=False)]
NaturalFloat = Annotated[float, BeforeValidator(_real), Field(ge=0, allow_inf_nan=False)]
Share = Annotated[float, BeforeValidator(_real), Field(gt=0, lt=1)]
Port = Annotated[int, BeforeValidator(_whole), Field(ge=1, le=65535)]
Sizes = Annotated[tuple[int, ...], BeforeValidator(_sizes)]
"""Sizes of one sample (``(3, 32, 32)``, a ``torch.Size``)."""

F = TypeVar("F", bound=Callable[..., Any])
_STRICT = ConfigDict(strict=True, arbitrary_types_allowed=True, extra="forbid")


def _annotation(parameter: inspect.Parameter, namespace: dict[str, Any]) -> Any:
    """A parameter's annotation as a type; one only type checkers know (imported under TYPE_CHECKING) is
    left unchecked here: the function checks such an argument itself."""
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return Any
    if isinstance(annotation, str):
        try:
            return eval(annotation, namespace)  # noqa: S307 - the function's own annotation, as typing.get_type_hints does
        except NameError:
            return Any
    return annotation


def _arguments_model(function: Callable[..., Any], signature: inspect.Signature) -> type[BaseModel]:
    # fields under their own names would shadow BaseModel's attributes (an argument named ``register``, ``copy``):
    # each is aliased by the argument's name, which is also how its errors name it
    fields = {
        f"argument_{name}": (_annotation(p, dict(function.__globals__)), Field(... if p.default is inspect.Parameter.empty else p.default, alias=name))
        for name, p in signature.parameters.items()
    }
    return create_model(f"{function.__name__}_arguments", __config__=_STRICT, **fields)  # type: ignore[call-overload]


def _call_error(exc: ValidationError, signature: inspect.Signature) -> AutopruneError:
    """A refused argument as one line: its name, its value, and its rule (for a union, the annotation)."""
    errors = exc.errors()
    first = errors[0].get("loc", ("arguments",))[0]
    same = [e for e in errors if e.get("loc", ())[:1] == (first,)]
    parameter = signature.parameters.get(str(first))
    if len(same) > 1 and parameter is not None and parameter.annotation is not inspect.Parameter.empty:
        # one error per member of a union: the annotation, as the signature writes it, says it best
        annotation = parameter.annotation if isinstance(parameter.annotation, str) else inspect.formatannotation(parameter.annotation)
        return AutopruneError(str(first), same[0].get("input"), f"must be {annotation}")
    return first_error(exc)


def validated(function: F) -> F:
    """An API function whose arguments are checked against its own signature before it runs: the types and
    constraints its annotations give (``trials: PositiveInt``), strictly (``trials="3"`` is refused, not
    converted), and unknown or missing arguments; any refusal is one AutopruneError naming the argument.
    The CLI parses its flags into these same arguments, so both meet the same checks."""
    signature = inspect.signature(function)
    model: list[type[BaseModel]] = []  # built on the first call, when every annotation's module is importable

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise _binding_error(exc, signature, function.__name__, kwargs) from None
        if not model:
            model.append(_arguments_model(function, signature))
        try:
            checked = model[0].model_validate(bound.arguments)
        except ValidationError as exc:
            raise _call_error(exc, signature) from None
        # the values as checked: sizes given as a torch.Size arrive as a tuple, a numpy integer as an int
        return function(**{name: getattr(checked, f"argument_{name}") for name in bound.arguments})

    return call  # type: ignore[return-value]


def _binding_error(exc: TypeError, signature: inspect.Signature, name: str, kwargs: dict[str, Any]) -> AutopruneError:
    unknown = [k for k in kwargs if k not in signature.parameters]
    if unknown:
        return AutopruneError(unknown[0], kwargs[unknown[0]], f"is not an argument of {name} (arguments: {', '.join(signature.parameters)})")
    text = str(exc)
    named = re.findall(r"'(\w+)'", text)
    if "missing" in text and named:
        return AutopruneError(named[0], None, f"is required by {name}")
    return AutopruneError("arguments", f"{len(signature.parameters)} parameters", f"do not fit {name}: {text.split(': ', 1)[-1]} (give them by keyword)")


__all__ = [
    "Validated", "first_error", "validated", "StudyName", "RegistryName", "Text", "PositiveInt", "NaturalInt", "PositiveFloat", "NaturalFloat", "Share", "Port", "Sizes",
]
