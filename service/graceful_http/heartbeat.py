"""Is a worker's event loop running? (`--worker-timeout`)

The main sends each serving worker `ping` over their channel; a task of the
worker's event loop reads it and answers `pong`, so an answer proves that the
loop turns, not merely that the process lives. A worker whose loop has not
answered for the timeout is stuck (typically the app called something
blocking from a coroutine): the main sends it STACK_DUMP_SIGNAL, on which
the worker's faulthandler -- which runs in C, outside the blocked loop --
writes the Python stack of every thread to its stderr (the journal, under
systemd), so the admin sees the blocking call. The main then starts a
replacement and kills the stuck worker once that one serves.
"""

from __future__ import annotations

import faulthandler
import signal
import sys

STACK_DUMP_SIGNAL = signal.SIGUSR1
MAX_PING_INTERVAL = 1.0


def ping_interval(timeout: float) -> float:
    """How often to ping: often enough that a stuck loop is noticed well within the timeout."""
    return min(MAX_PING_INTERVAL, timeout / 4)


def silent_for(answered_at: float, now: float, timeout: float) -> float | None:
    """How long a worker whose loop last answered at `answered_at` has been silent, if that makes it stuck."""
    silence = now - answered_at
    return silence if timeout and silence >= timeout else None


def enable_stack_dumps(file=None) -> None:
    """In a worker: write every thread's stack to `file` (stderr) on STACK_DUMP_SIGNAL, even with the loop blocked."""
    faulthandler.register(STACK_DUMP_SIGNAL, file=file or sys.stderr, all_threads=True, chain=False)
