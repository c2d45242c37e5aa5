"""Idle keep-alive connections kept in systemd's file-descriptor store, pure: what to store, what to take out.

systemd keeps the descriptors a service stores (`FDSTORE=1`, each with an
`FDNAME=`) across `systemctl restart` and across a crash with `Restart=`, and
hands them back at the next start after the socket units' ones, named, in
`LISTEN_FDS`/`LISTEN_FDNAMES`. The next start adopts them as a new generation
adopts handed-over connections at a reload. Stored connections are named
`conn-<pid>-<n>`, which no socket unit's `FileDescriptorName=` of ours is.

What may be in the store: a connection idle between two requests (see
`movable`), and only while it is. A stored copy of a closed connection keeps
it open (the client never sees a FIN), and a stored copy of a busy one would
be adopted after a crash with its request half consumed, so a connection is
taken out (`FDSTOREREMOVE=1`) the moment it closes or a byte of its next
request arrives. A message per request would cost a syscall per keep-alive
request, so a connection is stored only once it has been idle `settle`
seconds: one that is busy all the time costs nothing, one with long pauses
two messages per pause. A crash loses what was not idle that long (and every
request in flight). A stopping main (a restart is a stop, then a start) stores
the idle connections its drain would otherwise close.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CONNECTION_PREFIX = "conn-"
SETTLE = 1.0  # seconds a connection must have been idle before it is stored
CAPACITY_VARIABLE = "FDSTORE"  # systemd >= 254 sets it to FileDescriptorStoreMax=; the shipped unit sets it for 252


def capacity(environ: Mapping[str, str]) -> int:
    """How many descriptors systemd will keep for us (0: no store, or not told)."""
    text = environ.get(CAPACITY_VARIABLE, "")
    return int(text) if text.isascii() and text.isdigit() else 0


def is_connection_name(name: str) -> bool:
    """Is this passed descriptor one of our stored connections (not a listening socket)?"""
    return name.startswith(CONNECTION_PREFIX)


@dataclass(frozen=True)
class Candidate:
    """One open connection, as the store sees it."""

    key: int
    idle: bool  # may move to another process now (`movable.Verdict.MOVE`)
    idle_since: float  # monotonic: when it last received a byte (or was opened, or adopted)


@dataclass
class Plan:
    store: list[tuple[int, str]] = field(default_factory=list)  # (key, new name)
    remove: list[tuple[int, str]] = field(default_factory=list)  # (key, its name)


class StoreBook:
    """Which of our connections are in the store, under which name; and the decisions.

    The book holds only connections this process serves. One that leaves
    (handed over, or stored for good at a stop) is `forget`-ten: its entry
    stays in the store, or was withdrawn before, by whoever decided so.
    """

    def __init__(self, pid: int, capacity: int, settle: float = SETTLE):
        self.pid = pid
        self.capacity = capacity
        self.settle = settle
        self.stored: dict[int, str] = {}
        self.left_in_store = 0  # entries of connections that left us but stay stored (a stop)
        self._next = 0

    def new_name(self) -> str:
        self._next += 1
        return f"{CONNECTION_PREFIX}{self.pid}-{self._next}"

    def room(self) -> int:
        return max(0, self.capacity - len(self.stored) - self.left_in_store)

    def record(self, key: int, name: str) -> None:
        """`key` is in the store as `name` (we stored it, or it came back from the store)."""
        self.stored[key] = name

    def taken_out(self, key: int) -> str | None:
        """`key` closed or got busy: the name to remove from the store, if it was stored."""
        return self.stored.pop(key, None)

    def forget(self, key: int, still_stored: bool) -> None:
        """`key` left this process without closing; `still_stored`: its entry stays (counted against room)."""
        if self.stored.pop(key, None) is not None and still_stored:
            self.left_in_store += 1

    def plan(self, candidates: Iterable[Candidate], now: float) -> Plan:
        """Store what has been idle `settle` seconds (as far as there is room), take out what is not idle.

        Busy connections are normally taken out the moment they get busy
        (`taken_out`); this catches any state the engine changed otherwise.
        """
        plan = Plan()
        waiting = []
        for candidate in candidates:
            name = self.stored.get(candidate.key)
            if name is not None and not candidate.idle:
                plan.remove.append((candidate.key, name))
            elif name is None and candidate.idle and now - candidate.idle_since >= self.settle:
                waiting.append(candidate)
        for key, _ in plan.remove:
            del self.stored[key]
        waiting.sort(key=lambda c: c.idle_since)  # the longest idle first: the likeliest to survive a crash
        for candidate in waiting[:self.room()]:
            name = self.new_name()
            self.stored[candidate.key] = name
            plan.store.append((candidate.key, name))
        return plan

    def withdraw_all(self) -> list[str]:
        """Everything we stored, to be taken out (another generation takes our connections over)."""
        names = list(self.stored.values())
        self.stored.clear()
        return names
