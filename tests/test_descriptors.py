"""Descriptors: one host's idle connections don't lock others out; running out is logged once per interval.

A real `serve` per engine, started with a low open-files limit, and real
sockets: one client holds hundreds of idle connections while others go on.
"""

from __future__ import annotations

import http.client
import re
import socket

import pytest

from support.serve_process import ENGINES, HOST, ServeProcess, installed_engine, wait_until

# Bounds, not measurements: far below the 10 s a connection may wait for its request head, which is how
# long a new client waited for a descriptor before the limit was raised.
NEW_CLIENT_TIMEOUT = 5.0


@pytest.fixture(params=list(ENGINES))
def engine(request) -> str:
    installed_engine(request.param)
    return request.param


def idle_connections(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection((HOST, port), timeout=10) for _ in range(count)]


def get(connection: http.client.HTTPConnection) -> int:
    connection.request("GET", "/")
    response = connection.getresponse()
    response.read()
    return response.status


def test_the_soft_limit_is_raised_so_idle_connections_lock_nobody_out(engine, tmp_path):
    with ServeProcess(ENGINES[engine], tmp_path, "--no-access-log", open_files=(512, 4096)) as server:
        server.wait_serving(timeout=30)
        server.wait_for_log("open files: soft limit raised from 512 to 4096 (the hard limit)")
        flood = idle_connections(server.port, 700)  # more than the soft limit it started with
        try:
            for _ in range(5):
                fresh = http.client.HTTPConnection(HOST, server.port, timeout=NEW_CLIENT_TIMEOUT)
                assert get(fresh) == 200
                fresh.close()
        finally:
            for sock in flood:
                sock.close()
        assert "out of file descriptors" not in server.log()


def test_out_of_descriptors_open_connections_are_served_and_it_is_logged_once_per_interval(engine, tmp_path):
    with ServeProcess(ENGINES[engine], tmp_path, "--no-access-log", open_files=(128, 128)) as server:
        server.wait_serving(timeout=30)
        server.wait_for_log("open files: limit 128 (hard 128)")
        regulars = [http.client.HTTPConnection(HOST, server.port, timeout=10) for _ in range(10)]
        for connection in regulars:
            assert get(connection) == 200
        flood = idle_connections(server.port, 300)  # far more than there are descriptors
        try:
            server.wait_for_log("out of file descriptors")
            for _ in range(3):  # requests on connections already open are answered throughout
                for connection in regulars:
                    assert get(connection) == 200
            log = server.log()
            reports = re.findall(r"out of file descriptors \(.*?\): new connections wait or are refused", log)
            # The exhaustion has lasted a few seconds: one report (the next is due 10 s after the first).
            assert len(reports) == 1, log[-3000:]
            assert "Traceback" not in log, log[-3000:]
        finally:
            for sock in flood:
                sock.close()
        # Once descriptors are free again, new clients are served: the listener was not lost.
        def served() -> bool:
            try:
                fresh = http.client.HTTPConnection(HOST, server.port, timeout=NEW_CLIENT_TIMEOUT)
                ok = get(fresh) == 200
                fresh.close()
                return ok
            except OSError:
                return False
        wait_until(served, 20, "a new client to be served once the flood is gone", server.log_tail)
        for connection in regulars:
            connection.close()
