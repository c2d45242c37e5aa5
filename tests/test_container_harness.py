"""Checks that the systemd container harness itself works (one boot, ~1 s).

If this fails, every end-to-end test would fail for reasons unrelated to
graceful-http, so it is worth seeing this failure on its own first.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from harness.container import (
    ContainerError,
    SystemdContainer,
    require_container_support,
    wait_until,
)

PORT = 19876

HI_SOCKET = f"""\
[Socket]
ListenStream=127.0.0.1:{PORT}
Accept=no
"""

HI_SERVICE = """\
[Service]
ExecStart=/usr/bin/python3 /opt/hi/hi.py
"""

# Serves exactly one connection on the listening socket systemd passes as fd 3.
HI_PY = """\
import os, socket
assert os.environ["LISTEN_FDS"] == "1", os.environ.get("LISTEN_FDS")
listener = socket.socket(fileno=3)
conn, _ = listener.accept()
conn.sendall(b"hi")
conn.close()
print("served one connection", flush=True)
"""


@pytest.fixture(scope="module")
def container():
    """One boot for the whole module; its teardown also checks stop()."""
    require_container_support()  # fails loudly; these tests must never skip
    with SystemdContainer("gh-harness-test") as c:
        init_pid = c.init_pid
        nspawn_pid = c._nspawn.pid  # noqa: SLF001 - checking the cleanup itself
        assert init_pid is not None and os.path.exists(f"/proc/{init_pid}")
        yield c
    # __exit__ stopped it: nothing of it may be left running.
    assert c.init_pid is None
    assert not os.path.exists(f"/proc/{init_pid}")
    assert not os.path.exists(f"/proc/{nspawn_pid}")
    c.stop()  # idempotent
    with pytest.raises(ContainerError, match="not running"):
        c.run("true")


def _connect_and_read() -> bytes:
    with socket.create_connection(("127.0.0.1", PORT), timeout=10) as s:
        chunks = []
        while chunk := s.recv(1024):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.systemd
def test_socket_activation_end_to_end(container: SystemdContainer) -> None:
    cursor = container.journal_cursor()
    container.write_file("/etc/systemd/system/hi.socket", HI_SOCKET)
    container.write_file("/etc/systemd/system/hi.service", HI_SERVICE)
    container.write_file("/opt/hi/hi.py", HI_PY, mode=0o755)
    assert container.run("stat -c %a /opt/hi/hi.py").stdout.strip() == "755"
    container.systemctl("daemon-reload")
    container.systemctl("start", "hi.socket")

    sock = container.show("hi.socket", "ActiveState", "SubState", "Listen")
    assert sock == {
        "ActiveState": "active",
        "SubState": "listening",
        "Listen": f"127.0.0.1:{PORT} (Stream)",
    }

    assert _connect_and_read() == b"hi"

    # The service exits after its one connection; the socket keeps listening.
    container.wait_for(
        lambda: container.show("hi.service", "ActiveState")["ActiveState"] == "inactive",
        timeout=10,
        what="hi.service to exit",
    )
    svc = container.show("hi.service", "Result", "ExecMainStatus", "NRestarts")
    assert svc == {"Result": "success", "ExecMainStatus": "0", "NRestarts": "0"}
    assert container.show("hi.socket", "SubState")["SubState"] == "listening"

    container.wait_for(
        lambda: "served one connection" in container.journal("hi.service"),
        timeout=10,
        what="the service's line in the journal",
    )
    entries = container.journal_json("hi.service", since_cursor=cursor)
    served = [e for e in entries if e.get("MESSAGE") == "served one connection"]
    assert len(served) == 1
    assert served[0]["_SYSTEMD_UNIT"] == "hi.service"
    # Nothing new after the newest cursor.
    assert container.journal("hi.service", since_cursor=container.journal_cursor()) == ""


@pytest.mark.systemd
def test_run_reports_failures_and_environment(container: SystemdContainer) -> None:
    assert container.run("echo $PATH").stdout.strip().startswith("/usr/local/sbin")
    assert container.run("cat", input="piped\n").stdout == "piped\n"
    assert container.run("exit 3", check=False).returncode == 3
    with pytest.raises(ContainerError) as info:
        container.run("echo out; echo err >&2; exit 7")
    message = str(info.value)
    assert "echo out; echo err >&2; exit 7" in message
    assert "exit code: 7" in message
    assert "out" in message and "err" in message
    with pytest.raises(ContainerError, match="timed out after 0.5s"):
        container.run("sleep 30", timeout=0.5)
    # The timed-out command was killed inside the container too.
    container.wait_for(
        lambda: container.run("pgrep -x sleep", check=False).returncode == 1,
        timeout=5,
        what="the timed-out sleep to be killed",
    )


def test_wait_until() -> None:
    calls = iter([0, "", None, "ready"])
    assert wait_until(lambda: next(calls), timeout=5, interval=0) == "ready"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timed out after 0.2s waiting for nothing"):
        wait_until(lambda: False, timeout=0.2, what="nothing")
    assert time.monotonic() - started < 2

