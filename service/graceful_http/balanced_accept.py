"""Balanced workers, the adapter: the counts a generation's workers share, and a worker's own accept loop.

The counts live in one page of shared memory that the generation's main creates before it starts any worker
(a memfd: close-on-exec, so a new generation gets none of it). Every worker, forked or exec'd, is the main's
child and opens it through `/proc/<main>/fd`, so nothing has to be passed along. Each worker claims a slot
(its own index's if it is free, else the first free one: a worker being recycled still holds its index
while its replacement starts), holding a lock on it for as long as it lives; the kernel drops the lock of
a worker that dies, which is how its siblings tell that its slot is stale. (POSIX record locks: a fork of
the worker, e.g. the app's multiprocessing, does not inherit them; they would also go if the worker closed
any descriptor of the table, so it keeps its own open for as long as it lives.) In its slot a worker keeps its
pid while it accepts (0 otherwise), how many connections it holds (those it adopted at a handover
included), and when it last looked at the listening sockets (its count was fresh then: see `_readable`).

The accept loop replaces the event loop's own on the app's listening sockets: one connection per step,
while `balance.AcceptGate` allows it, each served exactly as uvicorn's server would serve it
(`Engine.serve_accepted`). It works on any event loop (asyncio, uvloop): it uses only `add_reader` and
`connect_accepted_socket`. With `--workers 1` none of this exists.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import socket
import sys
import time
from collections.abc import Callable

from graceful_http.balance import AcceptGate, burst_share
from graceful_http.fdlimit import ACCEPT_OUT_OF_RESOURCES

log = logging.getLogger("graceful_http")

TABLE_NAME = "graceful-http-balance"
TABLE_BYTES = 8192
SLOT_BYTES = 24  # three 8-byte words: the pid while accepting (0 otherwise), connections held, last look (ns)
RECHECK = 0.002  # seconds between looks at the backlog while this worker holds back
ACCEPT_RETRY_DELAY = 1.0  # out of descriptors: asyncio's own pause before accepting again
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def slot_count(workers: int) -> int:
    """Slots a generation of `workers` uses: its workers, and as many again for replacements starting."""
    return min(TABLE_BYTES // SLOT_BYTES, 2 * workers + 4)


def create_table() -> int:
    """In a generation's main, before its first worker starts: the shared page, as a descriptor to keep open."""
    fd = os.memfd_create(TABLE_NAME)  # close-on-exec
    os.ftruncate(fd, TABLE_BYTES)
    return fd


class SharedCounts:
    """A worker's view of its generation's table, holding one slot."""

    def __init__(self, fd: int, slots: int, slot: int, pid: int | None = None):
        self.fd = fd
        self.slots = slots
        self.slot = slot
        self.pid = pid or os.getpid()
        self._map = mmap.mmap(fd, TABLE_BYTES)
        self.words = memoryview(self._map).cast("q")

    @classmethod
    def attach(cls, main_pid: int, workers: int, index: int) -> SharedCounts:
        """Open the table of the main `main_pid` and claim a slot (worker `index`'s, from 1, if free);
        OSError if there is no table or no free slot."""
        fd = _open_table(main_pid)
        slots = slot_count(workers)
        preferred = (index - 1) % slots
        for slot in (preferred, *(s for s in range(slots) if s != preferred)):
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, SLOT_BYTES, slot * SLOT_BYTES)
            except OSError:
                continue
            counts = cls(fd, slots, slot)
            counts.words[3 * slot: 3 * slot + 3] = memoryview(bytes(SLOT_BYTES)).cast("q")
            return counts
        os.close(fd)
        raise OSError(errno.EBUSY, f"all {slots} slots of the table are taken")

    def accepting(self, held: int) -> None:
        """From now on this worker takes its share: count it."""
        self.words[3 * self.slot + 1] = held
        self.words[3 * self.slot] = self.pid

    def not_accepting(self) -> None:
        self.words[3 * self.slot] = 0

    def publish(self, held: int) -> None:
        self.words[3 * self.slot + 1] = held

    def looked(self, woke_ns: int) -> None:
        """This worker's count holds all that happened to its connections before `woke_ns`
        (time.monotonic_ns(): the same clock in every process)."""
        self.words[3 * self.slot + 2] = woke_ns

    def others(self) -> tuple[int, ...]:
        """Connections held by each other worker that accepts."""
        words, own = self.words, self.slot
        return tuple(words[3 * s + 1] for s in range(self.slots) if s != own and words[3 * s])

    def all_looked_since(self, since_ns: int) -> bool:
        """Do the counts of every other worker that accepts hold all that happened before `since_ns`?"""
        words, own = self.words, self.slot
        return all(words[3 * s + 2] >= since_ns for s in range(self.slots) if s != own and words[3 * s])

    def queued(self) -> tuple[float, ...]:
        """How long each other worker that accepts has waited for a CPU in all (seconds; in `others()`'s order)."""
        words, own = self.words, self.slot
        return tuple(time_queued(words[3 * s]) for s in range(self.slots) if s != own and words[3 * s])

    def forget_dead(self) -> int:
        """Clear the slots of workers that died while accepting (nobody holds their lock); how many."""
        cleared = 0
        for slot in range(self.slots):
            if slot == self.slot or not self.words[3 * slot]:
                continue
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, SLOT_BYTES, slot * SLOT_BYTES)
            except OSError:
                continue  # its worker lives
            self.words[3 * slot] = 0
            fcntl.lockf(self.fd, fcntl.LOCK_UN, SLOT_BYTES, slot * SLOT_BYTES)
            cleared += 1
        return cleared

    def close(self) -> None:
        self.not_accepting()
        self.words.release()
        self._map.close()
        os.close(self.fd)  # drops our lock: the slot is free


def time_queued(pid: int) -> float:
    """Seconds the process `pid` (its main thread: the event loop) has spent runnable but waiting for a CPU,
    from the scheduler's statistics; 0.0 where the kernel keeps none (or the process is gone)."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as stats:
            return int(stats.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _open_table(main_pid: int) -> int:
    directory = f"/proc/{main_pid}/fd"
    for entry in os.listdir(directory):
        try:
            target = os.readlink(f"{directory}/{entry}")
        except OSError:
            continue
        if target.startswith(f"/memfd:{TABLE_NAME} "):
            return os.open(f"{directory}/{entry}", os.O_RDWR | os.O_CLOEXEC)
    raise OSError(errno.ENOENT, f"main {main_pid} has no table of counts")


class BalancedAcceptor:
    """One worker's accept loop on the listening sockets it shares with its siblings."""

    def __init__(self, counts: SharedCounts, held: Callable[[], int], gate: AcceptGate | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.counts = counts
        self.held = held  # connections being served (uvicorn's count), besides those we are still setting up
        self.gate = gate or AcceptGate()
        self.clock = clock
        self.pending = 0  # accepted, not yet in uvicorn's count
        self._told_of: float | None = None  # the wait (its start) after which we took connections above our share
        self._unmade: set = set()  # protocols of accepted connections, not yet in uvicorn's count
        self.sockets: list[socket.socket] = []
        self._serve: Serve | None = None
        self._watching = False
        self._deferred = False  # an accept is due in two loop turns (see `_readable`)
        self._woke_ns = 0  # when the sockets were last found readable
        self._burst_began: int | None = None  # the wake-up that found new connections after none were waiting
        self._burst_share: int | None = None  # the most of them we take while a sibling has not looked since
        self._burst_taken = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_set_up: Callable[[], None] | None = None  # told as each pending connection is set up (or fails)

    def own(self) -> int:
        return self.held() + self.pending

    def start(self, sockets: list[socket.socket], serve: Serve) -> None:
        """Accept on `sockets`; `serve(sock, created)` serves one accepted connection, calling `created(protocol)`
        when it makes its protocol, and returns a future done once the connection is set up."""
        self._loop = asyncio.get_running_loop()
        self.sockets = list(sockets)
        self._serve = serve
        for sock in self.sockets:
            sock.setblocking(False)
        self.counts.forget_dead()  # e.g. the worker this one replaces, if it died while accepting
        self.counts.accepting(self.own())
        self._watch()

    def stop(self) -> None:
        """Accept nothing more (the sockets stay open: the engine closes them)."""
        self.counts.not_accepting()
        self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._serve = None
        self._burst_began = None

    def added(self, protocol) -> None:
        """uvicorn counts a connection from now on (see `WatchedSet`)."""
        if protocol in self._unmade:
            self._no_longer_pending(protocol)
        self.publish()

    def _no_longer_pending(self, protocol) -> None:
        """An accepted connection is set up (in uvicorn's count), or never will be."""
        self._unmade.discard(protocol)
        self.pending -= 1
        if self.on_set_up is not None:
            self.on_set_up()

    def publish(self, _protocol=None) -> None:
        """Say how many connections we hold: siblings see one gone at once, not at our next accept."""
        self.counts.publish(self.own())

    def _watch(self) -> None:
        if not self._watching and self._serve is not None:
            for sock in self.sockets:
                self._loop.add_reader(sock.fileno(), self._readable, sock)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())
            self._watching = False

    def _hold_back(self, delay: float) -> None:
        """Stop watching the sockets for `delay` seconds (level-triggered: watching them would spin)."""
        self._unwatch()
        if self._timer is None:
            self._timer = self._loop.call_later(delay, self._look_again)

    def _look_again(self) -> None:
        self._timer = None
        if self.gate.waiting_since is not None:
            self.counts.forget_dead()
        self._watch()

    def _readable(self, sock: socket.socket) -> None:
        """New connections wait: count first what this worker's clients closed meanwhile, then accept.

        A client's close reaches uvicorn's count two loop turns after its EOF is read (the transport closes,
        then calls `connection_lost` soon), and the EOFs of a client that closed its connections before
        opening new ones come in the same wake-up as the new ones. Counted stale, they inflated this worker's
        count, and so its sibling's share: bursts split 17/33 on a busy machine. The count is then as of this
        wake-up, which the slot's last look says (see `balance` for a sibling that has not looked yet)."""
        self._unwatch()  # level-triggered: watched meanwhile, it would wake every turn
        self._woke_ns = time.monotonic_ns()
        if not self._deferred:
            self._deferred = True
            self._loop.call_soon(self._loop.call_soon, self._accept_some, sock)

    def _accept_some(self, sock: socket.socket) -> None:
        self._deferred = False
        if self._serve is None:  # stopped meanwhile
            return
        self._watch()  # unless it holds back, which unwatches again
        counts, gate = self.counts, self.gate
        counts.looked(self._woke_ns)  # its count is current: every change to it is published as it happens
        if self._burst_began is None:
            self._burst_began, self._burst_taken = self._woke_ns, 0
            waiting = waiting_connections(sock)
            self._burst_share = None if waiting is None else burst_share(waiting, len(counts.others()) + 1, gate.slack)
        for _ in range(64):  # a bounded batch per wake-up, as asyncio's own loop does (there: the backlog)
            own = self.own()
            counts.publish(own)
            share_taken = (self._burst_share is not None and self._burst_taken >= self._burst_share
                           and not counts.all_looked_since(self._burst_began))
            if not gate.may_accept(own, counts.others(), self.clock(), counts.queued, share_taken):
                self._hold_back(RECHECK)
                return
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                self._burst_began = None  # none waiting: the next connection begins a burst
                return
            except (InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:  # reported once per interval (fdlimit.DescriptorWatch)
                    self._loop.call_exception_handler({"message": ACCEPT_OUT_OF_RESOURCES, "exception": exc,
                                                       "socket": sock})
                    self._hold_back(ACCEPT_RETRY_DELAY)
                else:
                    log.warning("accept failed: %s", exc)
                return
            if gate.waiting_since is not None and gate.waiting_since != self._told_of:  # above its share
                self._told_of = gate.waiting_since
                log.debug("worker takes new connections above its share: its siblings took none for %.2f s",
                          self.clock() - gate.waiting_since)
            conn.setblocking(False)  # as asyncio's own accept does: accept() hands back a blocking socket
            self._burst_taken += 1
            self.pending += 1
            counts.publish(own + 1)
            self._set_up(conn)

    def _set_up(self, conn: socket.socket) -> None:
        made = []

        def created(protocol) -> None:
            made.append(protocol)
            self._unmade.add(protocol)

        def done(future: asyncio.Future) -> None:
            if not made or made[0] in self._unmade:  # it never made it into uvicorn's count
                self._no_longer_pending(made[0] if made else None)
                self.publish()
            if not future.cancelled() and future.exception() is not None:
                log.debug("an accepted connection could not be set up: %s", future.exception())

        try:
            self._serve(conn, created).add_done_callback(done)
        except Exception:  # noqa: BLE001 - never let one connection end the accept loop
            conn.close()
            self.pending -= 1
            log.exception("could not serve an accepted connection")


def waiting_connections(sock: socket.socket) -> int | None:
    """How many connections wait in a listening TCP socket's backlog (the kernel's tcp_info tells it as
    `tcpi_unacked` for a listener); None for other sockets."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_UNACKED + 4)
    except OSError:
        return None
    return int.from_bytes(info[_TCP_INFO_UNACKED:_TCP_INFO_UNACKED + 4], sys.byteorder)


_TCP_INFO_UNACKED = 24  # offset of tcpi_unacked: 8 one-byte fields, then rto, ato, snd_mss, rcv_mss (4 bytes each)

Serve = Callable[[socket.socket, Callable[[object], None]], asyncio.Future]


class WatchedSet(set):
    """uvicorn's set of a server's connections (each protocol adds itself when made, discards itself when
    lost), telling `added(item)` and `discarded(item)` after each change."""

    def __init__(self, items, added: Callable[[object], None], discarded: Callable[[object], None]):
        super().__init__(items)
        self.added = added
        self.discarded = discarded

    def add(self, item) -> None:
        super().add(item)
        self.added(item)

    def discard(self, item) -> None:
        super().discard(item)
        self.discarded(item)


def for_worker(engine, main_pid: int, workers: int, index: int) -> BalancedAcceptor | None:
    """Have the app's `engine` accept through a balanced loop; None (the event loop's own accepting, as
    with uvicorn) if this worker cannot reach its generation's table."""
    try:
        counts = SharedCounts.attach(main_pid, workers, index)
    except OSError as exc:
        log.warning("workers not balanced: %s; this worker accepts as the kernel wakes it", exc.strerror or exc)
        return None
    acceptor = BalancedAcceptor(counts, lambda: len(engine.connections))
    engine.acceptor = acceptor
    return acceptor
