"""The control socket in-process: `graceful-http reload`'s client against the server, over a real socket."""

from __future__ import annotations

import asyncio
import os
import socket

from graceful_http.controlsocket import ControlServer
from graceful_http.reloadclient import request_reload
from graceful_http.wire import Outcome, control_address


def test_reload_hears_progress_then_the_final_outcome():
    heard: list[Outcome] = []

    def start_reload(source, on_outcome):
        assert source == "graceful-http reload"
        loop = asyncio.get_running_loop()
        loop.call_soon(on_outcome, Outcome("started", "reloading: starting pid 77", 77))
        loop.call_later(0.05, on_outcome, Outcome("done", "generation 2 (pid 77) is serving", 77))

    async def scenario():
        server = ControlServer(start_reload)
        await server.start(os.getpid())
        try:
            return await asyncio.to_thread(request_reload, os.getpid(), 10, heard.append)
        finally:
            server.close()

    final = asyncio.run(scenario())
    assert heard == [Outcome("started", "reloading: starting pid 77", 77)]
    assert final == Outcome("done", "generation 2 (pid 77) is serving", 77)


def test_an_unknown_request_is_refused_in_one_line():
    def ask(request: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(control_address(os.getpid()))
            sock.sendall(request)
            return sock.makefile("rb").read()

    async def scenario():
        server = ControlServer(lambda source, on_outcome: None)
        await server.start(os.getpid())
        try:
            return await asyncio.to_thread(ask, b"shutdown now\n")
        finally:
            server.close()

    assert asyncio.run(scenario()) == b"refused 0 unknown request 'shutdown now'\n"


def test_reload_with_a_canary_passes_its_seconds_and_a_bad_value_is_refused():
    asked = []

    def start_reload(source, on_outcome, canary=None):
        asked.append(canary)
        asyncio.get_running_loop().call_soon(on_outcome, Outcome("failed", "canary: 5 of 30 requests failed", 1))

    def ask(request: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(control_address(os.getpid()))
            sock.sendall(request)
            return sock.makefile("rb").read()

    async def scenario():
        server = ControlServer(start_reload)
        await server.start(os.getpid())
        try:
            final = await asyncio.to_thread(request_reload, os.getpid(), 10, lambda _: None, 2.5)
            bad = await asyncio.to_thread(ask, b"reload canary=soon\n")
            return final, bad
        finally:
            server.close()

    final, bad = asyncio.run(scenario())
    assert asked == [2.5]
    assert final == Outcome("failed", "canary: 5 of 30 requests failed", 1)
    assert bad == b"refused 0 unknown request 'reload canary=soon'\n"
