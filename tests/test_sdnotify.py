"""sd_notify messages, the notifier and the barrier (sdnotify)."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from graceful_http import sdnotify


def test_format_message_puts_mainpid_before_ready():
    assert sdnotify.format_message({"READY": 1, "MAINPID": 5}) == "MAINPID=5\nREADY=1"
    assert sdnotify.format_message({"STATUS": "gen 2 · serving", "READY": 1, "MAINPID": 77}) == (
        "MAINPID=77\nREADY=1\nSTATUS=gen 2 · serving")


def test_format_message_full_order_and_unknown_fields_last():
    fields = {"X_CUSTOM": "1", "WATCHDOG": 1, "STATUS": "s", "STOPPING": 1, "RELOADING": 1, "READY": 1,
              "MAINPID": 9}
    assert sdnotify.format_message(fields).splitlines() == [
        "MAINPID=9", "READY=1", "RELOADING=1", "STOPPING=1", "STATUS=s", "WATCHDOG=1", "X_CUSTOM=1"]


@pytest.mark.parametrize("fields", [{"ready": 1}, {"A=B": 1}, {"STATUS": "two\nlines"}])
def test_format_message_refuses_what_would_corrupt_the_datagram(fields):
    with pytest.raises(ValueError, match="invalid notify field"):
        sdnotify.format_message(fields)


def test_parse_message():
    assert sdnotify.parse_message("MAINPID=5\nREADY=1\nSTATUS=a=b c\nnoise\n") == {
        "MAINPID": "5", "READY": "1", "STATUS": "a=b c"}
    assert sdnotify.parse_message("") == {}


@given(st.dictionaries(st.sampled_from(["MAINPID", "READY", "RELOADING", "STOPPING", "STATUS", "X_Y"]),
                       st.text(alphabet=st.characters(blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
                                                      blacklist_categories=("Cs",)), max_size=20)))
def test_parse_message_inverts_format_message(fields):
    assert sdnotify.parse_message(sdnotify.format_message(fields)) == fields


def test_notifier_is_silent_without_notify_socket():
    notifier = sdnotify.Notifier(environ={})
    assert not notifier.enabled
    assert notifier.send(READY=1) is False
    assert asyncio.run(notifier.barrier(timeout=0.1)) is False


@pytest.fixture
def notify_socket(monkeypatch):
    """A fake systemd: an AF_UNIX datagram socket bound in a short temporary directory."""
    directory = tempfile.mkdtemp(prefix="gh-notify-")  # tmp_path can exceed sun_path's 108 bytes
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)  # systemd.daemon.notify reads os.environ
    yield path, sock
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def test_notifier_sends_exact_datagrams(notify_socket):
    path, sock = notify_socket
    notifier = sdnotify.Notifier(environ={"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.send(READY=1, STATUS="gen 1 · ready", MAINPID=1234) is True
    assert sock.recv(4096) == "MAINPID=1234\nREADY=1\nSTATUS=gen 1 · ready".encode()
    assert notifier.send(STOPPING=1) is True
    assert sock.recv(4096) == b"STOPPING=1"
    assert notifier.send(RELOADING=1, STATUS="reloading") is True
    assert sock.recv(4096) == b"RELOADING=1\nSTATUS=reloading"


def test_barrier_returns_once_the_manager_closes_the_passed_fd_and_the_loop_runs_meanwhile(notify_socket):
    path, sock = notify_socket
    notifier = sdnotify.Notifier(environ={"NOTIFY_SOCKET": path})
    sock.setblocking(False)

    async def scenario():
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(notifier.barrier(timeout=10))
        # The manager's side, run by the same loop the barrier waits in: were the wait blocking, this
        # could not receive the message, and the barrier would time out instead.
        message, fds, _flags, _address = await loop.run_in_executor(None, lambda: _receive_when_ready(sock))
        assert message == b"BARRIER=1"
        assert len(fds) == 1
        await asyncio.sleep(0)
        assert not waiting.done()  # still waiting: we hold its pipe end
        for fd in fds:
            os.close(fd)  # what systemd does on reaching the barrier
        return await asyncio.wait_for(waiting, 10)

    assert asyncio.run(scenario()) is True


def _receive_when_ready(sock):
    select.select([sock], [], [], 10)
    return socket.recv_fds(sock, 4096, 4)


def test_barrier_times_out_when_nobody_reads(notify_socket):
    path, sock = notify_socket
    notifier = sdnotify.Notifier(environ={"NOTIFY_SOCKET": path})
    assert asyncio.run(notifier.barrier(timeout=0.2)) is False
    message, fds, _flags, _address = socket.recv_fds(sock, 4096, 4)  # drain it, and close what it carried
    for fd in fds:
        os.close(fd)
    assert message == b"BARRIER=1"


@pytest.mark.parametrize("environ, interval", [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "2000000"}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "41"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, None),
])
def test_watchdog_interval(environ, interval):
    assert sdnotify.watchdog_interval(environ, 42) == interval
