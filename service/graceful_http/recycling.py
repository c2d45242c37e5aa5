"""When to recycle a worker: the limits (requests, memory, lifetime) and the rule of one at a time.

Pure: the main feeds it what it knows of its workers (requests answered, as
the workers report them; resident memory; age) and it names the one worker
to recycle now, if any, with the reason. Never more than one at a time: the
next is named only once the previous recycle is over (its worker exited, or
its replacement failed to start, after which recycling waits a while so a
broken replacement does not spin). Each worker's request limit is drawn once,
when it is first seen: N + a random 0..J (gunicorn's --max-requests-jitter),
so workers started together do not all come due together.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# The reasons, as /metrics labels them: each is the option that set the limit.
MAX_REQUESTS = "max-requests"
MAX_MEMORY = "max-worker-memory"
MAX_LIFETIME = "max-worker-lifetime"
WORKER_TIMEOUT = "worker-timeout"  # not a recycle: a stuck worker replaced (see `heartbeat`)
REASONS = (MAX_REQUESTS, MAX_MEMORY, MAX_LIFETIME, WORKER_TIMEOUT)
RETRY_AFTER_FAILURE = 30.0


@dataclass(frozen=True)
class RecycleLimits:
    """The settings, 0 meaning off."""

    max_requests: int = 0
    max_requests_jitter: int = 0
    max_memory_mib: int = 0
    max_lifetime: float = 0.0

    @classmethod
    def from_settings(cls, settings) -> RecycleLimits:
        return cls(settings.max_requests, settings.max_requests_jitter, settings.max_worker_memory,
                   settings.max_worker_lifetime)

    @property
    def enabled(self) -> bool:
        return bool(self.max_requests or self.max_memory_mib or self.max_lifetime)


@dataclass(frozen=True)
class WorkerState:
    """One serving worker as its main sees it now."""

    key: int  # its pid
    index: int  # its number in the generation, from 1
    requests: int
    age: float  # seconds since it started
    rss_mib: float | None = None  # None: unknown (not read, or it is gone)


@dataclass(frozen=True)
class Due:
    key: int
    index: int
    reason: str  # one of REASONS
    detail: str  # for the log: "1012 requests >= max-requests 1000"


@dataclass
class RecyclePolicy:
    limits: RecycleLimits
    randint: Callable[[int, int], int] = random.randint
    recycling: int | None = None  # the key of the worker being recycled
    _request_limits: dict[int, int] = field(default_factory=dict)
    _paused_until: float = 0.0

    def request_limit(self, key: int) -> int:
        """This worker's request limit (0: none), drawn the first time it is asked for."""
        if not self.limits.max_requests:
            return 0
        if key not in self._request_limits:
            jitter = self.randint(0, self.limits.max_requests_jitter) if self.limits.max_requests_jitter else 0
            self._request_limits[key] = self.limits.max_requests + jitter
        return self._request_limits[key]

    def next_due(self, workers: Iterable[WorkerState], now: float) -> Due | None:
        """The worker to recycle now (and it is then the one being recycled), or None: none is due, one is
        already being recycled, or recycling waits after a failed replacement."""
        if self.recycling is not None or now < self._paused_until or not self.limits.enabled:
            return None
        candidates = [(worker.age, due) for worker in workers if (due := self._due(worker)) is not None]
        if not candidates:
            return None
        _, due = max(candidates, key=lambda candidate: candidate[0])  # the oldest first
        self.recycling = due.key
        return due

    def _due(self, worker: WorkerState) -> Due | None:
        limits = self.limits
        limit = self.request_limit(worker.key)
        if limit and worker.requests >= limit:
            return Due(worker.key, worker.index, MAX_REQUESTS,
                       f"{worker.requests} requests >= {MAX_REQUESTS} {limit}")
        if limits.max_memory_mib and worker.rss_mib is not None and worker.rss_mib > limits.max_memory_mib:
            return Due(worker.key, worker.index, MAX_MEMORY,
                       f"{worker.rss_mib:.0f} MiB resident > {MAX_MEMORY} {limits.max_memory_mib} MiB")
        if limits.max_lifetime and worker.age >= limits.max_lifetime:
            return Due(worker.key, worker.index, MAX_LIFETIME,
                       f"{worker.age:.0f}s old >= {MAX_LIFETIME} {limits.max_lifetime:g}s")
        return None

    def finished(self, key: int) -> None:
        """The recycle of `key` is over: its worker exited."""
        if self.recycling == key:
            self.recycling = None
        self._request_limits.pop(key, None)

    def failed(self, key: int, now: float, retry_after: float = RETRY_AFTER_FAILURE) -> None:
        """The replacement for `key` did not start: `key` keeps serving, and nothing is recycled for a while."""
        if self.recycling == key:
            self.recycling = None
        self._paused_until = now + retry_after

    def forget(self, key: int) -> None:
        """`key` exited on its own (it died, or its generation drained)."""
        self.finished(key)
