"""Helpers for the fault-matrix tests: a faulty app in a booted service, and what to look at.

The app is tests/apps/faulty.py (the demo app plus faults acted out on
demand; see its docstring). These helpers pick the fault of the next
generation, hold requests open, and read what a test must check about the
processes in the container: the unit's cgroup, a process's parent, open
fds, memory and sockets.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from pathlib import Path

from harness.container import wait_until
from harness.systemd_service import APP_DIR, SERVICE, InstalledService
from support.load import get

FAULTY_APP = (Path(__file__).resolve().parents[1] / "apps" / "faulty.py").read_text()


def install_faulty_app(service: InstalledService) -> None:
    service.write_app("faulty", FAULTY_APP)


def set_fault(service: InstalledService, fault: str, this_invocation_only: bool = True) -> None:
    """The fault every process started from now on acts out (see tests/apps/faulty.py).

    With `this_invocation_only`, processes of a later invocation of the unit
    (after systemd restarted it) are healthy again.
    """
    invocation = service.container.show(SERVICE, "InvocationID")["InvocationID"] if this_invocation_only else ""
    service.container.write_file(f"{APP_DIR}/fault-invocation", invocation + "\n")
    service.container.write_file(f"{APP_DIR}/fault", fault + "\n")


def clear_fault(service: InstalledService) -> None:
    service.container.write_file(f"{APP_DIR}/fault", "ok\n")


def status_text(service: InstalledService) -> str:
    return service.container.show(SERVICE, "StatusText")["StatusText"]


def running_main(service: InstalledService) -> int:
    """The unit's main pid if it is active/running with one, else 0."""
    state = service.state()
    if (state["ActiveState"], state["SubState"]) == ("active", "running") and state["MainPID"] != "0":
        return int(state["MainPID"])
    return 0


def wait_active(service: InstalledService, timeout: float = 30) -> int:
    """Wait until the unit is active/running with a main pid; return it."""
    return service.container.wait_for(lambda: running_main(service), timeout=timeout,
                                      what="the service to be active (running)")


def wait_settled(service: InstalledService, timeout: float = 30) -> int:
    """Wait until the unit is active/running and its main pid (with its standby) is alone in its cgroup; return it.
    (Right after a reload whose new generation crashes, the unit may still be active with the old main for a
    moment, until systemd hears of the crash and restarts it.)"""
    def settled():
        main = running_main(service)
        return main if main and set(service.cgroup_pids()) == service.generation(main) else 0
    return service.container.wait_for(settled, timeout=timeout, what="one main process alone in the cgroup"
                                      " (with its standby)")


def wait_only(service: InstalledService, pid: int, timeout: float = 30) -> None:
    """Wait until `pid`'s generation (it and its standby) is alone in the unit's cgroup (dead generations
    are gone)."""
    service.container.wait_for(lambda: set(service.cgroup_pids()) == service.generation(pid), timeout=timeout,
                               what=f"pid {pid} to be alone in the cgroup (have {service.cgroup_pids()})")


def parents(service: InstalledService, pids: list[int]) -> dict[int, int]:
    """{pid: parent pid} for the pids still alive, in one command."""
    if not pids:
        return {}
    # (no awk: /usr/bin/awk is an /etc/alternatives link, and the container's /etc is fresh)
    script = "; ".join(f"echo {pid} $(sed -n 's/^PPid:[[:space:]]*//p' /proc/{pid}/status 2>/dev/null)"
                       for pid in pids)
    out = service.container.run(script, check=False).stdout
    return {int(words[0]): int(words[1]) for words in (line.split() for line in out.splitlines()) if len(words) == 2}


def generations(service: InstalledService, group: str) -> list[int]:
    """The `serve` processes in cgroup `group` (ControlGroup=) whose parent is PID 1: every live generation.

    Leaves out the ExecReload process and a new generation's short-lived
    intermediate fork.
    """
    script = (f"for p in $(cat /sys/fs/cgroup/systemd{group}/cgroup.procs); do"
              " [ \"$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status 2>/dev/null)\" = 1 ] &&"
              " tr '\\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -q ' serve ' && echo $p; done; true")
    return [int(p) for p in service.container.run(script, check=False).stdout.split()]


def alive(service: InstalledService, pid: int) -> bool:
    out = service.container.run(f"cat /proc/{pid}/stat 2>/dev/null", check=False).stdout
    return bool(out) and out.rpartition(")")[2].split()[0] != "Z"


def fd_count(service: InstalledService, pid: int) -> int:
    return int(service.container.run(f"ls /proc/{pid}/fd | wc -l").stdout)


def rss_kib(service: InstalledService, pid: int) -> int:
    out = service.container.run(f"sed -n 's/^VmRSS:[[:space:]]*//p' /proc/{pid}/status").stdout
    return int(out.split()[0])


def environ(service: InstalledService, pid: int) -> dict[str, str]:
    """The environment of the process serving `pid`'s requests (the faulty app's GET /environ, answered by a
    one-process main): its `os.environ`, which /proc/<pid>/environ is not for a forked generation."""
    status, body, _ = get("127.0.0.1", service.port, "/environ", timeout=10)
    assert status == 200, body
    served_by, *items = body.decode().split("\0")
    assert served_by == f"pid:{pid}", f"GET /environ answered by {served_by}, not by pid {pid}"
    return dict(item.partition("=")[::2] for item in items)


def tcp_connections_of(service: InstalledService, pid: int, port: int) -> int:
    """Established TCP connections on `port` (server side) held by process `pid`."""
    out = service.container.run(f"ss -Htnp state established '( sport = :{port} )'", check=False).stdout
    return sum(1 for line in out.splitlines() if f"pid={pid}," in line)


class HeldRequest(threading.Thread):
    """A GET that takes long (e.g. /sleep?seconds=N), run in the background; records how it ended."""

    def __init__(self, port: int, path: str, timeout: float = 120):
        super().__init__(daemon=True)
        self.port, self.path, self.timeout = port, path, timeout
        self.status: int | None = None
        self.body = b""
        self.error: str | None = None
        self.ended_at: float | None = None
        self.start()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            connection.request("GET", self.path)
            response = connection.getresponse()
            self.status, self.body = response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            connection.close()

    def result(self, timeout: float = 120) -> "HeldRequest":
        self.join(timeout)
        assert not self.is_alive(), f"the request for {self.path} did not end within {timeout}s"
        return self


def wait_in_flight(service: InstalledService, count: int, timeout: float = 15) -> None:
    """Wait until the main's STATUS= says `count` requests are in flight."""
    wait_until(lambda: f"{count} in flight" in status_text(service), timeout=timeout,
               what=f"{count} request(s) in flight (status: {status_text(service)!r})")


def refused(failures: list[str]) -> list[str]:
    return [f for f in failures if "ConnectionRefused" in f]


# ---- one cgroup (v2) per container ---------------------------------------------------------

UNIFIED = "/sys/fs/cgroup/unified"


class IsolatedCgroup:
    """Boot a container inside a cgroup v2 group of its own (where the host has a v2 hierarchy to use).

    Without it, every container booted by this process shares the v2
    ("unified") hierarchy's root: two containers running graceful-http.service
    at the same time then share /system.slice/graceful-http.service there, each
    systemd reads the other's processes as pid 0, and its kills of the unit's
    cgroup fail ("Failed to kill control group …: Input/output error"), so a
    stop no longer waits for, or signals, the unit's other processes.

    Use: `with IsolatedCgroup(name) as group:` start the container, then
    `group.leave()` (this process goes back; the container stays).
    """

    def __init__(self, name: str):
        self.path = os.path.join(UNIFIED, f"gh-test-{name}")
        self.home: str | None = None

    def __enter__(self) -> "IsolatedCgroup":
        if not os.path.exists(os.path.join(UNIFIED, "cgroup.procs")):
            return self  # no v2 hierarchy here: nothing to isolate from
        with open("/proc/self/cgroup") as file:
            for line in file:
                if line.startswith("0::"):
                    self.home = os.path.join(UNIFIED, line[3:].strip().lstrip("/"))
        if self.home is None or not os.path.exists(os.path.join(self.home, "cgroup.procs")):
            self.home = None
            return self
        try:
            os.makedirs(self.path, exist_ok=True)
            self._move(self.path)
        except OSError:
            self.home = None
        return self

    def _move(self, group: str) -> None:
        with open(os.path.join(group, "cgroup.procs"), "w") as file:
            file.write(str(os.getpid()))

    def leave(self) -> None:
        if self.home is not None:
            self._move(self.home)
            self.home = None

    def __exit__(self, *exc) -> None:
        self.leave()
        for root, dirs, _ in os.walk(self.path, topdown=False):
            for name in dirs:
                _rmdir(os.path.join(root, name))
        _rmdir(self.path)


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
