"""The private handoff channel between an old generation's main and its successor: both ends.

A unix socketpair: the successor inherits one end (`Inherited.handoff_fd`)
and says `ready` once it accepts connections, or
`failed <reason>` if it cannot start. The old main then makes it the main
process in systemd's eyes and answers `main`; only after that may the
successor talk to systemd (NotifyAccess=main would drop its messages and log
a warning otherwise). The successor confirms with `serving` once it acts as
main (it accepts reload requests); only then does the old main write the
pid file, stop accepting and report the reload done, so whoever sees the pid
file change or hears "done" may reload again at once.
"""

from __future__ import annotations

import asyncio
import os
import socket

from graceful_http.inherited import Inherited
from graceful_http.startpriority import leave_idle_start
from graceful_http.wire import ADOPTS, CANARY, COUNTS, FAILED, MAIN, READY, REJECTED, ROLLOUT, SERVING, decode, encode

CONFIRM_TIMEOUT = 5.0
COUNTS_INTERVAL = 0.25


class PredecessorLink:
    """A new generation's link to the main it replaces: report readiness, wait to become main."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.rollout_agreed = False  # the old main said `main rollout`: it retires its workers one by one
        self.rejected: str | None = None  # the old main's canary found us worse: why

    @classmethod
    def from_inherited(cls, inherited: Inherited) -> PredecessorLink | None:
        if inherited.handoff_fd is None:
            return None
        os.set_inheritable(inherited.handoff_fd, False)
        return cls(socket.socket(fileno=inherited.handoff_fd))

    def report_failed(self, reason: str) -> None:
        try:
            self.sock.sendall(encode(FAILED, reason))
        except OSError:
            pass  # the old generation is gone; nobody to tell

    async def report_ready_and_wait_until_main(self, adopts: bool = False, rollout: bool = False,
                                               counts=None) -> bool:
        """True once the old main has handed over (then `confirm_serving`); False if it went away first.
        `adopts`: we take over its keep-alive connections (see `handover`); `rollout`: we started one worker
        and want its workers retired one by one (see `rollout`). An older main ignores the words. If the old
        main runs a canary first, we report `counts()` (requests, failed) to it meanwhile."""
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        words = " ".join(word for word, wanted in ((ADOPTS, adopts), (ROLLOUT, rollout)) if wanted)
        reporting = None
        try:
            leave_idle_start()  # we serve from now on (see `startpriority`)
            await loop.sock_sendall(self.sock, encode(READY, words))
            data = b""
            while True:
                while b"\n" not in data:
                    chunk = await loop.sock_recv(self.sock, 256)
                    if not chunk:
                        self.close()
                        return False
                    data += chunk
                line, _, data = data.partition(b"\n")
                word, detail = decode(line)
                if word != CANARY:
                    break
                if reporting is None:
                    reporting = loop.create_task(self._report_counts(counts or (lambda: (0, 0))))
        except OSError:
            self.close()
            return False
        finally:
            if reporting is not None:
                reporting.cancel()
        self.rollout_agreed = rollout and ROLLOUT in detail.split()
        if word == REJECTED:
            self.rejected = detail or "rejected by the previous generation"
        return word == MAIN

    async def _report_counts(self, counts) -> None:
        loop = asyncio.get_running_loop()
        while True:
            requests, failed = counts()
            await loop.sock_sendall(self.sock, encode(COUNTS, f"{requests} {failed}"))
            await asyncio.sleep(COUNTS_INTERVAL)

    def confirm_serving(self, keep_open: bool = False) -> None:
        """Tell the old main we act as main now, and close the channel (unless a rollout goes on over it)."""
        try:
            self.sock.setblocking(True)
            self.sock.sendall(encode(SERVING))
        except OSError:
            pass
        if not keep_open:
            self.close()

    def close(self) -> None:
        self.sock.close()


class SuccessorLink:
    """An old main's link to the new generation it starts: learn its fate, then hand over."""

    def __init__(self):
        self.mine, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.mine.setblocking(False)
        self._buffer = b""

    def close_theirs(self) -> None:
        self.theirs.close()

    async def next_message(self) -> tuple[str, str]:
        """The successor's next line: (`ready`|`failed`, detail), or ("eof", "") when it closed."""
        loop = asyncio.get_running_loop()
        while b"\n" not in self._buffer:
            try:
                chunk = await loop.sock_recv(self.mine, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                return ("eof", "")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return decode(line)

    def pending_failure(self) -> str | None:
        """A `failed` line already sent but not yet read (the successor may exit right after)."""
        try:
            self._buffer += self.mine.recv(65536)
        except (BlockingIOError, OSError):
            pass
        for line in self._buffer.split(b"\n"):
            word, detail = decode(line)
            if word == FAILED:
                return detail
        return None

    def tell_main(self, rollout: bool = False) -> None:
        try:
            self.mine.send(encode(MAIN, ROLLOUT if rollout else ""))  # a few bytes into an empty socket buffer: never blocks
        except OSError:
            pass  # it is gone: waiting for its confirmation will say so

    async def serving_confirmed(self, timeout: float = CONFIRM_TIMEOUT) -> bool:
        """True once the successor says it serves as main (milliseconds after `tell_main`); False if it
        closed the channel or said nothing within `timeout`."""
        async def next_but_counts():
            word = COUNTS
            while word == COUNTS:  # a canary's last reports may still come
                word, _ = await self.next_message()
            return word

        try:
            word = await asyncio.wait_for(next_but_counts(), timeout)
        except asyncio.TimeoutError:
            return False
        return word == SERVING

    def reject(self, reason: str) -> None:
        try:
            self.mine.send(encode(REJECTED, reason))
        except OSError:
            pass

    def start_canary(self) -> None:
        try:
            self.mine.send(encode(CANARY))
        except OSError:
            pass  # it is gone: reading says so

    async def counts_during(self, seconds: float) -> tuple[int, int] | None:
        """The successor's last (requests, failed) after `seconds` of reports; None if it closed the channel."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        latest = (0, 0)
        while (remaining := deadline - loop.time()) > 0:
            try:
                word, detail = await asyncio.wait_for(self.next_message(), remaining)
            except asyncio.TimeoutError:
                break
            if word == "eof":
                return None
            if word == COUNTS:
                numbers = detail.split()
                if len(numbers) == 2 and all(n.isdigit() for n in numbers):
                    latest = (int(numbers[0]), int(numbers[1]))
        return latest

    def buffered(self) -> bytes:
        """What was read past the last line returned (a rollout's channel goes on from there)."""
        return self._buffer

    def close(self) -> None:
        self.mine.close()
        self.theirs.close()
