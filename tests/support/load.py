"""A real HTTP load for end-to-end tests: clients that never retry, so every failure counts.

Half the clients open a new connection per request, half keep one
connection alive (reconnecting only when the server said `Connection:
close`), which is what exposes a draining server that closes idle
keep-alive connections under a client's feet.
"""

from __future__ import annotations

import collections
import http.client
import re
import threading
import time
from dataclasses import dataclass, field

PID_PATTERN = re.compile(rb"pid:(\d+)")


@dataclass
class LoadResult:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    pids: collections.Counter = field(default_factory=collections.Counter)

    def summary(self) -> str:
        return f"{self.ok} ok, {len(self.failures)} failed, pids {dict(self.pids)}; first failures: {self.failures[:5]}"


def get(host: str, port: int, path: str = "/", timeout: float = 30.0, method: str = "GET") -> tuple[int, bytes, dict]:
    """One request on a fresh connection: (status, body, headers)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def pid_of(body: bytes) -> int | None:
    match = PID_PATTERN.search(body)
    return int(match.group(1)) if match else None


class ClientThreads:
    """Client threads against a server until stopped, as a context manager: `_threads` run the clients and
    count what succeeded in `result.ok` (a result with `summary()`)."""

    _threads: list[threading.Thread]
    _stop: threading.Event

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.result

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> None:
        """Block until `count` more requests have succeeded (proves the load is flowing)."""
        target = self.result.ok + count
        deadline = time.monotonic() + timeout
        while self.result.ok < target:
            self._check_progress()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the clients made no progress: {self.result.summary()}")
            time.sleep(0.01)

    def _check_progress(self) -> None:
        """Raise if what the clients saw so far already fails the test (by default nothing does)."""


class Load(ClientThreads):
    """Runs `clients` threads against host:port until stopped; use as a context manager."""

    def __init__(self, host: str, port: int, clients: int = 8, path: str = "/", pause: float = 0.002,
                 connect=None):
        """`connect()` makes a connection (default: plain HTTP to host:port; an HTTPSConnection for TLS)."""
        self.host, self.port, self.path, self.pause = host, port, path, pause
        self.connect = connect or (lambda: http.client.HTTPConnection(host, port, timeout=30))
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(index % 2 == 0,), daemon=True) for index in range(clients)
        ]


    def _record(self, ok: bool, detail) -> None:
        with self._lock:
            if ok:
                self.result.ok += 1
                self.result.pids[detail] += 1
            else:
                self.result.failures.append(detail)

    def _run(self, keep_alive: bool) -> None:
        connection = None
        while not self._stop.is_set():
            try:
                if connection is None:
                    connection = self.connect()
                connection.request("GET", self.path)
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    self._record(False, f"HTTP {response.status}: {body[:100]!r}")
                else:
                    self._record(True, pid_of(body))
                if not keep_alive or response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                kind = "keep-alive" if keep_alive else "new connection"
                self._record(False, f"{time.strftime('%H:%M:%S')} {kind}: {type(exc).__name__}: {exc}")
                if connection is not None:
                    connection.close()
                connection = None
            if self.pause:
                time.sleep(self.pause)
        if connection is not None:
            connection.close()
