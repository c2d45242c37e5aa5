"""A main's care of its serving workers: recycle the one the policy names, replace a stuck one.

Both replace **new-first**: the replacement is started and ready before the
old worker stops serving. A recycled worker is then told `drain <our pid>`,
as a reload's old workers are told the new main's: it stops accepting and
hands its idle keep-alive connections to the adoption points of its own
generation (its siblings', and its replacement's, which listens on a spare
adoption address while the old one still holds the worker's own), and drains
lame-duck style whatever cannot move. A stuck worker (see `heartbeat`) has its
threads' stacks written to the log first, and is killed once its replacement
serves. What decides is pure (`recycling`, `heartbeat`); this is the adapter
that reads /proc, talks to the workers and starts the replacements.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import time

from graceful_http.handover import MAX_GAP
from graceful_http.heartbeat import STACK_DUMP_SIGNAL, ping_interval, silent_for
from graceful_http.recycling import WORKER_TIMEOUT, RecycleLimits, RecyclePolicy, WorkerState
from graceful_http.wire import DRAIN, PING, encode

log = logging.getLogger("graceful_http")

CHECK_INTERVAL = 1.0
KILL_GRACE = 5.0  # beyond the graceful timeout, before a draining recycled worker is killed
DUMP_GRACE = 0.5  # for the stack dump to be written, when a stuck worker is killed without a replacement


class ReplacementFailed(Exception):
    """The replacement worker did not start."""


def spare_adoption_indexes(workers: int) -> tuple[int, ...]:
    """Where a replacement worker adopts connections while the worker it replaces still holds its own index's
    address: just past the generation's workers, so `handover.connect_all` still finds them all."""
    return tuple(range(workers + 1, workers + MAX_GAP))


def resident_mib(pid: int) -> float | None:
    """A process's resident memory (VmRSS) in MiB; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class WorkerUpkeep:
    def __init__(self, pool, limits: RecycleLimits, worker_timeout: float, ready_timeout: float,
                 graceful_timeout: float, metrics=None, clock=time.monotonic, read_memory=resident_mib):
        self.pool = pool
        self.policy = RecyclePolicy(limits)
        self.worker_timeout = worker_timeout
        self.ready_timeout = ready_timeout
        self.graceful_timeout = graceful_timeout
        self.metrics = metrics
        self.clock = clock
        self.read_memory = read_memory
        self.counts: collections.Counter[str] = collections.Counter()  # by reason
        self._tasks: set[asyncio.Task] = set()
        self._stuck: set[int] = set()  # pids found stuck, being replaced
        self._watched: set[int] = set()  # pids pinged since they serve
        self._starting: dict[int, asyncio.Future] = {}  # pid being recycled -> its replacement's start
        self._main: asyncio.Task | None = None

    @classmethod
    def wanted(cls, settings) -> bool:
        return RecycleLimits.from_settings(settings).enabled or settings.worker_timeout > 0

    def start(self) -> None:
        self.pool.upkeep = self
        self._main = asyncio.get_running_loop().create_task(self._run())

    def interval(self) -> float:
        return min(CHECK_INTERVAL, ping_interval(self.worker_timeout)) if self.worker_timeout else CHECK_INTERVAL

    async def _run(self) -> None:
        interval = self.interval()
        while self.pool.accepting:
            await asyncio.sleep(interval)
            if self.pool.accepting:
                self.check()

    def check(self) -> None:
        """One look at the serving workers: ping them, replace the stuck, recycle the one that is due."""
        now = self.clock()
        states = []
        for worker in list(self.pool.workers.values()):
            if not _serving(worker) or worker.pid in self._stuck:
                continue
            if self.worker_timeout:  # also while it is being recycled: a stuck one would not drain
                if worker.pid not in self._watched:  # its silence counts from now, not from its start-up
                    self._watched.add(worker.pid)
                    worker.answered_at = max(worker.answered_at, now)
                silence = silent_for(worker.answered_at, now, self.worker_timeout)
                if silence is not None:
                    self._stuck.add(worker.pid)
                    self._spawn_task(self.replace_stuck(worker, silence))
                    continue
                worker.writer.write(encode(PING))
            if worker.retiring:
                continue
            rss = self.read_memory(worker.pid) if self.policy.limits.max_memory_mib else None
            states.append(WorkerState(worker.pid, worker.index + 1, worker.total, now - worker.started_at, rss))
        due = self.policy.next_due(states, now)
        if due is not None:
            self._spawn_task(self.recycle(self.pool.workers[due.key], due))

    def _spawn_task(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def exited(self, worker) -> None:
        """The pool saw `worker` exit (recycled or not). A worker being recycled is forgotten by its `recycle`,
        once that has logged it gone: the next recycle must not start (and log) before that."""
        if worker.pid != self.policy.recycling:
            self.policy.forget(worker.pid)
        self._stuck.discard(worker.pid)
        self._watched.discard(worker.pid)

    def _count(self, reason: str) -> None:
        self.counts[reason] += 1
        if self.metrics is not None:
            self.metrics.worker_recycled(reason)

    def status_note(self) -> str:
        """For STATUS=: how many workers were recycled or replaced as stuck, by reason."""
        if not self.counts:
            return ""
        total = sum(self.counts.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.counts.items()))
        return f"{total} worker{'s' if total != 1 else ''} recycled ({reasons})"

    async def _start_replacement(self, old):
        if not self.pool.accepting:
            raise ReplacementFailed("the generation is draining")
        replacement = await self.pool._spawn(old.index)
        if not self.pool.accepting:  # the generation started draining meanwhile: it was not told to drain with it
            _kill(replacement.pid, signal.SIGTERM)
            raise ReplacementFailed("the generation is draining")
        try:
            await asyncio.wait_for(asyncio.shield(replacement.ready), self.ready_timeout)
        except asyncio.TimeoutError:
            _kill(replacement.pid, signal.SIGKILL)
            raise ReplacementFailed(f"not ready within {self.ready_timeout:g}s") from None
        except Exception as exc:  # noqa: BLE001 - WorkerStartFailed, with the worker's reason
            raise ReplacementFailed(str(exc)) from None
        return replacement

    async def recycle(self, old, due) -> None:
        """New first: start the replacement, then have `old` hand over its connections and drain."""
        try:
            await self._recycle(old, due)
        finally:
            if old.exited.done():
                self.policy.forget(old.pid)

    async def _recycle(self, old, due) -> None:
        old.retiring = True
        log.info("worker %d (pid %d) is due for recycling: %s; starting its replacement",
                 old.index + 1, old.pid, due.detail)
        starting = self._starting[old.pid] = asyncio.ensure_future(self._start_replacement(old))
        try:
            replacement = await starting
        except ReplacementFailed as exc:
            old.retiring = old.pid in self._stuck  # a stuck one is being killed: not replaced again
            if not self.pool.accepting:
                return  # the whole generation drains: so does this worker
            self.policy.failed(old.pid, self.clock())
            log.error("worker %d (pid %d) was not recycled: its replacement did not start (%s); it keeps serving",
                      old.index + 1, old.pid, exc)
            if old.exited.done() and self.pool.accepting:  # it died meanwhile, and nobody replaced it
                await self.pool._spawn(old.index)
            return
        finally:
            self._starting.pop(old.pid, None)
        if old.exited.done() or not self.pool.accepting:
            return  # it died meanwhile (the replacement stands in), or the whole generation drains now
        old.writer.write(encode(DRAIN, str(os.getpid())))
        self._count(due.reason)
        log.info("worker %d (pid %d) recycled: %s; pid %d serves in its place, the old one hands over its"
                 " connections and drains", old.index + 1, old.pid, due.detail, replacement.pid)
        try:
            await asyncio.wait_for(asyncio.shield(old.exited), self.graceful_timeout + KILL_GRACE)
        except asyncio.TimeoutError:
            log.warning("recycled worker %d (pid %d) still draining after %gs: killing it",
                        old.index + 1, old.pid, self.graceful_timeout + KILL_GRACE)
            _kill(old.pid, signal.SIGKILL)
            await old.exited
        log.info("recycled worker %d (pid %d) is gone", old.index + 1, old.pid)

    async def replace_stuck(self, old, silence: float) -> None:
        """Dump its stacks, start its replacement (unless a recycle already did), then kill it."""
        recycling = old.retiring
        old.retiring = True
        log.error("worker %d (pid %d) is stuck: its event loop has not answered for %.1fs (worker-timeout %gs);"
                  " the stacks of its threads follow; it is replaced, then killed",
                  old.index + 1, old.pid, silence, self.worker_timeout)
        _kill(old.pid, STACK_DUMP_SIGNAL)
        self._count(WORKER_TIMEOUT)
        try:
            if recycling:  # its replacement is on its way, or serves already
                starting = self._starting.get(old.pid)
                if starting is None:
                    await asyncio.sleep(DUMP_GRACE)
                    _kill(old.pid, signal.SIGKILL)
                    log.warning("killed stuck worker %d (pid %d) while it was recycled", old.index + 1, old.pid)
                    return
                replacement = await asyncio.shield(starting)
            else:
                replacement = await self._start_replacement(old)
        except ReplacementFailed as exc:
            log.error("no replacement for stuck worker %d (pid %d): %s", old.index + 1, old.pid, exc)
            await asyncio.sleep(DUMP_GRACE)
            _kill(old.pid, signal.SIGKILL)
            old.retiring = False  # once it is dead, the pool replaces it as any dead worker, with a back-off
            return
        if old.exited.done():
            return
        _kill(old.pid, signal.SIGKILL)
        log.warning("killed stuck worker %d (pid %d); pid %d serves in its place", old.index + 1, old.pid,
                    replacement.pid)


def _serving(worker) -> bool:
    """Ready (it said so), and not gone."""
    return (worker.ready.done() and not worker.ready.cancelled() and worker.ready.exception() is None
            and not worker.exited.done())


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def start_worker_upkeep(pool, settings, metrics=None) -> WorkerUpkeep | None:
    """Recycle and watch the pool's workers, if the settings ask for it."""
    if not WorkerUpkeep.wanted(settings):
        return None
    upkeep = WorkerUpkeep(pool, RecycleLimits.from_settings(settings), settings.worker_timeout,
                          settings.ready_timeout, settings.graceful_timeout, metrics)
    upkeep.start()
    return upkeep


def warn_about_single_process_recycling(settings) -> None:
    """Recycling and stuck-worker detection act on workers: with one process per generation there are none."""
    if settings.workers == 1 and WorkerUpkeep.wanted(settings):
        log.warning("max-requests, max-worker-memory, max-worker-lifetime and worker-timeout act on workers:"
                    " with --workers 1 the generation's main serves by itself and they have no effect"
                    " (use --workers 2 or more)")
