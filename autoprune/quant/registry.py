"""Name -> class tables behind ``policy.quantizer`` and ``policy.act_quantizer`` (DESIGN decision 2)."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from autoprune.errors import AutopruneError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes registered under names; ``field`` is the policy field that names them, for error messages."""

    def __init__(self, field: str) -> None:
        self.field = field
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if name in self._classes:
                raise AutopruneError(self.field, name, f"is already registered (by {self._classes[name].__qualname__})")
            self._classes[name] = cls
            return cls

        return add

    def lookup(self, name: str) -> T:
        if name not in self._classes:
            raise AutopruneError(self.field, name, f"is not registered (registered: {', '.join(self.names())})")
        return self._classes[name]

    def create(self, name: str, *, bits: int, delay: int = 0, saturation_quantile: float = 0.999) -> Any:
        """A new quantizer by registered name; ``delay`` and ``saturation_quantile`` as in the policy."""
        return self.lookup(name).from_options(bits=bits, delay=delay, saturation_quantile=saturation_quantile)

    def name_of(self, cls: type) -> str:
        for name, registered in self._classes.items():
            if registered is cls:
                return name
        raise AutopruneError(self.field, cls.__qualname__, f"is not a registered class (registered: {', '.join(self.names())})")

    def names(self) -> tuple[str, ...]:
        return tuple(self._classes)
