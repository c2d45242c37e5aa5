"""Worker-by-worker rollout: the order in which a new generation of workers replaces the old one.

Pure: no I/O, no clock, no processes. Two machines, one per main, talk over the handoff channel once the
new main has taken over from systemd (see `wire` for the lines):

* `Rollout`, the new main's: its first worker is ready (that is what made the handoff possible). Each time
  one of its workers becomes ready, it asks the old main to retire one worker (`retire <k>`); once the old
  main says that worker has exited (`retired <pid> <left>`), it starts its next worker. So the service
  never runs more than N+1 workers (N old plus the first new one, then N-k old plus k new, ...), and an
  old worker keeps serving until the new worker that replaces it is ready. A new worker that fails to
  start is retried after the workers' usual back-off; nothing old retires meanwhile. Once it has all its
  workers and the old main has none, it says `rolled`.
* `Retirement`, the old main's: retire one worker per request, the least busy first (it stops accepting,
  hands its idle connections to the new generation and drains); say when it has exited. On `rolled` the
  old generation is done; if the channel closes before that (the new main died), the old generation
  restores its missing workers and serves on, as main again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


class Backoff(Protocol):
    def next_delay(self, lived: float) -> float: ...


# ---- the new main's side --------------------------------------------------------


@dataclass(frozen=True)
class NewWorkerReady:
    number: int  # from 1


@dataclass(frozen=True)
class NewWorkerFailed:
    number: int
    reason: str


@dataclass(frozen=True)
class RetryDue:
    number: int


@dataclass(frozen=True)
class OldRetired:
    pid: int  # 0: the old main had no worker left to retire
    left: int  # old workers still serving


@dataclass(frozen=True)
class PredecessorGone:
    """The old main closed the channel (it exited, or is an older version that drains whole)."""


@dataclass(frozen=True)
class RetireOld:
    because: int  # the number of the new worker that just became ready


@dataclass(frozen=True)
class StartWorker:
    number: int


@dataclass(frozen=True)
class RetryLater:
    number: int
    seconds: float


@dataclass(frozen=True)
class Finish:
    tell_predecessor: bool  # send `rolled` (False: it is gone already)


@dataclass(frozen=True)
class Log:
    message: str
    level: str = "info"


class Rollout:
    """The new main's sequencing. Create it once its first worker is ready and it is main; `begin()`."""

    def __init__(self, total: int, backoff: Backoff, old_workers: int | None = None):
        self.total = total
        self.backoff = backoff
        self.ready = 1  # the first worker, whose readiness made the handoff
        self.old_left = old_workers  # None: not known yet (the old main may run another worker count)
        self.predecessor = True
        self.waiting_for: str | None = None  # "retired" or "worker"
        self.done = False

    def begin(self) -> list:
        return self._after_ready()

    def progress(self) -> str:
        """Where the rollout is, for STATUS= (`systemctl status` during a reload)."""
        progress = f"rolling out: {self.ready} of {self.total} workers new"
        if self.predecessor and self.old_left:
            progress += f", {self.old_left} old left"
        return progress

    def handle(self, event) -> list:
        if self.done:
            return []
        return getattr(self, "_on_" + type(event).__name__)(event)

    def _on_NewWorkerReady(self, event: NewWorkerReady) -> list:
        if self.waiting_for != "worker":
            return []
        self.ready += 1
        return [Log(f"rollout: new worker {event.number} of {self.total} ready"), *self._after_ready()]

    def _on_NewWorkerFailed(self, event: NewWorkerFailed) -> list:
        if self.waiting_for != "worker":
            return []
        delay = self.backoff.next_delay(0.0)
        return [Log(f"rollout: new worker {event.number} failed to start ({event.reason}); the old worker it"
                    f" replaces keeps serving; retrying in {delay:g}s", "warning"),
                RetryLater(event.number, delay)]

    def _on_RetryDue(self, event: RetryDue) -> list:
        if self.waiting_for != "worker":
            return []
        return [StartWorker(event.number)]

    def _on_OldRetired(self, event: OldRetired) -> list:
        if self.waiting_for != "retired":
            return []
        self.old_left = event.left
        retired = f"old worker (pid {event.pid}) retired" if event.pid else "no old worker left to retire"
        return [Log(f"rollout: {retired}, {event.left} old left"), *self._after_retired()]

    def _on_PredecessorGone(self, event: PredecessorGone) -> list:
        self.predecessor = False
        self.old_left = 0
        actions: list = [Log("rollout: the previous generation is gone; starting the remaining workers at once")]
        if self.waiting_for == "retired":
            actions += self._after_retired()
        return actions

    def _after_ready(self) -> list:
        if self.predecessor and self.old_left != 0:
            self.waiting_for = "retired"
            return [RetireOld(self.ready)]
        return self._after_retired()

    def _after_retired(self) -> list:
        if self.ready < self.total:
            self.waiting_for = "worker"
            return [StartWorker(self.ready + 1)]
        if self.predecessor and self.old_left != 0:
            self.waiting_for = "retired"
            return [RetireOld(self.ready)]
        self.waiting_for = None
        self.done = True
        return [Log(f"rollout: all {self.total} workers of this generation serving"), Finish(self.predecessor)]


# ---- the old main's side --------------------------------------------------------


@dataclass(frozen=True)
class RetireRequested:
    serving: Mapping[int, int]  # pid -> requests in flight, of the workers still serving


@dataclass(frozen=True)
class WorkerExited:
    pid: int
    left: int  # workers still serving


@dataclass(frozen=True)
class Rolled:
    """The new main has all its workers: the old generation is done."""


@dataclass(frozen=True)
class SuccessorGone:
    pid: int


@dataclass(frozen=True)
class DrainWorker:
    pid: int


@dataclass(frozen=True)
class ReplyRetired:
    pid: int
    left: int


@dataclass(frozen=True)
class Complete:
    """Name the new main in the pid file, report the reload done, and exit."""


@dataclass(frozen=True)
class Restore:
    """Respawn the workers retired so far and serve on as main; the reload failed for `reason`."""

    reason: str


class Retirement:
    """The old main's side of a rollout: one retirement at a time."""

    def __init__(self):
        self.retiring: int | None = None
        self.retired = 0
        self.finished = False

    def handle(self, event) -> list:
        if self.finished:
            return []
        return getattr(self, "_on_" + type(event).__name__)(event)

    def _on_RetireRequested(self, event: RetireRequested) -> list:
        if self.retiring is not None:
            return [Log("rollout: a retirement was asked for while one is under way; ignored", "warning")]
        if not event.serving:
            return [ReplyRetired(0, 0)]
        pid = min(event.serving, key=lambda p: (event.serving[p], p))  # the least busy
        self.retiring = pid
        return [Log(f"rollout: retiring worker pid {pid} ({len(event.serving) - 1} old left serving)"),
                DrainWorker(pid)]

    def _on_WorkerExited(self, event: WorkerExited) -> list:
        if event.pid != self.retiring:
            return []
        self.retiring = None
        self.retired += 1
        return [ReplyRetired(event.pid, event.left)]

    def _on_Rolled(self, event: Rolled) -> list:
        self.finished = True
        return [Complete()]

    def _on_SuccessorGone(self, event: SuccessorGone) -> list:
        self.finished = True
        reason = f"new generation (pid {event.pid}) exited during the rollout"
        return [Log(f"rollout: {reason}; restoring {self.retired + (self.retiring is not None)} worker(s)",
                    "error"), Restore(reason)]
