"""Keep-alive clients as naive as they come, for the connection-handover tests.

Each client opens one connection (Python's `http.client`) and uses it for its
whole life: it never checks it before reuse and never retries, so a
connection the server closes under it is a failed request, and any second
connection it has to open is a reconnect. Behaviours, one per client in
turn: `get`, `post` (a body of up to 64 KiB, checked by length and CRC in the
answer), `pipelined` (two requests written at once, two answers read), and
`eager` (no pause at all: it is nearly always busy, so some of its requests
arrive exactly when a generation starts draining). The others pause a random
0.05-0.5 s between requests. Answers come from `tests/apps/echo_app.py`.
"""

from __future__ import annotations

import collections
import http.client
import random
import re
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field

from support.load import ClientThreads

BEHAVIOURS = ("get", "post", "pipelined", "eager")
ANSWER = re.compile(r"pid:(\d+) path:(\S+) body:(\d+) crc:(\d+)")


class _Counting(http.client.HTTPConnection):
    def __init__(self, *args, on_connect, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_connect = on_connect

    def connect(self):
        self._on_connect()
        super().connect()


@dataclass
class NaiveResult:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    connects: int = 0
    pids: collections.Counter = field(default_factory=collections.Counter)
    by_behaviour: collections.Counter = field(default_factory=collections.Counter)

    def summary(self) -> str:
        return (f"{self.ok} ok ({dict(self.by_behaviour)}), {len(self.failures)} failed, {self.connects} TCP"
                f" connections opened, {len(self.pids)} pids answered; first failures: {self.failures[:5]}")


class NaiveClients(ClientThreads):
    """`count` naive clients against host:port until stopped; a context manager."""

    def __init__(self, host: str, port: int, count: int = 12, seed: int = 12):
        self.host, self.port, self.count = host, port, count
        self.result = NaiveResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._random = random.Random(seed)
        self._threads = [threading.Thread(target=self._run, args=(index, BEHAVIOURS[index % len(BEHAVIOURS)],
                                                                  self._random.random()), daemon=True)
                         for index in range(count)]

    def _check_progress(self) -> None:
        if self.result.failures:
            raise AssertionError(f"a naive client failed: {self.result.summary()}")

    def _connected(self) -> None:
        with self._lock:
            self.result.connects += 1

    def _record(self, behaviour: str, pids=(), failure: str | None = None) -> None:
        with self._lock:
            if failure is not None:
                self.result.failures.append(f"{time.strftime('%H:%M:%S')} {behaviour}: {failure}")
                return
            for pid in pids:
                self.result.ok += 1
                self.result.pids[pid] += 1
                self.result.by_behaviour[behaviour] += 1

    def _run(self, index: int, behaviour: str, seed: float) -> None:
        rng = random.Random(seed)
        connection = _Counting(self.host, self.port, timeout=30, on_connect=self._connected)
        number = 0
        try:
            while not self._stop.is_set():
                number += 1
                path = f"/{behaviour}/{index}/{number}"
                try:
                    if behaviour == "post":
                        body = rng.randbytes(rng.randint(1, 64 * 1024))
                        connection.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
                        pids = [_check(connection.getresponse(), path, body)]
                    elif behaviour == "pipelined":
                        if connection.sock is None:
                            connection.connect()
                        second = path + "b"
                        connection.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"
                                                f"GET {second} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                        pids = _read_answers(connection.sock, [path, second])
                    else:
                        connection.request("GET", path)
                        pids = [_check(connection.getresponse(), path, b"")]
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    self._record(behaviour, failure=f"{path}: {type(exc).__name__}: {exc}")
                    connection.close()  # the next request reconnects, and is counted as such
                    continue
                self._record(behaviour, pids)
                if behaviour != "eager":
                    self._stop.wait(rng.uniform(0.05, 0.5))
        finally:
            connection.close()


def _check(response: http.client.HTTPResponse, path: str, body: bytes) -> int:
    text = response.read().decode()
    return _check_answer(response.status, response.will_close, text, path, body)


def _check_answer(status: int, will_close: bool, text: str, path: str, body: bytes) -> int:
    """The answering pid, once the answer proves the request and its body arrived whole."""
    if status != 200:
        raise ValueError(f"HTTP {status}: {text[:100]!r}")
    if will_close:
        raise ValueError("the server said Connection: close")
    match = ANSWER.fullmatch(text)
    if not match or match.group(2) != path or int(match.group(3)) != len(body) or int(match.group(4)) != zlib.crc32(body):
        raise ValueError(f"wrong answer for {path} ({len(body)} bytes): {text!r}")
    return int(match.group(1))


def _read_answers(sock: socket.socket, paths: list[str]) -> list[int]:
    """The answers to pipelined requests off the raw socket (nothing else comes after them)."""
    data = b""
    pids = []
    while len(pids) < len(paths):
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            status_line, *lines = data[:end].decode("latin-1").split("\r\n")
            headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
            length = int(headers.get("content-length", "0"))
            if len(data) >= end + 4 + length:
                text = data[end + 4:end + 4 + length].decode()
                pids.append(_check_answer(int(status_line.split()[1]), headers.get("connection") == "close", text,
                                          paths[len(pids)], b""))
                data = data[end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise http.client.RemoteDisconnected("closed before the pipelined answers")
        data += chunk
    return pids
