"""WebSockets and streams across reloads and stops: a close frame the client and the app both see.

A real `serve` of tests/apps/websocket_app.py per engine and WebSocket
implementation, and real WebSocket clients (the `websockets` library) holding
connections across a reload: each must end with a close frame carrying 1012
(Service Restart), reconnect, and be served by the new generation; the app
must have seen `websocket.disconnect` with that code. A stop gives 1001.
A Server-Sent-Events stream cut at the graceful timeout is one log line,
never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import os
import re
import signal
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from support.serve_process import ENGINES, HOST, ServeProcess, installed_engine, wait_until

APPS = Path(__file__).resolve().parent / "apps"
CLIENTS = 6
SPREAD = 2.0

# (engine, --ws): every implementation each uvicorn offers here (Debian's python3 has wsproto only).
IMPLEMENTATIONS = [("pypi", "websockets"), ("pypi", "websockets-sansio"), ("pypi", "wsproto"), ("debian", "auto")]


def serve(engine: str, directory: Path, *args: str) -> ServeProcess:
    return ServeProcess(installed_engine(engine), directory, "--app-dir", str(APPS), "websocket_app:app",
                        "--websocket-close-spread", str(SPREAD), "--no-access-log", *args, pid_file=True)


def serving_pids(main: int, workers: int) -> set[int]:
    if workers == 1:
        return {main}
    with open(f"/proc/{main}/task/{main}/children") as file:
        return {int(pid) for pid in file.read().split()}


class Client:
    """One WebSocket client: records the pids it heard from, how its connection ended, and reconnects once."""

    def __init__(self, port: int):
        self.url = f"ws://{HOST}:{port}/ws"
        self.pids: list[int] = []
        self.close_codes: list[int | None] = []
        self.closed_at: list[float] = []
        self.after_reconnect: set[int] = set()

    async def run(self, connections: int, messages_after_reconnect: int = 3) -> None:
        for attempt in range(connections):
            async with connect(self.url, open_timeout=10, close_timeout=10) as ws:
                try:
                    heard = 0
                    async for message in ws:
                        pid = int(re.match(r"pid:(\d+)", message).group(1))
                        self.pids.append(pid)
                        heard += 1
                        if attempt == connections - 1:
                            self.after_reconnect.add(pid)
                            if heard >= messages_after_reconnect:
                                return
                except ConnectionClosed:
                    pass
                self.closed_at.append(time.monotonic())
                self.close_codes.append(ws.close_code)


async def hold_then_reconnect(port: int, trigger) -> list[Client]:
    clients = [Client(port) for _ in range(CLIENTS)]
    tasks = [asyncio.create_task(client.run(connections=2)) for client in clients]
    while not all(client.pids for client in clients):
        await asyncio.sleep(0.05)
    await asyncio.get_running_loop().run_in_executor(None, trigger)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    return clients


async def hold_until_stopped(port: int, stop, clients: int = 3) -> list[int | None]:
    """Hold `clients` WebSockets, call `stop` (blocking, in a thread), return each one's close code."""
    codes = []

    async def one():
        async with connect(f"ws://{HOST}:{port}/ws", close_timeout=10) as ws:
            try:
                async for _ in ws:
                    pass
            except ConnectionClosed:
                pass
            codes.append(ws.close_code)

    tasks = [asyncio.create_task(one()) for _ in range(clients)]
    await asyncio.sleep(0.5)  # the app has sent a message or two on each (it sends every 0.2 s)
    await asyncio.get_running_loop().run_in_executor(None, stop)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    return codes


@pytest.mark.parametrize("engine, ws", IMPLEMENTATIONS, ids=[f"{e}-{w}" for e, w in IMPLEMENTATIONS])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_closes_websockets_with_1012_and_clients_reconnect_to_the_new_generation(engine, ws, workers,
                                                                                          tmp_path):
    # The whole generation at once: in a worker-by-worker rollout a client closed by a retiring worker may
    # reconnect to an old worker that retires later, and be closed again (see the README).
    rollout = ["--rollout", "generation"] if workers > 1 else []
    with serve(engine, tmp_path, "--ws", ws, "--workers", str(workers), *rollout, "--graceful-timeout", "10") as server:
        server.wait_serving(timeout=30)
        first = server.main_pid()
        old_serving = serving_pids(first, workers)
        new = {}

        def reload():
            os.kill(first, signal.SIGHUP)
            new["main"] = server.wait_new_main(first, timeout=30)

        clients = asyncio.run(hold_then_reconnect(server.port, reload))
        new_serving = serving_pids(new["main"], workers)
        for client in clients:
            assert client.close_codes == [1012], client.close_codes  # a close frame, Service Restart
            assert client.after_reconnect and client.after_reconnect <= new_serving, (client.after_reconnect,
                                                                                      new_serving)
        assert {pid for client in clients for pid in client.pids[:1]} <= old_serving
        # The closes are spread over the window, not all in the same moment.
        moments = [client.closed_at[0] for client in clients]
        assert max(moments) - min(moments) > 0.1, moments
        server.wait_gone(first, timeout=30)
        log = server.log()
        assert log.count("app saw websocket.disconnect code=1012") == CLIENTS, log[-4000:]
        in_flight = str(CLIENTS) if workers == 1 else r"\d+"  # with workers, the main counts what they reported
        assert re.search(rf"graceful-http\[{first}\] gen 1: no longer accepting; finishing {in_flight}"
                         r" in-flight request\(s\)", log), log[-4000:]
        assert re.search(r"drained: \d+ request\(s\) answered while draining, 0 cut", log), log[-4000:]
        assert "Traceback" not in log, log[-4000:]


@pytest.mark.parametrize("engine, ws", [IMPLEMENTATIONS[1], IMPLEMENTATIONS[3]],
                         ids=[f"{e}-{w}" for e, w in (IMPLEMENTATIONS[1], IMPLEMENTATIONS[3])])
def test_a_stop_closes_websockets_with_1001(engine, ws, tmp_path):
    with serve(engine, tmp_path, "--ws", ws, "--workers", "2") as server:
        server.wait_serving(timeout=30)

        codes = asyncio.run(hold_until_stopped(server.port, lambda: server.popen.send_signal(signal.SIGTERM)))
        assert codes == [1001, 1001, 1001]
        assert server.popen.wait(timeout=30) == 0
        assert server.log().count("app saw websocket.disconnect code=1001") == 3


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_stream_cut_at_the_graceful_timeout_is_one_line_and_no_traceback(engine, tmp_path):
    with serve(engine, tmp_path, "--graceful-timeout", "2") as server:
        server.wait_serving(timeout=30)
        first = server.main_pid()
        connection = http.client.HTTPConnection(HOST, server.port, timeout=30)
        connection.request("GET", "/events")
        response = connection.getresponse()
        assert response.status == 200
        assert response.readline() == b"data: 1\n"
        os.kill(first, signal.SIGHUP)
        server.wait_new_main(first, timeout=30)
        received = b""
        try:
            while chunk := response.read1(65536):  # until the old generation cuts it
                received += chunk
        except http.client.IncompleteRead as cut:  # the chunked body ends without its last chunk: cut
            received += cut.partial
        assert b"data: " in received  # the stream went on while the old generation drained
        server.wait_gone(first, timeout=30)
        log = server.log()
        assert re.search(r"graceful timeout: cut streaming response to GET /events, after \d+\.\ds, \d+ bytes sent on"
                         r" the connection", log), log[-4000:]
        assert "Traceback" not in log and "CancelledError" not in log, log[-4000:]
        wait_until(lambda: "exited: generation 1" in server.log(), 10, "generation 1 to exit", server.log_tail)


# ---- under real systemd: systemctl reload and systemctl stop ----------------------------------------


@pytest.mark.systemd
@pytest.mark.parametrize("engine, workers", [("pypi", 2), ("debian", 1)])
def test_under_systemd_reload_closes_with_1012_and_stop_with_1001(engine, workers):
    from harness.systemd_service import SERVICE, SOCKET, InstalledService

    name = f"gh-ws-{engine}-{os.getpid()}"
    # The whole generation at once (see test_a_reload_closes_websockets_with_1012_and_clients_reconnect_...).
    with InstalledService(name, engine, serve_args=f"--workers {workers} --rollout generation"
                                                   f" --websocket-close-spread {SPREAD}"
                                                   " --no-access-log websocket_app:app") as service:
        service.write_app("websocket_app", (APPS / "websocket_app.py").read_text())
        service.container.systemctl("start", SOCKET)
        service.container.systemctl("start", SERVICE)
        first = service.main_pid()
        old_serving = {first} if workers == 1 else set(service.children(first))

        def reload():
            assert service.reload().returncode == 0

        clients = asyncio.run(hold_then_reconnect(service.port, reload))
        new_main = service.main_pid()
        new_serving = {new_main} if workers == 1 else set(service.children(new_main))
        for client in clients:
            assert client.close_codes == [1012], client.close_codes
            assert client.pids[0] in old_serving and client.after_reconnect <= new_serving, (
                client.pids, old_serving, new_serving)
        wait_until(lambda: service.journal().count("app saw websocket.disconnect code=1012") == CLIENTS, 30,
                   "the old generation's app to see every disconnect")

        stop = functools.partial(service.container.systemctl, "stop", SERVICE)
        assert asyncio.run(hold_until_stopped(service.port, stop)) == [1001, 1001, 1001]
        assert service.state()["Result"] == "success"
        assert service.journal().count("app saw websocket.disconnect code=1001") == 3
