"""Balanced workers, the pure part: may this worker accept the next connection, given what every accepting
worker of its generation holds?

The workers share one listening socket. Left to the event loop, whichever worker the kernel wakes first
accepts the whole backlog in one go (asyncio and uvloop both drain it per wake-up): a burst of 50 new
connections can land 50/0. So each worker accepts one connection at a time, and only while it holds no more
than its fair share of the generation's open connections (plus `slack`); above it, it leaves the backlog to
its siblings, which the kernel wakes too. A sibling that does not take them (its event loop is busy, or
stuck) must not leave clients waiting: once the others' counts have not moved for `patience` seconds, the
worker accepts anyway, until they move again.

Time a sibling spent waiting for a CPU does not count against it: on a loaded machine a sibling can sit in
the run queue for longer than the patience, and a worker that took the backlog then would end far above its
share (bursts split 18/32 were seen). So the patience runs on the time the others could have run (wall time
less the least any of them queued for a CPU meanwhile), and never longer than `longest` of wall time.

A sibling's count is only as fresh as its last look: the connections its clients closed since are still in
it, and with them in the total, a worker's share of a burst grows by half of them (a client that closed 28
connections and opened 50 at once, one worker busy elsewhere: 31/19). So while a sibling has not looked since
a burst began, a worker takes no more of the burst than its share of what was waiting when it began
(`burst_share`), and leaves the rest to that sibling, with the same patience.
"""

from __future__ import annotations

from collections.abc import Callable

SLACK = 1  # connections a worker may hold beyond an even split: fewer hand-overs between siblings in a burst
PATIENCE = 0.1  # seconds a connection may wait for a sibling that takes nothing, before this worker takes it
LONGEST = 1.0  # seconds of wall time a connection may wait, however long its siblings queue for a CPU


def fair_share(total: int, workers: int) -> int:
    """The most connections any of `workers` holds when `total` are spread as evenly as they can be."""
    return -(-total // workers)


def burst_share(waiting: int, workers: int, slack: int = SLACK) -> int:
    """The most of a burst of `waiting` new connections one of `workers` takes while a sibling has not looked."""
    return fair_share(waiting, workers) + slack


class AcceptGate:
    """One worker's rule; `now` is a monotonic clock reading (seconds)."""

    def __init__(self, slack: int = SLACK, patience: float = PATIENCE, longest: float = LONGEST):
        self.slack = slack
        self.patience = patience
        self.longest = longest
        self.waiting_since: float | None = None  # when this worker last held back with the others as they are
        self._others_then: tuple[int, ...] = ()
        self._queued_then: tuple[float, ...] = ()

    def may_accept(self, own: int, others: tuple[int, ...], now: float,
                   queued: Callable[[], tuple[float, ...]] = tuple, burst_share_taken: bool = False) -> bool:
        """`own`: connections this worker holds; `others`: what each other accepting worker holds; `queued()`:
        how long each of them has waited for a CPU in all (seconds, as far as known; asked only when holding back);
        `burst_share_taken`: this worker took its `burst_share` while a sibling has not looked since the burst began."""
        if not burst_share_taken and own < fair_share(own + sum(others) + 1, len(others) + 1) + self.slack:
            self.waiting_since = None
            return True
        if self.waiting_since is None or others != self._others_then:  # they are taking connections: wait for them
            self.waiting_since, self._others_then, self._queued_then = now, others, queued()
            return False
        waited = now - self.waiting_since
        if waited < self.longest:
            starved = min((total - then for total, then in zip(queued(), self._queued_then)), default=0.0)
            if waited - starved < self.patience:
                return False
        return True
