"""Carry out a worker-by-worker rollout (`rollout` decides) with real worker pools over the handoff channel.

`RolloutDriver` runs in the new main once it has taken over; `RetirementDriver` in the old main, from the
moment the new main confirms it serves until the rollout ends one way or the other.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from graceful_http import rollout as r
from graceful_http.wire import RETIRE, RETIRED, ROLLED, decode, encode

log = logging.getLogger("graceful_http")


class LineChannel:
    """The handoff channel's socket, read and written a line at a time (see `wire`)."""

    def __init__(self, sock: socket.socket, buffered: bytes = b""):
        self.sock = sock
        self.sock.setblocking(False)
        self._buffer = buffered

    async def next_message(self) -> tuple[str, str]:
        """The next line as (word, detail), or ("eof", "") once the other side closed."""
        loop = asyncio.get_running_loop()
        while b"\n" not in self._buffer:
            try:
                chunk = await loop.sock_recv(self.sock, 4096)
            except (OSError, ValueError):  # ValueError: closed here
                chunk = b""
            if not chunk:
                return ("eof", "")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return decode(line)

    def send(self, word: str, detail: str = "") -> None:
        try:
            self.sock.send(encode(word, detail))  # a few bytes, one line at a time: never blocks
        except OSError:
            pass  # it is gone: reading says so


def _log(action: r.Log) -> None:
    log.log(logging.getLevelName(action.level.upper()), "%s", action.message)


class RolloutDriver:
    """The new main's side: start workers one at a time, each after the old main retired one."""

    def __init__(self, pool, channel: LineChannel | None, backoff):
        """`channel`: to the old main, if it retires its workers one by one."""
        self.pool = pool
        self.channel = channel
        self.machine = r.Rollout(pool.count, backoff)
        if channel is None:
            self.machine.handle(r.PredecessorGone())
        self.finished = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._listening: asyncio.Task | None = None

    async def run(self) -> None:
        """Until every worker of this generation serves (or the pool stops)."""
        if self.channel is not None:
            self._listening = self._spawn(self._listen())
        self._carry_out(self.machine.begin())
        await self.finished.wait()

    def _dispatch(self, event) -> None:
        self._carry_out(self.machine.handle(event))

    def _carry_out(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, r.Log):
                _log(action)
            elif isinstance(action, r.RetireOld):
                self.channel.send(RETIRE, str(action.because))
            elif isinstance(action, r.StartWorker):
                self._spawn(self._start(action.number))
            elif isinstance(action, r.RetryLater):
                asyncio.get_running_loop().call_later(action.seconds, self._dispatch, r.RetryDue(action.number))
            elif isinstance(action, r.Finish):
                if action.tell_predecessor:
                    self.channel.send(ROLLED)
                if self._listening is not None and self._listening is not asyncio.current_task():
                    self._listening.cancel()
                if self.channel is not None:
                    self.channel.sock.close()
                self.finished.set()

    async def _listen(self) -> None:
        while not self.machine.done:
            word, detail = await self.channel.next_message()
            if word == RETIRED:
                pid, _, left = detail.partition(" ")
                self._dispatch(r.OldRetired(int(pid or 0), int(left or 0)))
            elif word == "eof":
                if not self.machine.done:
                    self._dispatch(r.PredecessorGone())
                return

    async def _start(self, number: int) -> None:
        from graceful_http.workers import WorkerStartFailed

        if not self.pool.accepting:  # stopping: the rollout ends here
            self.finished.set()
            return
        try:
            await self.pool.start_worker(number)
        except (WorkerStartFailed, OSError) as exc:
            self._dispatch(r.NewWorkerFailed(number, str(exc)))
            return
        self._dispatch(r.NewWorkerReady(number))

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class RetirementDriver:
    """The old main's side: retire one worker per request; end with `Complete` or `Restore`."""

    def __init__(self, pool, channel: LineChannel, successor_pid: int):
        self.pool = pool
        self.channel = channel
        self.successor_pid = successor_pid
        self.machine = r.Retirement()
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> r.Complete | r.Restore:
        while True:
            word, _ = await self.channel.next_message()
            if word == RETIRE:
                event = r.RetireRequested(self.pool.serving_workers())
            elif word == ROLLED:
                event = r.Rolled()
            elif word == "eof":
                event = r.SuccessorGone(self.successor_pid)
            else:
                continue
            for action in self.machine.handle(event):
                if isinstance(action, (r.Complete, r.Restore)):
                    return action
                self._carry_out(action)

    def _carry_out(self, action) -> None:
        if isinstance(action, r.Log):
            _log(action)
        elif isinstance(action, r.ReplyRetired):
            self.channel.send(RETIRED, f"{action.pid} {action.left}")
        elif isinstance(action, r.DrainWorker):
            if action.pid not in self.pool.workers:  # it died just now (and is being replaced): retired all the same
                for reply in self.machine.handle(r.WorkerExited(action.pid, len(self.pool.serving_workers()))):
                    self._carry_out(reply)
                return
            exited = self.pool.retire(action.pid, self.successor_pid)
            task = asyncio.get_running_loop().create_task(self._until_exited(action.pid, exited))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _until_exited(self, pid: int, exited: asyncio.Future) -> None:
        await exited
        for action in self.machine.handle(r.WorkerExited(pid, len(self.pool.serving_workers()))):
            self._carry_out(action)
