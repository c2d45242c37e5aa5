"""Balanced workers, the pure part: may this worker accept the next connection, given what every accepting
worker of its generation holds?

The workers share one listening socket. Left to the event loop, whichever worker the kernel wakes first
accepts the whole backlog in one go (asyncio and uvloop both drain it per wake-up): a burst of 50 new
connections can land 50/0. So each worker accepts one connection at a time, and only while it holds no more
than its fair share of the generation's open connections (plus `slack`); above it, it leaves the backlog to
its siblings, which the kernel wakes too. A sibling that does not take them (its event loop is busy, or
stuck) must not leave clients waiting: once the others' counts have not moved for `patience` seconds, the
worker accepts anyway, until they move again.
"""

from __future__ import annotations

SLACK = 1  # connections a worker may hold beyond an even split: fewer hand-overs between siblings in a burst
PATIENCE = 0.1  # seconds a connection may wait for a sibling that takes nothing, before this worker takes it


def fair_share(total: int, workers: int) -> int:
    """The most connections any of `workers` holds when `total` are spread as evenly as they can be."""
    return -(-total // workers)


class AcceptGate:
    """One worker's rule; `now` is a monotonic clock reading (seconds)."""

    def __init__(self, slack: int = SLACK, patience: float = PATIENCE):
        self.slack = slack
        self.patience = patience
        self.waiting_since: float | None = None  # when this worker last held back with the others as they are
        self._others_then: tuple[int, ...] = ()

    def may_accept(self, own: int, others: tuple[int, ...], now: float) -> bool:
        """`own`: connections this worker holds; `others`: what each other accepting worker holds."""
        if own < fair_share(own + sum(others) + 1, len(others) + 1) + self.slack:
            self.waiting_since = None
            return True
        if self.waiting_since is None or others != self._others_then:  # they are taking connections: wait for them
            self.waiting_since, self._others_then = now, others
            return False
        return now - self.waiting_since >= self.patience
