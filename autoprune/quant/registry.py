"""Config class -> quantizer class tables behind ``policy.quantizer`` and ``policy.act_quantizer``.

A quantizer class registers itself as the handler of one config class (``autoprune.operators``); building
a quantizer looks the handler up by the config's type, never by comparing names.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from autoprune.errors import AutopruneError
from autoprune.operators import OperatorConfig, parse_config

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Quantizer classes registered per config class; ``family`` is the policy field that configures them."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._classes: dict[type[OperatorConfig], T] = {}

    def register(self, config: type[OperatorConfig]) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if config in self._classes:
                raise AutopruneError(f"policy.{self.family}", config.__name__, f"already has a handler ({self._classes[config].__qualname__})")
            self._classes[config] = cls
            cls.config_class = config
            return cls

        return add

    def config(self, value: OperatorConfig | str | Any) -> OperatorConfig:
        """A config of this family from a config, a bare kind or a mapping."""
        return parse_config(self.family, value)

    def lookup(self, config: OperatorConfig | str | Any) -> T:
        config = self.config(config)
        if type(config) not in self._classes:
            raise AutopruneError(f"policy.{self.family}", config.kind, "has no registered quantizer")
        return self._classes[type(config)]

    def create(self, config: OperatorConfig | str | Any, **options: Any) -> Any:
        """A new quantizer for ``config`` (options: ``bits``, ``delay``, handled by the quantizer class)."""
        config = self.config(config)
        return self.lookup(config).from_config(config, **options)

    def kind_of(self, cls: type) -> str:
        for config, registered in self._classes.items():
            if registered is cls:
                return config.model_fields["kind"].default
        raise AutopruneError(f"policy.{self.family}", cls.__qualname__, "is not a registered quantizer class")
