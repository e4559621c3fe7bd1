"""The one error type users see: it names the field, the bad value and the rule it broke."""

from __future__ import annotations

from typing import Any

# An error is one line a user reads: a value or a rule longer than this is cut (a YAML alias bomb's value
# once made an error line of 322 MB).
MAX_VALUE_CHARS = 200
MAX_RULE_CHARS = 600


def shorten(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters with the length it had."""
    flat = " ".join(text.split()) if ("\n" in text or "\r" in text) else text
    if len(flat) <= limit:
        return flat
    return f"{flat[:limit]}... ({len(flat)} characters)"


def shown(value: Any) -> str:
    """How an error line shows a value: its repr, on one line, cut to MAX_VALUE_CHARS."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a user object whose repr fails is still named by its type
        text = f"<{type(value).__name__}>"
    return shorten(text, MAX_VALUE_CHARS)


class AutopruneError(Exception):
    """Bad input. The CLI prints `error: <message>` on one line and exits with status 2."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        super().__init__(self.line())

    def line(self) -> str:
        """``field: value rule``, one line whatever the value and the rule hold."""
        return f"{self.field}: {shown(self.value)} {shorten(str(self.rule), MAX_RULE_CHARS)}"

    def __str__(self) -> str:
        # the CLI renames the field to its flag after the error was raised
        return self.line()

    def __reduce__(self) -> tuple[Any, ...]:
        # raised in a worker process, it crosses back pickled: rebuilt from its three parts, not from its line
        return (type(self), (self.field, self.value, self.rule))


class FaultError(Exception):
    """Not the input but the machine or a store failed (a full disk, a store that refused a write, a damaged
    database): the CLI prints `error: <message>` on one line, and what survived, and exits with status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(shorten(message, MAX_RULE_CHARS))


def disk_full(exc: BaseException) -> str | None:
    """What says the disk (or the user's quota) is full, when the exception or one it was raised from does: an
    OSError of ENOSPC or EDQUOT, or a database reporting it (SQLite: "database or disk is full"); else None."""
    import errno

    seen: BaseException | None = exc
    for _ in range(20):  # a chain is short; a cycle in it must not hang the error path
        if seen is None:
            return None
        text = str(seen)
        lowered = text.lower()
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT) or any(
            words in lowered for words in ("disk is full", "no space left on device", "disk quota exceeded")
        ):
            # the driver's own words, without SQLAlchemy's statement and parameters
            return shorten((text.strip().splitlines() or [type(seen).__name__])[0], 200)
        seen = seen.__cause__ or seen.__context__
    return None


class UnsupportedLayerError(AutopruneError):
    """A module type that autoprune cannot compress, reported by its module name."""
