"""Operators: the small typed configs of the weight quantizer, activation quantizer and pruner, and the one
registry of the transforms that handle them.

Torch-free on purpose: a Policy validates its operator fields against these classes, and ``import
autoprune.policy`` must not pull torch. A config class is registered in its family (``register_config``), and
the transform that handles it (a quantizer class, a pruner function) is registered for the config class in the
same registry (``WEIGHT_QUANTIZERS.register(Midrise)``, in ``autoprune.quant.weight``, ``autoprune.quant.act``,
``autoprune.prune.structured``); the config itself is only data. A policy field accepts a config, its bare kind
(``"midrise"``) or a mapping with a ``kind``; the serialised form is always the mapping.

Adding an operator touches one module: its config class (decorated with its family) and its handler, beside
each other. A weight quantizer whose levels are new declares them too (``WeightQuantizer.grid_for``, a
``autoprune.quant.grids.Grid``), which is all the cost model and the exporters ask of it.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, ClassVar, Generic, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoprune.errors import AutopruneError

WEIGHT_QUANTIZER = "quantizer"
ACT_QUANTIZER = "act_quantizer"
PRUNER = "pruner"

_CONFIGS: dict[str, dict[str, type["OperatorConfig"]]] = {WEIGHT_QUANTIZER: {}, ACT_QUANTIZER: {}, PRUNER: {}}

C = TypeVar("C", bound=type["OperatorConfig"])


class OperatorConfig(BaseModel):
    """Base of every operator config: frozen data whose ``kind`` names the registered operator."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def label(self) -> str:
        """A short stable name: the kind, with the fields that differ from their defaults."""
        extra = {k: v for k, v in self.model_dump().items() if k != "kind" and v != type(self).model_fields[k].default}
        return self.kind + ("(" + ",".join(f"{k}={v}" for k, v in sorted(extra.items())) + ")" if extra else "")


def register_config(family: str) -> Callable[[C], C]:
    """Class decorator: make a config class the one ``kind`` names in ``family`` (a policy field)."""

    def add(cls: C) -> C:
        kind = cls.model_fields["kind"].default
        if kind in _CONFIGS[family]:
            raise AutopruneError(f"policy.{family}", kind, "is already registered")
        _CONFIGS[family][kind] = cls
        return cls

    return add


def kinds(family: str) -> tuple[str, ...]:
    return tuple(_CONFIGS[family])


H = TypeVar("H")
# config class -> the transform handling it, for every family: the one operator registry
_HANDLERS: dict[type["OperatorConfig"], Any] = {}


class Family(Generic[H]):
    """The operators of one policy field (``quantizer``, ``act_quantizer``, ``pruner``) in the one registry."""

    def __init__(self, family: str) -> None:
        self.family = family

    def register(self, config: type["OperatorConfig"]) -> Callable[[H], H]:
        """Decorator: make a transform the handler of a config class of this family."""

        def add(handler: H) -> H:
            if config not in _CONFIGS[self.family].values():
                raise AutopruneError(f"policy.{self.family}", config.__name__, f"is not a {self.family} config (register_config({self.family!r}) first)")
            if config in _HANDLERS:
                raise AutopruneError(f"policy.{self.family}", config.__name__, f"already has a handler ({_HANDLERS[config]!r})")
            _HANDLERS[config] = handler
            if isinstance(handler, type):
                handler.config_class = config  # type: ignore[attr-defined]
            return handler

        return add

    def config(self, value: Any) -> "OperatorConfig":
        """A config of this family from a config, a bare kind or a mapping."""
        return parse_config(self.family, value)

    def lookup(self, value: Any) -> H:
        config = self.config(value)
        handler = _HANDLERS.get(type(config))
        if handler is None:
            raise AutopruneError(f"policy.{self.family}", config.kind, f"has no registered handler (registered: {', '.join(self.kinds())})")
        return handler

    def create(self, value: Any, **options: Any) -> Any:
        """A new instance of the handler class for ``value`` (options such as ``bits`` go to its ``from_config``)."""
        config = self.config(value)
        return self.lookup(config).from_config(config, **options)  # type: ignore[attr-defined]

    def kind_of(self, handler: Any) -> str:
        for config, registered in _HANDLERS.items():
            if registered is handler and config in _CONFIGS[self.family].values():
                return config.model_fields["kind"].default
        raise AutopruneError(f"policy.{self.family}", getattr(handler, "__qualname__", handler), "is not a registered handler")

    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, config in _CONFIGS[self.family].items() if config in _HANDLERS)


def parse_config(family: str, value: Any) -> "OperatorConfig":
    """A config of ``family`` from a config, a bare kind or a mapping with ``kind``; AutopruneError otherwise."""
    if isinstance(value, OperatorConfig):
        if type(value) not in _CONFIGS[family].values():
            raise AutopruneError(f"policy.{family}", value.kind, f"is not a {family} config (kinds: {', '.join(kinds(family))})")
        return value
    data = {"kind": value} if isinstance(value, str) else value
    if not isinstance(data, Mapping) or "kind" not in data:
        raise AutopruneError(f"policy.{family}", value, "must be a kind or a mapping with a kind")
    cls = _CONFIGS[family].get(data["kind"])
    if cls is None:
        raise AutopruneError(f"policy.{family}", data["kind"], f"is not registered (registered: {', '.join(kinds(family))})")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "extra_forbidden":
            raise AutopruneError(f"policy.{family}.{where}", where.rsplit(".", 1)[-1], "is not a known field") from None
        raise AutopruneError(f"policy.{family}.{where}", err.get("input"), err.get("msg", "is invalid")) from None


WEIGHT_QUANTIZERS: Family[Any] = Family(WEIGHT_QUANTIZER)
ACT_QUANTIZERS: Family[Any] = Family(ACT_QUANTIZER)
PRUNERS: Family[Any] = Family(PRUNER)


# Seed 004's settings, the same rule wherever a weight or an activation config has them.
Delay = Annotated[int, Field(ge=0, description="t_q, in steps after quantization is introduced")]
Quantile = Annotated[float, Field(gt=0.5, le=1.0, description="the quantile of |x| the range saturates at")]


# --- weight quantizers ----------------------------------------------------------------------------


class WeightQuantizerConfig(OperatorConfig):
    per_channel: bool = Field(False, description="one step per output channel instead of one per tensor")


@register_config(WEIGHT_QUANTIZER)
class Midrise(WeightQuantizerConfig):
    """Seed 000 App. A: the cost model's own mid-rise levels, step max|W| / 2^(b-1)."""

    kind: Literal["midrise"] = "midrise"


@register_config(WEIGHT_QUANTIZER)
class ClipUniform(WeightQuantizerConfig):
    """Seed 003 eq. 20-21 on [-max|W|, max|W|]."""

    kind: Literal["clip_uniform"] = "clip_uniform"


@register_config(WEIGHT_QUANTIZER)
class Delayed(WeightQuantizerConfig):
    """Seed 004 eq. 5: float until ``delay`` steps after quantization is introduced, then an MSE-optimal step."""

    kind: Literal["delayed"] = "delayed"
    delay: Delay = 0


@register_config(WEIGHT_QUANTIZER)
class Saturated(WeightQuantizerConfig):
    """Seed 004 eq. 6-7: delayed, with the MSE target saturated at the ``quantile`` of |W|."""

    kind: Literal["saturated"] = "saturated"
    delay: Delay = 0
    quantile: Quantile = 0.999


# --- activation quantizers ------------------------------------------------------------------------


class ActQuantizerConfig(OperatorConfig):
    pass


@register_config(ACT_QUANTIZER)
class ClipUniformAct(ActQuantizerConfig):
    """Seed 003 eq. 20-21 on the range observed on calibration batches."""

    kind: Literal["clip_uniform"] = "clip_uniform"


@register_config(ACT_QUANTIZER)
class DelayedAct(ActQuantizerConfig):
    """Seed 004 eq. 5 on features: identity until ``delay``, range fixed on the batch of step t_q."""

    kind: Literal["delayed"] = "delayed"
    delay: Delay = 0


@register_config(ACT_QUANTIZER)
class SaturatedAct(ActQuantizerConfig):
    """Seed 004 eq. 6-7 on features."""

    kind: Literal["saturated"] = "saturated"
    delay: Delay = 0
    quantile: Quantile = 0.999


# --- structured pruners ---------------------------------------------------------------------------


class PrunerConfig(OperatorConfig):
    takes_keep_ratios: ClassVar[bool] = False
    """Whether the policy's keep ratios apply; a pruner that chooses channels itself refuses them."""
    chooses_channels: ClassVar[bool] = False
    """Whether the pruner removes channels with every keep ratio at 1."""


@register_config(PRUNER)
class SignalNorm(PrunerConfig):
    """Seed 000 sec. 3: keep the channels of largest signal norm, at the policy's keep ratios."""

    kind: Literal["signal_norm"] = "signal_norm"
    takes_keep_ratios: ClassVar[bool] = True


@register_config(PRUNER)
class PfQ(PrunerConfig):
    """Seed 003: remove channels whose BN running variance is below ``eps`` (eq. 17; the paper's 1e-5)."""

    kind: Literal["pfq"] = "pfq"
    eps: float = Field(1e-5, gt=0.0, description="BN running-variance threshold (eq. 17)")
    chooses_channels: ClassVar[bool] = True


@register_config(PRUNER)
class NoPruning(PrunerConfig):
    """No structured pruning at all."""

    kind: Literal["none"] = "none"
