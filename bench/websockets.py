"""WebSocket clients across reloads: how each server ends their connections and how soon they are back.

Clients as a browser app writes them: hold a WebSocket, and when it ends,
reconnect at once (no back-off). Recorded per connection end: the close code
the client saw (1012 Service Restart, 1001 Going Away, 1006 = dropped without
a close frame), the time until the next connection was open (handshake done),
and failed reconnect attempts. The peak number
of closes within any 100 ms says how much of a reconnect stampede the
server causes.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

STAMPEDE_WINDOW = 0.1


class Clients:
    def __init__(self, port: int, count: int):
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.count = count
        self.ends: list[dict] = []  # {"at", "code", "back_after", "failed_attempts"}
        self.stopping = False
        self.open = 0

    async def one(self) -> None:
        pending: dict | None = None
        while not self.stopping:
            try:
                async with connect(self.url, open_timeout=10, close_timeout=5) as ws:
                    self.open += 1
                    if pending is not None:  # connected again
                        pending["back_after"] = time.monotonic() - pending["at"]
                        self.ends.append(pending)
                        pending = None
                    try:
                        async for _ in ws:
                            if self.stopping:
                                break
                    except ConnectionClosed:
                        pass
                    finally:
                        self.open -= 1
                    if self.stopping:
                        return
                    code = ws.close_code if ws.close_code is not None else 1006
                    pending = {"at": time.monotonic(), "code": code, "back_after": None, "failed_attempts": 0}
            except (OSError, InvalidHandshake, InvalidStatus, asyncio.TimeoutError):
                if pending is None:
                    pending = {"at": time.monotonic(), "code": None, "back_after": None, "failed_attempts": 0}
                pending["failed_attempts"] += 1
                await asyncio.sleep(0.05)


def stampede(moments: list[float]) -> int:
    """The most connection ends within any STAMPEDE_WINDOW seconds."""
    moments = sorted(moments)
    best, start = 0, 0
    for end, moment in enumerate(moments):
        while moment - moments[start] > STAMPEDE_WINDOW:
            start += 1
        best = max(best, end - start + 1)
    return best


async def _run(server, clients: int, reloads: int, interval: float, settle: float) -> dict:
    group = Clients(server.port, clients)
    tasks = [asyncio.create_task(group.one()) for _ in range(clients)]
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + 30
    while group.open < clients and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    done = []
    for _ in range(reloads):
        record = await loop.run_in_executor(None, server.reload)
        done.append(record.ok)
        await asyncio.sleep(interval)
    await asyncio.sleep(settle)
    group.stopping = True
    await asyncio.wait(tasks, timeout=10)
    for task in tasks:
        task.cancel()
    ends = group.ends
    back = [e["back_after"] for e in ends if e["back_after"] is not None]
    codes = Counter(str(e["code"]) for e in ends)
    return {
        "server": server.label, "clients": clients, "reloads": reloads, "reloads_ok": sum(done),
        "connections_ended": len(ends), "close_codes": dict(codes),
        "dropped_without_close_frame": codes.get("1006", 0),
        "failed_reconnects": sum(e["failed_attempts"] for e in ends),
        "back_p50_ms": round(statistics.median(back) * 1000, 1) if back else None,
        "back_max_ms": round(max(back) * 1000, 1) if back else None,
        "peak_ends_per_100ms": stampede([e["at"] for e in ends]),
    }


def websocket_reloads(server, clients: int = 50, reloads: int = 3, interval: float = 6.0, settle: float = 6.0) -> dict:
    """Hold `clients` WebSockets on `server` (started) through `reloads` reloads `interval` s apart."""
    return asyncio.run(_run(server, clients, reloads, interval, settle))
