"""The fd store's adapter: the app's engine on one side, sd_notify (systemd-python) on the other.

The decisions are `fdstore.StoreBook`'s. Here: a timer that asks the book
every half `settle` which idle connections to store; the engine protocol's
hooks (a stored connection got a byte, closed, or is leaving this process);
adopting what the store handed back at start; withdrawing everything before a
reload hands the main PID on (the new generation takes the connections over
and stores them under its own names; the old one may not talk to systemd
once it is no longer main); and, at a stop, the lame-duck drain's idle
connections go into the store instead of being closed, for the next start.

Only the main process talks to systemd (`NotifyAccess=main`), so this runs
where the main serves itself; with `--workers` the connections live in the
workers and are not stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence

from graceful_http.fdstore import Candidate, StoreBook, capacity
from graceful_http.movable import Verdict

log = logging.getLogger("graceful_http")

Send = Callable[[str, Sequence[int]], bool]


def notify(text: str, fds: Sequence[int] = ()) -> bool:
    from systemd import daemon

    return daemon.notify(text, fds=list(fds)) if fds else daemon.notify(text)


def remove_names(names, send: Send = notify) -> None:
    for name in names:
        send(f"FDSTOREREMOVE=1\nFDNAME={name}", ())


def _inode(sock) -> int | None:
    try:
        return os.fstat(sock.fileno()).st_ino
    except (OSError, ValueError):
        return None


class ConnectionStore:
    """Keeps the store in step with the idle keep-alive connections of one engine (the app's)."""

    def __init__(self, engine, capacity: int, pid: int, send: Send = notify):
        self.engine = engine
        self.book = StoreBook(pid, capacity)
        self._send = send
        self.active = False  # main, and not handing over or stopping: the timer stores
        self._stopping = False  # connections leave into the store (a stop), not to a new generation
        self._task: asyncio.Task | None = None
        self._first_seen: dict[int, float] = {}
        self._left_inodes: set[int] = set()  # connections stored before they left at a stop
        self.messages = 0  # sd_notify messages sent, for the benchmark and the tests
        self.kept = 0  # idle connections put in the store at a stop
        engine.server.server_state.fd_store = self  # where the protocol's hooks find us

    # ---- the protocol's hooks (engine.tracked_protocol) ----

    def got_busy_or_closed(self, connection) -> None:
        connection.fd_name = None
        name = self.book.taken_out(id(connection))
        if name is not None:
            self._remove(name)

    def leaving(self, connection) -> None:
        """It leaves this process without closing (detached): its entry stays only if we stop."""
        connection.fd_name = None
        if id(connection) in self.book.stored and self._stopping:
            inode = _inode(connection.transport.get_extra_info("socket"))
            if inode is not None:
                self._left_inodes.add(inode)
        self.book.forget(id(connection), still_stored=self._stopping)

    # ---- lifecycle ----

    async def adopt_restored(self, restored: list[tuple[str, socket.socket | None]]) -> int:
        """Serve the connections the store handed back, each staying stored under its name while idle."""
        adopted = 0
        for name, sock in restored:
            if sock is None:
                self._remove(name)
                continue
            try:
                protocol = await self.engine.adopt(sock)
            except OSError as exc:
                log.debug("fd store: could not adopt %s: %s", name, exc)
                self._remove(name)
                continue
            if protocol.transport.is_closing():
                self._remove(name)
                continue
            self.book.record(id(protocol), name)
            protocol.fd_name = name
            adopted += 1
        self.sync()  # any that got a byte meanwhile comes out now
        if restored:
            log.info("adopted %d keep-alive connection(s) from systemd's fd store", adopted)
        return adopted

    def start(self) -> None:
        """Main now: keep the store up to date."""
        self.active = True
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _stop_timer(self) -> None:
        self.active = False
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def withdraw(self) -> None:
        """Before the main PID moves to a new generation: take everything out, store nothing more."""
        self._stop_timer()
        for connection in self.engine.connections:
            if getattr(connection, "fd_name", None) is not None:
                connection.fd_name = None
        names = self.book.withdraw_all()
        for name in names:
            self._remove(name)
        if names:
            log.debug("fd store: withdrew %d connection(s) before the handover", len(names))

    def resume(self) -> None:
        """The handover failed: main again."""
        self.start()

    def stopping(self) -> None:
        """At a stop (or the stop half of a restart): connections the lame-duck drain would close once idle
        go into the store instead, for the next start (`keep`). Busy ones are answered with
        `Connection: close` as ever: a plain stop closes the store, and a request sent on a stored
        connection then would be lost, while a reconnect waits in the socket unit's backlog."""
        if not self.active:
            return
        self._stop_timer()
        self._stopping = True
        self.engine.idle_keeper = self.keep

    def keep(self, connection) -> bool:
        """Put this idle connection in the store and let go of it (True), or leave it to be closed (False)."""
        fd = self.engine.detach(connection)  # None unless idle and movable; a stored one stays stored (`leaving`)
        if fd is None:
            return False
        inode = os.fstat(fd).st_ino
        if inode in self._left_inodes:
            self._left_inodes.discard(inode)
        elif self.book.room() > 0 and self._store(self.book.new_name(), fd):
            self.book.left_in_store += 1
        else:
            log.debug("fd store: full; an idle connection is closed")
        os.close(fd)  # the store's copy keeps it open; without one, this closes it, as the drain would have
        self.kept += 1
        if self.kept == 1:
            log.info("stopping: idle keep-alive connections go into systemd's fd store for the next start")
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.book.settle / 2)
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the store is a nicety: serving goes on
                log.exception("fd store: could not update")

    def sync(self, now: float | None = None) -> None:
        """Store what has been idle long enough, take out what is not idle."""
        now = time.monotonic() if now is None else now
        by_key = {}
        candidates = []
        seen = {}
        for connection in self.engine.connections:
            key = id(connection)
            if not hasattr(connection, "handover_state") or getattr(connection, "lame_duck", False):
                continue  # a WebSocket's protocol, or one that drains here
            by_key[key] = connection
            seen[key] = self._first_seen.get(key, now)
            idle_since = max(getattr(connection, "last_data_at", 0.0), seen[key])
            candidates.append(Candidate(key, self.engine.movable(connection)[0] is Verdict.MOVE, idle_since))
        self._first_seen = seen
        plan = self.book.plan(candidates, now)
        for key, name in plan.remove:
            by_key[key].fd_name = None
            self._remove(name)
        for key, name in plan.store:
            connection = by_key[key]
            sock = connection.transport.get_extra_info("socket")
            if self._store(name, sock.fileno()):
                connection.fd_name = name
            else:
                self.book.taken_out(key)

    def _store(self, name: str, fd: int) -> bool:
        self.messages += 1
        return self._send(f"FDSTORE=1\nFDNAME={name}", [fd])

    def _remove(self, name: str) -> None:
        self.messages += 1
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", ())


def discard_restored(restored: list[tuple[str, socket.socket | None]], send: Send = notify) -> None:
    """Close connections the store handed back that nobody here can serve, and take them out of the store."""
    for name, sock in restored:
        if sock is not None:
            sock.close()
        send(f"FDSTOREREMOVE=1\nFDNAME={name}", ())
    restored.clear()


def open_connection_store(servers, restored, pid: int, environ=os.environ) -> ConnectionStore | None:
    """The store for the app's engine, if systemd keeps one for us ($FDSTORE) or handed connections back."""
    engine = next((server for server in servers if getattr(server, "adopts_connections", False)), None)
    room = capacity(environ)
    if engine is None or not environ.get("NOTIFY_SOCKET"):
        if restored and environ.get("NOTIFY_SOCKET"):
            discard_restored(restored)
        return None
    if not room and not restored:
        return None
    return ConnectionStore(engine, room, pid)
