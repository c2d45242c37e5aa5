"""A worker's main, in-process: it reports `drained` to its main even when the app's lifespan shutdown raises."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from graceful_http import worker_process
from graceful_http.inherited import Inherited
from graceful_http.settings import ServeSettings
from graceful_http.wire import decode
from graceful_http.workers import MainLink


class EngineWhoseAppCannotShutDown:
    total_requests = 4

    def __init__(self):
        self.accepting = True

    def in_flight(self) -> int:
        return 0

    def stop_accepting(self, replaced: bool = False, moving_to: int | None = None) -> None:
        self.accepting = False

    async def drain(self, deadline: float, websocket_code: int | None = None) -> tuple[int, int]:
        return (2, 0)

    async def shutdown_app(self) -> None:
        raise RuntimeError("the app's shutdown handler is broken")


def test_worker_reports_drained_when_the_apps_shutdown_raises(monkeypatch, caplog):
    engine = EngineWhoseAppCannotShutDown()

    async def started(engines):
        pass

    monkeypatch.setattr(worker_process.logs, "setup", lambda *args, **kwargs: None)
    monkeypatch.setattr(worker_process, "build_engines", lambda *args, **kwargs: [engine])
    monkeypatch.setattr(worker_process, "start_engines", started)
    main_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    async def main_side() -> list[tuple[str, str]]:
        loop = asyncio.get_running_loop()
        main_end.setblocking(False)
        lines: list[tuple[str, str]] = []
        data = b""
        while not any(word == "drained" for word, _ in lines):
            chunk = await loop.sock_recv(main_end, 4096)
            assert chunk, f"the worker closed its channel after {lines}"
            data += chunk
            *complete, data = data.split(b"\n")
            lines += [decode(line) for line in complete]
            if ("ready", "") in lines and engine.accepting:
                os.kill(os.getpid(), signal.SIGTERM)  # the main tells its worker to drain
        return lines

    async def scenario():
        link = MainLink(worker_end, 1)
        worker = asyncio.create_task(worker_process.run_worker(ServeSettings(), link, Inherited(), listeners=[]))
        lines = await asyncio.wait_for(main_side(), 10)
        return await asyncio.wait_for(worker, 10), lines

    with caplog.at_level(logging.INFO, logger="graceful_http"):
        code, lines = asyncio.run(scenario())
    main_end.close()
    assert code == 0
    assert lines[0] == ("ready", "")
    assert ("stats", "0 4 0 0") in lines  # in flight, requests, connections adopted, failed
    assert lines[-1] == ("drained", "2 0 0 0")  # answered, cut, handed over, fell back
    assert not engine.accepting
    assert "the app's lifespan shutdown failed" in caplog.text
