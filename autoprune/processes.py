"""Whether a process of this host is still alive: what lets one process clean up after another that died
(a trial it left RUNNING, a scratch file it left half-built)."""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int) -> bool:
    """True while process ``pid`` of this host runs; a process of another user counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A dead child its parent has not reaped yet (a worker of `search --jobs`) still takes signals.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:  # no procfs: trust the signal
        return True


__all__ = ["alive"]
