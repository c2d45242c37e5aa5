"""Multi-worker generations: a generation's main process and its N worker processes.

With `--workers N` (N ≥ 2) the main process does not serve HTTP itself: it
starts N workers (same command line, the sockets at fd 3…, a private channel),
waits until every one is ready, then proceeds with the handoff exactly as a
single-process generation would. Each worker runs its own event loop on the
shared sockets. A worker that dies is replaced, with a back-off so a crash
loop does not spin; workers die with their main (PR_SET_PDEATHSIG).

The first N workers are forked from the main before its event loop starts
(see `spawn.fork_worker`); replacements are forked and exec'd.

The channel's lines are in `wire`.
With `--metrics`, the main and its workers share their metrics through files
(see `metrics`), not through the channel.
Draining is `drain <pid>` (a new generation took over and adopts connections: the worker hands them
over), SIGUSR2 (a new generation took over that does not) or SIGTERM (the service stops): the worker stops
accepting and drains (WebSockets closed with 1012 or 1001).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from graceful_http import __version__
from graceful_http.inherited import Inherited
from graceful_http.spawn import spawn_worker, wait_exit
from graceful_http.wire import (
    DRAIN,
    DRAINED,
    FAILED,
    OUTCOME,
    PING,
    PONG,
    READY,
    RELOAD,
    STATS,
    Outcome,
    decode,
    encode,
    outcome_text,
    parse_outcome,
)

log = logging.getLogger("graceful_http")

STATS_INTERVAL = 1.0
_NOT_FOR_WORKERS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class WorkerStartFailed(Exception):
    """A worker could not start; the generation cannot serve."""


# ---- pure: when to replace a dead worker ------------------------------------------


@dataclass
class RestartBackoff:
    """Delay before replacing a worker: doubles with each quick death, resets after a stable run."""

    initial: float = 0.5
    maximum: float = 30.0
    stable_after: float = 30.0
    _delay: float = field(default=0.0, init=False)

    def next_delay(self, lived: float) -> float:
        if lived >= self.stable_after:
            self._delay = 0.0
        self._delay = self.initial if self._delay == 0.0 else min(self._delay * 2, self.maximum)
        return self._delay


def worker_environ(environ) -> dict[str, str]:
    """A worker's environment: no systemd notification variables (only the main talks to systemd)."""
    return {k: v for k, v in environ.items() if k not in _NOT_FOR_WORKERS}


# ---- main side ------------------------------------------------------------------


class Worker:
    def __init__(self, index: int, pid: int, reader, writer):
        self.index = index
        self.pid = pid
        self.reader = reader
        self.writer = writer
        self.started_at = time.monotonic()
        self.ready = asyncio.get_running_loop().create_future()
        self.exited = asyncio.get_running_loop().create_future()
        self.in_flight = 0
        self.total = 0
        self.adopted = 0  # connections it took over from the previous generation
        self.failed = 0  # requests answered 5xx or whose app raised, if it counts them (a canary)
        self.reports = 0  # how many STATS lines it sent (see `WorkerPool.next_reports`)
        self.drained = (0, 0, 0, 0)  # (answered while draining, cut, handed over, fell back), as it reports them
        self.answered_at = self.started_at  # when its event loop last answered a ping (`heartbeat`)
        self.retiring = False  # being recycled or replaced as stuck: not replaced again when it exits


class WorkerPool:
    """The main process's view of its workers: a `serving.Server` to the supervisor, as an Engine is."""

    def __init__(self, count: int, listeners, generation: int, request_reload, metrics=None, spawn=spawn_worker):
        self.count = count
        self.spawn = spawn  # spawn.spawn_worker, or a test's
        self.metrics = metrics  # the main's: told when a worker exits
        self.listeners = listeners
        self.generation = generation
        self.request_reload = request_reload
        self.workers: dict[int, Worker] = {}
        self.backoff = {index: RestartBackoff() for index in range(count)}
        self.replaced = 0
        self.accepting = True
        self._tasks: set[asyncio.Task] = set()
        self._total_of_dead = 0
        self._adopted_by_dead = 0
        self.handed_over = 0  # connections the workers handed over while draining
        self.fell_back = 0
        self.upkeep = None  # recycling and stuck workers (`worker_upkeep`), if enabled
        self.retiring: set[int] = set()  # pids of workers a rollout retired: not to be replaced
        self.retired: list[Worker] = []
        self.fork_now = None  # (number) -> (pid, channel): fork a worker from the running main (see `latefork`)
        self._failed_by_dead = 0
        self._reported = asyncio.Event()

    def describe(self) -> str:
        return f"{self.count} worker processes"

    async def start(self, forked: list[tuple[int, socket.socket]] = ()) -> None:
        """Take over the workers forked before the event loop started (pid, channel), start the rest,
        and wait until all are ready (or one fails)."""
        for index, (pid, channel) in enumerate(forked):
            await self._adopt(index, pid, channel)
        for index in range(len(forked), self.count):
            await self._spawn(index)
        waits = [worker.ready for worker in self.workers.values()]
        for future in asyncio.as_completed(waits):
            try:
                await future
            except WorkerStartFailed:
                self.accepting = False
                self.terminate(signal.SIGKILL)
                raise

    async def _spawn(self, index: int) -> Worker:
        """Fork and exec a worker (a replacement: the event loop is running, so no plain fork)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        inherited = Inherited(generation=self.generation).for_worker(index + 1, __version__)
        try:
            pid = self.spawn([item.sock.fileno() for item in self.listeners], [item.name for item in self.listeners],
                               theirs.fileno(), inherited, worker_environ(os.environ))
        finally:
            theirs.close()
        return await self._adopt(index, pid, mine)

    async def _adopt(self, index: int, pid: int, channel: socket.socket) -> Worker:
        reader, writer = await asyncio.open_unix_connection(sock=channel)
        worker = Worker(index, pid, reader, writer)
        self.workers[pid] = worker
        self._track(asyncio.create_task(self._listen_until_reset(worker)))
        self._track(asyncio.create_task(self._wait_exit(worker)))
        log.info("worker %d started as pid %d", index + 1, pid)
        return worker

    def _track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen_until_reset(self, worker: Worker) -> None:
        try:
            await self._listen(worker)
        except ConnectionError:  # it was killed with our lines unread (a stuck worker): its exit says the rest
            pass

    async def _listen(self, worker: Worker) -> None:
        while line := await worker.reader.readline():
            word, detail = decode(line)
            if word == READY and not worker.ready.done():
                worker.ready.set_result(None)
            elif word == FAILED and not worker.ready.done():
                worker.ready.set_exception(WorkerStartFailed(detail))
            elif word == STATS:
                numbers = [int(n) for n in detail.split()] + [0]
                worker.in_flight, worker.total, worker.adopted = numbers[:3]
                if len(numbers) > 4:  # the padding aside: it counts failures
                    worker.failed = numbers[3]
                worker.reports += 1
                self._reported.set()
            elif word == DRAINED:
                worker.drained = tuple(([int(n) for n in detail.split()] + [0, 0, 0, 0])[:4])
            elif word == RELOAD:
                outcome = self.request_reload(f"{detail} (via worker {worker.index + 1})")
                worker.writer.write(encode(OUTCOME, outcome_text(outcome)))
            elif word == PONG:
                worker.answered_at = time.monotonic()

    async def _wait_exit(self, worker: Worker) -> None:
        pidfd = os.pidfd_open(worker.pid)
        try:
            await wait_exit(pidfd)
        finally:
            os.close(pidfd)
        _, status = os.waitpid(worker.pid, 0)
        del self.workers[worker.pid]
        self._total_of_dead += worker.total
        self._adopted_by_dead += worker.adopted
        self._failed_by_dead += worker.failed
        if self.metrics is not None:
            self.metrics.process_exited(worker.pid)
        worker.writer.close()
        how = _describe_status(status)
        if not worker.ready.done():
            worker.ready.set_exception(WorkerStartFailed(f"worker {worker.index + 1} (pid {worker.pid}) {how}"
                                                         " before it was ready"))
        worker.exited.set_result(status)
        if self.upkeep is not None:
            self.upkeep.exited(worker)
        if (self.accepting and not worker.retiring and worker.pid not in self.retiring and worker.ready.done()
                and not worker.ready.exception()):
            delay = self.backoff[worker.index].next_delay(time.monotonic() - worker.started_at)
            self.replaced += 1
            log.warning("worker %d (pid %d) %s; replacing it in %gs", worker.index + 1, worker.pid, how, delay)
            await asyncio.sleep(delay)
            if self.accepting:
                replacement = await self._replace(worker.index)
                try:
                    await replacement.ready
                except WorkerStartFailed as exc:
                    log.error("replacement worker failed: %s", exc)

    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.workers.values())

    @property
    def total_requests(self) -> int:
        return self._total_of_dead + sum(w.total for w in self.workers.values())

    @property
    def adopted(self) -> int:
        return self._adopted_by_dead + sum(w.adopted for w in self.workers.values())

    def terminate(self, signum=signal.SIGTERM) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def stop_accepting(self, replaced: bool = False, moving_to: int | None = None) -> None:
        """Workers drain on `drain <pid>` when a new generation took over that adopts their connections
        (`moving_to`, its main), on SIGUSR2 when one took over that does not, on SIGTERM when the service
        stops (as systemd's own SIGTERM to the whole unit says); the main closes its own copies of the
        listeners."""
        self.accepting = False
        if moving_to is not None:
            for worker in self.workers.values():
                worker.writer.write(encode(DRAIN, str(moving_to)))
        else:
            self.terminate(signal.SIGUSR2 if replaced else signal.SIGTERM)
        for listener in self.listeners:
            listener.sock.close()

    async def drain(self, deadline: float, websocket_code: int | None = None) -> tuple[int, int]:
        """Wait for the workers to finish draining; kill any still running at the deadline (+5 s grace).
        (Each worker closes its WebSockets: the signal in `stop_accepting` told it which code.)"""
        draining = list(self.workers.values())
        counted = draining + self.retired
        pending = [w.exited for w in draining]
        if pending:
            _, late = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()) + 5)
            if late:
                self.terminate(signal.SIGKILL)
                await asyncio.wait(late, timeout=5)
        self.handed_over = sum(w.drained[2] for w in counted)
        self.fell_back = sum(w.drained[3] for w in counted)
        return sum(w.drained[0] for w in counted), sum(w.drained[1] for w in counted)

    # -- a worker-by-worker rollout (see `rollout`, `rolling`)

    async def start_first(self, forked: list[tuple[int, socket.socket]]) -> None:
        """Take over the workers forked before the event loop started and wait until they are ready; the rest
        start one by one as the rollout goes on (`start_worker`)."""
        for index, (pid, channel) in enumerate(forked):
            await self._adopt(index, pid, channel)
        for worker in list(self.workers.values()):
            try:
                await worker.ready
            except WorkerStartFailed:
                self.accepting = False
                self.terminate(signal.SIGKILL)
                raise

    async def start_worker(self, number: int) -> None:
        """Start worker `number` (from 1) and wait until it is ready; WorkerStartFailed if it cannot start."""
        if self.fork_now is not None:
            worker = await self._adopt(number - 1, *self.fork_now(number))
        else:
            worker = await self._spawn(number - 1)
        await worker.ready

    async def _replace(self, index: int) -> Worker:
        """A new process for worker `index`: forked from the running main if it can (`fork_now`), else exec'd."""
        if self.fork_now is not None:
            return await self._adopt(index, *self.fork_now(index + 1))
        return await self._spawn(index)

    def channels(self) -> list:
        """The main's ends of the workers' channels (a worker forked later must not keep them)."""
        return [w.writer.get_extra_info("socket") for w in self.workers.values()]

    async def next_reports(self, timeout: float) -> None:
        """Wait until every worker has reported its counts once more (or `timeout` s). The counts are as of each
        worker's last report, up to a stats interval old: a canary takes them after this, so that what the
        workers answered before its window began is not counted in it."""
        marks = {pid: worker.reports for pid, worker in self.workers.items()}
        deadline = time.monotonic() + timeout
        while any(pid in self.workers and self.workers[pid].reports == seen for pid, seen in marks.items()):
            self._reported.clear()
            try:
                await asyncio.wait_for(self._reported.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return

    @property
    def failed(self) -> int:
        """Requests its workers answered 5xx or whose app raised (counted only with a canary configured)."""
        return self._failed_by_dead + sum(w.failed for w in self.workers.values())

    def serving_workers(self) -> dict[int, int]:
        """pid -> requests in flight, of the ready workers not retiring."""
        return {pid: w.in_flight for pid, w in self.workers.items()
                if pid not in self.retiring and w.ready.done() and not w.ready.exception()}

    def retire(self, pid: int, moving_to: int) -> asyncio.Future:
        """Have one worker stop accepting and drain, handing its connections over to the generation whose main
        is `moving_to`; it is not replaced. Returns the future of its exit."""
        worker = self.workers[pid]
        self.retiring.add(pid)
        self.retired.append(worker)
        worker.writer.write(encode(DRAIN, str(moving_to)))
        return worker.exited

    async def restore(self) -> None:
        """Start again the workers a rollout retired (the new generation died): back to `count` serving."""
        present = {w.index for pid, w in self.workers.items() if pid not in self.retiring}
        missing = [index for index in range(self.count) if index not in present]
        self.retired = []
        starting = [await self._spawn(index) for index in missing]
        for worker in starting:
            try:
                await worker.ready
            except WorkerStartFailed as exc:
                log.error("restoring a worker failed: %s", exc)

    async def shutdown_app(self) -> None:
        """Each worker ran its own lifespan shutdown."""


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


# ---- worker side ----------------------------------------------------------------


class MainLink:
    """A worker's link to its main: readiness, stats, reload requests, and the drain's result."""

    def __init__(self, sock: socket.socket, index: int, main_version: str = __version__):
        self.sock = sock
        self.index = index
        self.main_version = main_version
        self.reader = None
        self.writer = None
        self._replies: asyncio.Queue | None = None
        self.on_drain = None  # called when the main says `drain <pid>`
        self.failures = None  # () -> requests failed so far, reported with the stats if set
        self.stats_interval = STATS_INTERVAL
        self.moving_to: int | None = None  # that pid: the new generation's main, which adopts our connections

    @classmethod
    def from_inherited(cls, inherited: Inherited) -> MainLink:
        """The link of a worker its main exec'd (a forked one is handed its socket)."""
        os.set_inheritable(inherited.worker_fd, False)
        return cls(socket.socket(fileno=inherited.worker_fd), inherited.worker_index,
                   inherited.main_version or __version__)

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        self._replies = asyncio.Queue()
        asyncio.create_task(self._read_replies())

    async def _read_replies(self) -> None:
        while line := await self.reader.readline():
            word, detail = decode(line)
            if word == PING:
                self.send(PONG)
            elif word == OUTCOME:
                await self._replies.put(parse_outcome(detail))
            elif word == DRAIN:
                self.moving_to = int(detail) if detail.isdigit() else None
                if self.on_drain is not None:
                    self.on_drain()
        # The main is gone: a worker never outlives its generation.
        os.kill(os.getpid(), signal.SIGTERM)

    def send(self, word: str, detail: str = "") -> None:
        self.writer.write(encode(word, detail))

    def report_failed(self, reason: str) -> None:
        """Before `connect`: tell the main this worker cannot start."""
        try:
            self.sock.sendall(encode(FAILED, reason))
        except OSError:
            pass

    async def request_reload(self, source: str) -> Outcome:
        self.send(RELOAD, source)
        return await self._replies.get()

    async def report_stats(self, engine) -> None:
        while True:
            failed = f" {self.failures()}" if self.failures is not None else ""
            self.send(STATS, f"{engine.in_flight()} {engine.total_requests} {getattr(engine, 'adopted', 0)}{failed}")
            await asyncio.sleep(self.stats_interval)
