"""A closed-loop HTTP/1.1 load that records every request: when, how long, what came back, and which pid served it.

wrk gives totals and a latency histogram; a reload lasts a fraction of a
second, so seeing what it does to latency needs each request on its own.
This tool keeps `connections` keep-alive connections busy (one request in
flight on each, the next sent as soon as the answer is in, like wrk), never
retries, and records per request:

    start     CLOCK_MONOTONIC seconds (time.monotonic(); the same clock in every process)
    latency   seconds from the write of the request to the end of the answer (or to the failure)
    code      the HTTP status, or a negative error code (ERRORS)
    pid       the pid in the body (`pid:<n>`), 0 when there was none
    conn      which connection it went on (numbered from 1 as they are opened; 0 when none could be)

A connection is re-opened after an answer with `Connection: close`, after an
error, or when the server closed it while idle (that last case is counted in
`idle_closes`, not as an error: no request was lost). Usage:

    python -m bench.load --port 8000 --connections 50 --duration 10 --out records.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import time

ERRORS = {-1: "connect", -2: "read", -3: "write", -4: "timeout"}
ERR_CONNECT, ERR_READ, ERR_WRITE, ERR_TIMEOUT = -1, -2, -3, -4

CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)")
PID = re.compile(rb"pid:(\d+)")


class Lost(Exception):
    """The connection ended before the whole answer arrived."""


class Malformed(Exception):
    """An answer this tool cannot frame (no Content-Length)."""


class Connection(asyncio.Protocol):
    """One client connection; `request()` sends one request and returns (status, pid, close)."""

    def __init__(self):
        self.transport = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.number = 0  # which connection of the load this is, from 1

    # -- protocol callbacks
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            try:
                answer = self._parse()
            except Malformed as exc:
                self.waiter.set_exception(exc)
                return
            if answer is not None:
                self.waiter.set_result(answer)

    def eof_received(self):
        self._lost()
        return False

    def connection_lost(self, exc):
        self._lost()

    def _lost(self):
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Lost())

    # -- framing
    def _parse(self):
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end + 2]).lower()
        match = CONTENT_LENGTH.search(head)
        if match is None:
            raise Malformed(head[:200])
        total = end + 4 + int(match.group(1))
        if len(self.buffer) < total:
            return None
        body = bytes(self.buffer[end + 4:total])
        del self.buffer[:total]
        status = int(head[9:12])
        pid = PID.search(body)
        return status, int(pid.group(1)) if pid else 0, b"\r\nconnection: close" in head


class Load:
    def __init__(self, host: str, port: int, path: str, connections: int, duration: float, timeout: float):
        self.host, self.port = host, port
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        self.connections, self.duration, self.timeout = connections, duration, timeout
        self.starts: list[float] = []
        self.latencies: list[float] = []
        self.codes: list[int] = []
        self.pids: list[int] = []
        self.conns: list[int] = []
        self.opened = 0
        self.idle_closes = 0

    def record(self, start: float, end: float, code: int, pid: int, conn: int = 0) -> None:
        self.starts.append(start)
        self.latencies.append(end - start)
        self.codes.append(code)
        self.pids.append(pid)
        self.conns.append(conn)

    async def run(self) -> None:
        self.began = time.monotonic()
        self.deadline = self.began + self.duration
        await asyncio.gather(*(self.client() for _ in range(self.connections)))
        self.ended = time.monotonic()

    async def connect(self):
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(Connection, self.host, self.port), self.timeout)
            self.opened += 1
            connection.number = self.opened
            return connection
        except (OSError, asyncio.TimeoutError) as exc:
            code = ERR_TIMEOUT if isinstance(exc, asyncio.TimeoutError) else ERR_CONNECT
            self.record(start, time.monotonic(), code, 0)
            await asyncio.sleep(0.01)  # do not spin on a closed port
            return None

    async def client(self) -> None:
        loop = asyncio.get_running_loop()
        connection = None
        while time.monotonic() < self.deadline:
            if connection is not None and connection.closed:
                self.idle_closes += 1  # closed by the server between requests: nothing was lost
                connection.transport.abort()
                connection = None
            if connection is None:
                connection = await self.connect()
                if connection is None:
                    continue
            waiter = connection.waiter = loop.create_future()
            timer = loop.call_later(self.timeout, _expire, waiter)
            start = time.monotonic()
            try:
                connection.transport.write(self.request)
            except (OSError, RuntimeError):
                self.record(start, time.monotonic(), ERR_WRITE, 0, connection.number)
                connection.transport.abort()
                connection = None
                timer.cancel()
                continue
            try:
                status, pid, close = await waiter
            except (Lost, Malformed, asyncio.TimeoutError) as exc:
                code = ERR_TIMEOUT if isinstance(exc, asyncio.TimeoutError) else ERR_READ
                self.record(start, time.monotonic(), code, 0, connection.number)
                connection.transport.abort()
                connection = None
                continue
            finally:
                timer.cancel()
                if connection is not None:
                    connection.waiter = None
            self.record(start, time.monotonic(), status, pid, connection.number)
            if close:
                connection.transport.close()
                connection = None
        if connection is not None:
            connection.transport.close()

    def result(self) -> dict:
        return {
            "host": self.host, "port": self.port, "connections": self.connections,
            "began": self.began, "ended": self.ended, "idle_closes": self.idle_closes,
            "start": self.starts, "latency": self.latencies, "code": self.codes, "pid": self.pids,
            "conn": self.conns,
        }


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=2.0, help="per request, like wrk's default (seconds)")
    parser.add_argument("--out", required=True, help="write the records here as JSON")
    args = parser.parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    socket.setdefaulttimeout(None)
    load = Load(args.host, args.port, args.path, args.connections, args.duration, args.timeout)
    print("running", flush=True)  # the caller times its reloads from here
    runner(load.run())
    with open(args.out, "w") as file:
        json.dump(load.result(), file, separators=(",", ":"))
    done = sum(1 for c in load.codes if c > 0)
    print(f"{len(load.codes)} requests, {done} answered, {len(load.codes) - done} socket errors", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
