"""Whether a process of this host is still alive: what lets one process clean up after another that died
(a trial it left RUNNING, a scratch file it left half-built), and leave alone what a live one will finish."""

from __future__ import annotations

import _thread
import os
import socket
import threading
import time
from pathlib import Path


def this_process() -> str:
    """``host:pid``, the name a trial's record gives the process that owns it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process named ``host:pid`` still runs; None where this host cannot tell (another host's)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return alive(int(pid))


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


# how often a worker whose parent ended interrupts itself again until it has stopped
REPEAT_SECONDS = 2.0


def watch_parent(parent: int, *, every: float = 1.0, grace: float = 30.0) -> threading.Thread:
    """End this process when ``parent`` ends (a worker of ``search --jobs N`` whose search was killed, even by
    SIGKILL, which leaves no chance to stop its workers): the main thread gets a KeyboardInterrupt, as from
    Ctrl-C, so the trial it runs is failed as interrupted and the process exits; one that does not exit
    within ``grace`` seconds (stuck outside Python) is ended outright."""

    def watch() -> None:
        while os.getppid() == parent and alive(parent):
            time.sleep(every)
        # again every few seconds: an interrupt that lands where it is swallowed (a callback, a cleanup) is
        # not the last one
        for _ in range(max(1, int(grace / REPEAT_SECONDS))):
            _thread.interrupt_main()
            time.sleep(REPEAT_SECONDS)
        os._exit(130)

    thread = threading.Thread(target=watch, name="autoprune-parent-watch", daemon=True)
    thread.start()
    return thread


__all__ = ["alive", "owner_alive", "this_process", "watch_parent"]
