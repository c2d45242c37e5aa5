"""Behind a proxy that keeps upstream connections alive: who closes an idle connection first.

nginx (`keepalive` in an upstream, `keepalive_timeout` 60 s by default) and
HAProxy (idle server connections kept for reuse) send a request on a pooled
connection without knowing whether the server has just closed it. If the
server's keep-alive timeout is the shorter one, a request can cross the
server's FIN on the wire: the server answers it with a reset, and the proxy
answers the client 502 (nginx retries a GET on another connection, never a
POST). On loopback the window is microseconds; between two hosts it is the
round trip, so the proxy reaches the server here through `DelayLink`, which
adds a one-way delay to every byte, FIN and reset, as a network would.

The clients come in bursts (every cached connection is reused at once, idle
for the same time), separated by gaps drawn just around the peers' default
keep-alive timeouts (uvicorn 5 s, gunicorn 2 s). Counted per server and
proxy: requests, failed (by method), and which upstream connections the
server closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http.client
import random
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from harness import proxies
from harness.processes import free_port


class DelayLink:
    """A TCP relay that delivers everything `delay` seconds late, in order: data, half-closes and resets alike."""

    def __init__(self, upstream_port: int, delay: float):
        self.upstream_port, self.delay = upstream_port, delay
        self.port = free_port()
        self.server_closed = 0  # upstream connections the server ended (FIN or reset) before the proxy did
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DelayLink:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _relay(self, proxy_reader, proxy_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _reset(proxy_writer)
            return
        ended: list[str] = []  # which side ended the connection first
        await asyncio.gather(self._pump(proxy_reader, server_writer, "proxy", ended),
                             self._pump(server_reader, proxy_writer, "server", ended))

    async def _pump(self, reader, writer, side: str, ended: list[str]) -> None:
        """Copy one direction; each event reaches the other side `delay` later, in the order it happened."""
        queue: collections.deque = collections.deque()
        flushed = asyncio.Event()

        async def deliver() -> None:
            while True:
                if not queue:
                    flushed.clear()
                    await flushed.wait()
                due, kind, data = queue.popleft()
                await asyncio.sleep(max(0.0, due - self._loop.time()))
                if kind == "data":
                    writer.write(data)
                elif kind == "eof":
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()
                    return
                else:
                    _reset(writer)
                    return

        delivering = asyncio.ensure_future(deliver())
        while True:
            try:
                data = await reader.read(65536)
                kind = "data" if data else "eof"
            except (ConnectionResetError, BrokenPipeError):
                data, kind = b"", "reset"
            if kind != "data":
                ended.append(side)
                self.server_closed += ended == ["server"]
            queue.append((self._loop.time() + self.delay, kind, data))
            flushed.set()
            if kind != "data":
                break
        try:
            await delivering
        except (ConnectionError, OSError):
            pass


def _reset(writer) -> None:
    """Close with RST, as the kernel does for a request that reaches a closed socket."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


@contextlib.contextmanager
def proxy_in_front(kind: str, upstream_port: int) -> Iterator[int]:
    """nginx (upstream keep-alive on, its defaults otherwise) or HAProxy (its defaults); yields its port."""
    port, upstream = free_port(), f"127.0.0.1:{upstream_port}"
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as directory:
        if kind == "nginx":
            blocks = (proxies.nginx_upstream("app", upstream, keepalive=32),
                      proxies.nginx_site(f"127.0.0.1:{port}", "http://app"))
            started = proxies.nginx(Path(directory), *blocks, wait_for=("127.0.0.1", port))
        else:
            sections = (proxies.haproxy_frontend("web", f"127.0.0.1:{port}", "app"),
                        proxies.haproxy_backend("app", upstream))
            started = proxies.haproxy(Path(directory), *sections, wait_for=("127.0.0.1", port))
        with started:
            yield port


def _request(port: int, method: str) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = b"payload=1" if method == "POST" else None
        connection.request(method, "/", body=body, headers={"content-type": "application/x-www-form-urlencoded"})
        response = connection.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def bursts_through(proxy_port: int, gaps: list[float], burst: int) -> dict:
    """`burst` requests at once (half POST, half GET), then each gap of idleness; counts by method."""
    counts = {"POST": [0, 0], "GET": [0, 0]}  # method: [requests, failed]
    lock = threading.Lock()
    failing_gaps: list[float] = []

    def one(method: str) -> None:
        ok = _request(proxy_port, method)
        with lock:
            counts[method][0] += 1
            counts[method][1] += not ok

    for gap in [0.0, *gaps]:
        time.sleep(gap)
        before = counts["POST"][1] + counts["GET"][1]
        threads = [threading.Thread(target=one, args=("POST" if i % 2 else "GET",)) for i in range(burst)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        if counts["POST"][1] + counts["GET"][1] > before:
            failing_gaps.append(round(gap, 3))
    return {"requests": sum(c[0] for c in counts.values()), "failed_post": counts["POST"][1],
            "failed_get": counts["GET"][1], "posts": counts["POST"][0], "gets": counts["GET"][0],
            "failing_gaps": failing_gaps}


def gap_schedule(bursts_per_timeout: int, timeouts: tuple[float, ...] = (2.0, 5.0), seed: int = 1) -> list[float]:
    """Idle gaps just under and around keep-alive timeouts (by default the peers': gunicorn 2 s, uvicorn 5 s)."""
    rng = random.Random(seed)
    gaps = [timeout + rng.uniform(-0.10, 0.02) for timeout in timeouts for _ in range(bursts_per_timeout)]
    rng.shuffle(gaps)
    return gaps


def keepalive_behind_proxy(server, proxy_kind: str, gaps: list[float], burst: int = 40, delay: float = 0.005) -> dict:
    """One server (started) behind one proxy, through a link of `delay` seconds each way."""
    with DelayLink(server.port, delay) as link, proxy_in_front(proxy_kind, link.port) as proxy_port:
        counts = bursts_through(proxy_port, gaps, burst)
        closed = link.server_closed
    return {"server": server.label, "proxy": proxy_kind, "delay_ms": delay * 1000, "bursts": len(gaps) + 1,
            **counts, "closed_by_server": closed}
