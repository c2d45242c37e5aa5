"""Passing live connections from an old generation to a new one: the descriptor channel.

Over a connected unix stream socket the old generation (`Handover`) sends
batches of connection descriptors (SCM_RIGHTS) and the new one (`Adoption`)
answers each batch with how many it took. Stop and wait: one batch in flight
at a time, so a batch's descriptors always arrive with its own line, and the
sender knows at every moment which descriptors the receiver owns.

The sender closes its copies only once they are acknowledged. If the
receiver dies before acknowledging, the kernel closes its copies and ours
keep the connections open: the sender takes them back and drains them itself.
A batch is never taken back without that certainty (an end of the channel),
so a connection is never served by two processes.

Where: each serving process of a new generation (its main, or each of its
workers) listens on an abstract unix address named after the generation's
main pid and its own index (`adoption_address`); the old generation's
serving processes connect to every one there is (`connect_all`), so the
connections spread over the new workers. Both ends check that the other runs
as the same user. A new generation without the feature has no such address:
the old one finds nothing and drains lame-duck style, as before.

Which receiver gets a connection: the one holding the fewest. A worker rollout
hands the first old worker's connections to the only new worker there is yet;
spread evenly over every receiver, the last old worker's would then pile onto the
first new worker too, and each reload would skew the split further (measured:
26/24, then 38/12, 44/6, 47/3, 49/1 over four reloads; the balancing of new
connections never moves a kept-alive one). So each receiver says at the
offer how many connections it serves, and the sender fills the emptiest first.

Lines (sender → receiver): `handover <version>`, `conns <n>` (with n
descriptors), `done <handed over> <fell back>` (the sender's drain, counted).
Receiver → sender: `adopting <version> <connections it serves>` (or nothing, if
it does not know the feature: the sender falls back; a receiver that gives no
count is taken to serve none), `took <k>` (the first k of the batch; the rest
were lost in transit and stay the sender's).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger("graceful_http")

VERSION = 1
MAX_BATCH = 200  # descriptors per message; the kernel's limit is 253
HELLO_TIMEOUT = 5.0
MAX_ADOPTERS = 256  # how many adoption addresses a sender looks for, at most
MAX_GAP = 4  # after this many missing addresses in a row, there are no more
_LINE_MAX = 256


class ChannelClosed(Exception):
    """The other side closed the channel (or it broke)."""


def encode(word: str, *numbers: int) -> bytes:
    return " ".join([word, *map(str, numbers)]).encode() + b"\n"


def decode(line: bytes) -> tuple[str, list[int]]:
    """(word, numbers) of one line; numbers that are not numbers make the line meaningless."""
    word, *rest = line.decode(errors="replace").split() or [""]
    try:
        return word, [int(n) for n in rest]
    except ValueError:
        return "", []


def fill_emptiest(count: int, serving: list[int]) -> list[int]:
    """How many of `count` connections each receiver gets, receivers serving `serving` connections: one at a
    time to whichever serves fewest then (the first of those on a tie), so the counts end as even as they can."""
    shares = [0] * len(serving)
    for _ in range(count if serving else 0):
        emptiest = min(range(len(serving)), key=lambda index: serving[index] + shares[index])
        shares[emptiest] += 1
    return shares


class _Lines:
    """Line reading and writing, with descriptors, on a non-blocking unix stream socket in the running loop."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)
        self._buffer = b""
        self._fds: list[int] = []

    async def _wait(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.sock.fileno()
        add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
        add(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            remove(fd)

    async def send(self, data: bytes, fds: list[int] = ()) -> None:
        while True:
            try:
                sent = socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
            except BlockingIOError:
                await self._wait(writable=True)
                continue
            except OSError as exc:
                raise ChannelClosed(str(exc)) from None
            data, fds = data[sent:], ()  # the descriptors went with the first byte
            if not data:
                return

    async def receive(self) -> tuple[bytes, list[int]]:
        """The next line and the descriptors that came with it."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > _LINE_MAX:
                raise ChannelClosed("a line too long on the handover channel")
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, MAX_BATCH, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                await self._wait(writable=False)
                continue
            except OSError as exc:
                raise ChannelClosed(str(exc)) from None
            for fd in fds:  # never inherited by a process we start (MSG_CMSG_CLOEXEC is not always honoured)
                os.set_inheritable(fd, False)
            self._fds.extend(fds)
            if not data:
                raise ChannelClosed("closed")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        fds, self._fds = self._fds, []
        return line, fds

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.sock.close()


class Handover:
    """The old generation's end: offer the feature, then send connections."""

    def __init__(self, sock: socket.socket):
        self._lines = _Lines(sock)
        self._lock = asyncio.Lock()
        self.accepted = False
        self.broken = False
        self.serving = 0  # connections the other side serves, as it said at the offer, plus those we sent since

    async def negotiate(self, timeout: float = HELLO_TIMEOUT) -> bool:
        """True if the other side adopts connections (an older version says nothing, or closes)."""
        try:
            await self._lines.send(encode("handover", VERSION))
            line, fds = await asyncio.wait_for(self._lines.receive(), timeout)
        except (ChannelClosed, asyncio.TimeoutError):
            self.broken = True
            return False
        for fd in fds:
            os.close(fd)
        word, numbers = decode(line)
        self.accepted = word == "adopting" and bool(numbers) and numbers[0] >= 1
        self.serving = max(numbers[1], 0) if self.accepted and len(numbers) > 1 else 0
        return self.accepted

    @property
    def usable(self) -> bool:
        return self.accepted and not self.broken

    async def send(self, fds: list[int]) -> int:
        """Send these connection descriptors; return how many the other side took (the first ones).

        Taken descriptors are closed here; the others (`fds[taken:]`) stay
        open and are the caller's to serve: the channel broke, or the other
        side did not get them all. It waits for the answer as long as it
        takes: only an answer or the channel's end says who owns them.
        """
        taken = 0
        async with self._lock:
            while taken < len(fds) and self.usable:
                batch = fds[taken:taken + MAX_BATCH]
                try:
                    took = await self._send_batch(batch)
                except ChannelClosed:
                    self.broken = True
                    break
                for fd in batch[:took]:
                    os.close(fd)
                taken += took
                self.serving += took
                if took < len(batch):
                    break
        return taken

    async def _send_batch(self, batch: list[int]) -> int:
        await self._lines.send(encode("conns", len(batch)), batch)
        line, stray = await self._lines.receive()
        for fd in stray:
            os.close(fd)
        word, numbers = decode(line)
        if word != "took" or len(numbers) != 1 or not 0 <= numbers[0] <= len(batch):
            # Not our protocol (the version was agreed on, so this is not a peer we know): keep ours.
            raise ChannelClosed(f"unexpected answer on the handover channel: {line[:80]!r}")
        return numbers[0]

    async def finish(self, handed_over: int = 0, fell_back: int = 0) -> None:
        """Say there is nothing more (and, for the other side's metrics, how this drain went), and close."""
        async with self._lock:
            if self.accepted and not self.broken:
                try:
                    await self._lines.send(encode("done", handed_over, fell_back))
                except ChannelClosed:
                    pass
            self._lines.close()


class Adoption:
    """The new generation's end: answer the offer, take connections until the sender is done."""

    def __init__(self, sock: socket.socket, adopt: Callable[[socket.socket], Awaitable[None] | None],
                 reported: Callable[[int, int], None] | None = None, serving: Callable[[], int] = lambda: 0):
        self._lines = _Lines(sock)
        self._adopt = adopt
        self._reported = reported
        self._serving = serving
        self.adopted = 0

    async def run(self) -> int:
        """Serve the channel until `done` or its end; return how many connections were taken (once every one
        of them is set up)."""
        adopting: list[asyncio.Future] = []
        try:
            await self._take_batches(adopting)
        except ChannelClosed:
            pass
        finally:
            self._lines.close()
            if adopting:
                await asyncio.gather(*adopting)
        return self.adopted

    async def _take_batches(self, adopting: list[asyncio.Future]) -> None:
        line, fds = await self._lines.receive()
        self._close_all(fds)
        word, numbers = decode(line)
        if word != "handover" or not numbers:
            return
        await self._lines.send(encode("adopting", VERSION, self._serving()))
        while True:
            line, fds = await self._lines.receive()
            word, numbers = decode(line)
            if word != "conns":
                self._close_all(fds)
                if word == "done" and len(numbers) == 2 and self._reported is not None:
                    self._reported(*numbers)
                return
            # Ours from the moment they arrived: acknowledge first (the sender may close its copies), then
            # set them up, each on its own, while the next batch is read: one after the other, each waiting
            # a loop turn for its transport (in which the others' requests are served), the last of a batch,
            # and the whole next batch, waited for them all.
            await self._lines.send(encode("took", len(fds)))
            adopting.extend(asyncio.ensure_future(self._adopt_one(fd)) for fd in fds)

    async def _adopt_one(self, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        try:
            result = self._adopt(sock)
            if result is not None:
                await result
        except Exception:  # noqa: BLE001 - one connection's failure must not end the channel
            log.exception("could not serve a connection handed over by the previous generation")
            sock.close()
            return
        self.adopted += 1

    @staticmethod
    def _close_all(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)


# ---- where: the new generation's adoption points -------------------------------------------------


def adoption_address(main_pid: int, index: int) -> bytes:
    """The abstract unix address where serving process `index` (from 1) of the generation whose main is
    `main_pid` adopts connections. Named after the pid namespace too, like the control socket."""
    namespace = os.stat("/proc/self/ns/pid").st_ino
    return f"\0graceful-http/{namespace}/{main_pid}/adopt/{index}".encode()


def same_user(sock: socket.socket) -> bool:
    """Is the process at the other end of this unix socket running as our user (SO_PEERCRED)?"""
    import struct

    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid == os.geteuid()


class AdoptionPoint:
    """A new generation's serving process: adopt the connections the old generation sends here."""

    def __init__(self, main_pid: int, index: int, adopt: Callable[[socket.socket], Awaitable[None] | None],
                 reported: Callable[[int, int], None] | None = None, serving: Callable[[], int] = lambda: 0):
        self.address = adoption_address(main_pid, index)
        self._adopt = adopt
        self._reported = reported
        self._serving = serving
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self.adopted = 0

    def open(self) -> None:
        """Listen (before this process reports ready: the old generation may send as soon as it is told)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            listener.bind(self.address)
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("adoption point: accept failed: %s", exc)
            return
        if not same_user(sock):
            log.warning("refused a connection handover from a process of another user")
            sock.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        adoption = Adoption(sock, self._adopt, self._reported, self._serving)
        try:
            await adoption.run()
        finally:
            self.adopted += adoption.adopted

    def receiving(self) -> bool:
        """Is a sender still connected (it may hand us more connections)?"""
        return bool(self._tasks)

    def close(self) -> None:
        """Take no more channels (those open go on until their sender is done)."""
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None


async def connect_all(main_pid: int, timeout: float = HELLO_TIMEOUT) -> list[Handover]:
    """Channels to every adoption point of the generation whose main is `main_pid` that accepts
    connections; none if it has no such point (an older version) or refuses.

    Found first, then asked all at once: each question is a round trip through both loops, and this one
    serves its clients meanwhile (asked one after the other, with every address tried awaited, a one-process
    main took 8 to 35 ms of a loaded reload to find its successor's one point, its listeners already closed)."""
    channels = [Handover(sock) for sock in await _connect_points(main_pid, timeout)]
    accepted = await asyncio.gather(*(channel.negotiate(timeout) for channel in channels))
    for channel, adopts in zip(channels, accepted):
        if not adopts:
            await channel.finish()
    return [channel for channel, adopts in zip(channels, accepted) if adopts]


async def _connect_points(main_pid: int, timeout: float) -> list[socket.socket]:
    """A connected socket to each adoption point there is (numbered from 1; a gap is a worker being replaced,
    MAX_GAP missing in a row end the search), of our own user."""
    points = []
    missing = 0
    for index in range(1, MAX_ADOPTERS + 1):
        address = adoption_address(main_pid, index)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            try:
                sock.connect(address)  # done or refused at once, unless the point's backlog is full
            except BlockingIOError:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), timeout)
        except (OSError, asyncio.TimeoutError):
            sock.close()
            missing += 1
            if missing == MAX_GAP:
                break
            continue
        missing = 0
        if not same_user(sock):
            log.warning("the adoption point %d of pid %d runs as another user: not handing connections to it",
                        index, main_pid)
            sock.close()
            continue
        points.append(sock)
    return points
