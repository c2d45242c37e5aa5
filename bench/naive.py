"""Naive keep-alive clients through reloads: what a client that never checks a pooled connection sees.

Each client is Python's http.client on one keep-alive connection, reused
without checking, never retried, waiting 0.6–1.4 s between requests (so its
connection is idle when a reload happens). Counted: failed requests (the
server closed the connection under the client: RemoteDisconnected,
BrokenPipe, reset), reconnects (new TCP connections beyond the first per
client: after a failure or a `Connection: close`), and p99 latency of the
requests that started within 1 s after a reload, beside the steady p99.
"""

from __future__ import annotations

import http.client
import random
import statistics
import threading
import time


class CountingConnection(http.client.HTTPConnection):
    opened = 0
    lock = threading.Lock()

    def connect(self):
        super().connect()
        with CountingConnection.lock:
            CountingConnection.opened += 1


def _p99(values: list[float]) -> float | None:
    if len(values) < 2:
        return round(values[0] * 1000, 2) if values else None
    return round(statistics.quantiles(values, n=100)[98] * 1000, 2)


def naive_reloads(server, clients: int = 60, duration: float = 20.0, interval: float = 1.2,
                  limit: int | None = None) -> dict:
    """`clients` naive keep-alive clients against `server` (started) while it reloads every `interval` s
    (for `duration` s, or `limit` reloads)."""
    CountingConnection.opened = 0
    stop = threading.Event()
    records: list[tuple[float, float, bool]] = []  # (start, latency, ok)
    lock = threading.Lock()

    def client() -> None:
        connection = CountingConnection("127.0.0.1", server.port, timeout=10)
        while not stop.is_set():
            started = time.monotonic()
            try:
                connection.request("POST", "/", body=b"payload=1",
                                   headers={"content-type": "application/x-www-form-urlencoded"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()  # the next request opens a new connection: a reconnect
            with lock:
                records.append((started, time.monotonic() - started, ok))
            stop.wait(random.uniform(0.6, 1.4))
        connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # every client connected and served once
    reloads, ended = [], time.monotonic() + duration
    while time.monotonic() < ended and (limit is None or len(reloads) < limit):
        record = server.reload()
        reloads.append((record.requested, record.ok))
        time.sleep(max(0.0, interval - (time.monotonic() - record.requested)))
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=15)
    starts = [start for start, _ in reloads]
    after = [lat for start, lat, ok in records if ok and any(0 <= start - s < 1.0 for s in starts)]
    steady = [lat for start, lat, ok in records if ok and not any(-0.5 < start - s < 2.0 for s in starts)]
    return {
        "server": server.label, "clients": clients, "reloads": len(reloads),
        "reloads_ok": sum(ok for _, ok in reloads), "requests": len(records),
        "failed": sum(not ok for _, _, ok in records),
        "reconnects": max(0, CountingConnection.opened - clients),
        "p99_after_reload_ms": _p99(after), "p99_steady_ms": _p99(steady),
    }
