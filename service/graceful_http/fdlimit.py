"""Open-file limits: use the hard limit, and say once per interval when descriptors run out.

Every connection costs a descriptor. systemd (and most shells) start
services with a soft limit of 1024 for the sake of select(), which asyncio
and uvloop do not use: one host holding a thousand idle connections would
lock everyone else out. So a generation raises its soft limit to the hard
one at start (the shipped unit sets the hard limit deliberately).

When descriptors do run out anyway, what is already open keeps being
served, and the log says so once per interval instead of once per failed
accept (asyncio logs a traceback for each, thousands a second; uvloop's
libuv closes the excess connections silently).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time
from collections.abc import Callable

log = logging.getLogger("graceful_http")

REPORT_INTERVAL = 10.0
CHECK_INTERVAL = 1.0
HEADROOM = 32  # descriptors a process needs besides its connections (logs, pipes, app files)
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"  # asyncio's message


_started_with: int | None = None  # the soft limit before raise_soft_limit, for describe_limit


def raise_soft_limit() -> tuple[int, int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; (soft before, soft now, hard)."""
    global _started_with
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    _started_with = soft
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return soft, hard, hard
        except (ValueError, OSError):
            pass
    return soft, soft, hard


def describe_limit() -> str:
    """One line for the start-up log (said once serving, so a failed start stays one line)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _started_with is not None and soft > _started_with:
        return f"open files: soft limit raised from {_started_with} to {soft} (the hard limit)"
    return f"open files: limit {soft} (hard {hard})"


class OncePerInterval:
    """Counts events; says when to report them (the first at once, then at most once per `interval`)."""

    def __init__(self, interval: float = REPORT_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._reported_at: float | None = None
        self._unreported = 0

    def record(self, count: int = 1) -> int:
        """Record `count` events; the number to report now (those since the last report), or 0."""
        self._unreported += count
        now = self.clock()
        if self._reported_at is not None and now - self._reported_at < self.interval:
            return 0
        self._reported_at, due, self._unreported = now, self._unreported, 0
        return due


class DescriptorWatch:
    """One serving process's view of its descriptors: out-of-descriptor accepts, reported once per interval."""

    def __init__(self, connections: Callable[[], int], interval: float = REPORT_INTERVAL):
        self.connections = connections
        self.reports = OncePerInterval(interval)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def handler(loop, context):
            if context.get("message") == ACCEPT_OUT_OF_RESOURCES:
                self._report(1, str(context.get("exception") or "out of resources"))
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        self._task = asyncio.create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        """uvloop sheds connections it cannot accept without telling anyone: notice the limit being reached."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            if self.connections() + HEADROOM < soft:
                continue
            try:
                used = len(os.listdir("/proc/self/fd"))
            except OSError as exc:  # listing needs a descriptor itself
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    continue
                used = soft
            if used >= soft - 2:
                self._report(1, f"{used} of {soft} descriptors open")

    def _report(self, count: int, detail: str) -> None:
        due = self.reports.record(count)
        if due:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning("out of file descriptors (%s; limit %d, hard %d): new connections wait or are refused,"
                        " open ones are still served (%d time(s) since the last report; next report in %gs at"
                        " the earliest)", detail, soft, hard, due, self.reports.interval)
