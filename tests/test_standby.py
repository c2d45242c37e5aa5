"""The standby beside a one-process main (see `standby`): the new generation is forked from it at a reload,
imports the app anew, and the standby holds none of the service's sockets, ends with its main and, gone,
leaves a reload to the old way (exec). Real services on both engines."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
from test_standalone import WORKING_APP  # an app that says its version

from graceful_http.standby import wanted
from graceful_http.zygote import KEPT_BY_A_STANDBY_FORK
from harness.processes import alive, children
from support.load import get, pid_of
from support.serve_process import ENGINES, HOST, ServeProcess, wait_until

FORKED = "forked from the previous main, not exec'd"


def test_only_a_main_that_serves_by_itself_and_can_fork_its_successor_has_one():
    assert wanted(1, metrics=False)
    assert not wanted(2, metrics=False)  # a main of workers is a fork of its predecessor already
    assert not wanted(1, metrics=True)  # with prometheus_client loaded the new generation is exec'd anyway


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes


def listening_inode(port: int) -> str:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return f"socket:[{fields[9]}]"
    raise AssertionError(f"nothing listens on port {port}")


def standby_of(server: ServeProcess, main: int) -> int:
    found = wait_until(lambda: children(main) or None, 10, f"the standby of pid {main}", server.log_tail)
    assert len(found) == 1, f"a one-process main has one child, its standby: {found}"
    return found[0]


def version(server: ServeProcess) -> str:
    status, body, _ = get(HOST, server.port, "/version", timeout=10)
    assert status == 200
    return body.decode()


@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_new_generation_is_forked_from_the_standby_and_loads_the_app_anew(engine, tmp_path):
    app = tmp_path / "standby_app.py"
    app.write_text(WORKING_APP.format(version="one"))
    with ServeProcess(ENGINES[engine], tmp_path, "standby_app:app", "--app-dir", str(tmp_path), "--no-access-log",
                      pid_file=True) as server:
        server.wait_serving()
        first = server.main_pid()
        standby = standby_of(server, first)
        assert listening_inode(server.port) in socket_inodes(first)
        # The fork gave it the listener; it closes it first thing, but it may not have run yet.
        wait_until(lambda: listening_inode(server.port) not in socket_inodes(standby), 10,
                   "the standby to close its copy of the listener", server.log_tail)
        assert version(server) == "one"

        app.write_text(WORKING_APP.format(version="two"))  # a deploy: the app's code changed, graceful-http's did not
        assert server.reload_cli().returncode == 0, server.log_tail()
        second = server.wait_new_main(first)
        server.wait_gone(first)
        wait_until(lambda: not alive(standby), 10, "the old standby to end with its main", server.log_tail)
        assert version(server) == "two"
        assert f"gen 2: {FORKED}" in server.log(), server.log_tail()
        assert standby_of(server, second) != standby

        # Stopped: the main closes its listener, nobody else holds it, the standby ends too.
        new_standby = standby_of(server, second)
        os.kill(second, signal.SIGTERM)
        server.wait_gone(second)
        wait_until(lambda: not alive(new_standby), 10, "the standby to end with its main", server.log_tail)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, server.port), timeout=2).close()


@pytest.mark.parametrize("engine", list(ENGINES))
def test_without_its_standby_a_main_still_reloads_by_exec(engine, tmp_path):
    with ServeProcess(ENGINES[engine], tmp_path, "--no-access-log", pid_file=True) as server:
        server.wait_serving()
        first = server.main_pid()
        os.kill(standby_of(server, first), signal.SIGKILL)
        result = server.reload_cli()
        assert result.returncode == 0, result.stdout + result.stderr + server.log_tail()
        second = server.wait_new_main(first)
        server.wait_gone(first)
        status, body, _ = get(HOST, server.port, "/", timeout=10)
        assert status == 200 and pid_of(body) == second
        log = server.log()
        assert "the standby could not start the new generation" in log, server.log_tail()
        assert f"gen 2: {FORKED}" not in log, server.log_tail()
        standby_of(server, second)  # the exec'd generation has its own


def test_a_standby_that_does_not_answer_fails_that_reload_only(tmp_path):
    """A stopped standby (it might have forked and not said so): that reload fails after its timeout with the
    reason, the old generation keeps serving and the standby is killed; the next reload forks here."""
    with ServeProcess(ENGINES["pypi"], tmp_path, "--no-access-log", pid_file=True) as server:
        server.wait_serving()
        first = server.main_pid()
        standby = standby_of(server, first)
        os.kill(standby, signal.SIGSTOP)
        failed = server.reload_cli()
        assert failed.returncode == 1, failed.stdout + failed.stderr + server.log_tail()
        assert f"the standby (pid {standby}) did not answer within" in failed.stderr, failed.stderr
        assert server.get_pid() == first
        wait_until(lambda: not alive(standby), 10, "the silent standby to be killed", server.log_tail)
        assert server.reload_cli().returncode == 0, server.log_tail()
        second = server.wait_new_main(first)
        server.wait_gone(first)
        assert server.get_pid() == second


def anonymous_memory(pid: int) -> int:
    """Bytes of anonymous memory resident in `pid` (RssAnon): what a fork keeps of its predecessors adds to it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon for pid {pid}")


def test_a_fork_of_the_standby_keeps_no_more_of_its_predecessors_than_zygote_counts(tmp_path):
    """`zygote` lets generations forked from a standby go on for LEFTOVER_BUDGET ÷ KEPT_BY_A_STANDBY_FORK reloads
    in a row before one is exec'd: the memory each of them keeps must stay below that estimate."""
    with ServeProcess(ENGINES["pypi"], tmp_path, "--no-access-log", pid_file=True) as server:
        server.wait_serving()
        main = server.main_pid()
        sizes = []
        for _ in range(7):  # generations 2 to 8
            assert server.reload_cli().returncode == 0, server.log_tail()
            main = server.wait_new_main(main)
            for _ in range(5):
                assert server.get_pid() == main
            sizes.append(anonymous_memory(main))
        assert f"gen 8: {FORKED}" in server.log(), server.log_tail()
        per_generation = (sizes[-1] - sizes[0]) / (len(sizes) - 1)
        print(f"RssAnon of generations 2 to 8: {sizes}, {per_generation / 1024:.0f} KiB a generation")
        assert per_generation <= KEPT_BY_A_STANDBY_FORK, (
            f"each forked generation keeps about {per_generation / 1024:.0f} KiB more (RssAnon {sizes})")
