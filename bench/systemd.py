"""Servers under a real systemd 252, booted in a container (harness/): socket units on 127.0.0.1.

One container holds both:
- graceful-http's shipped units with the tests' drop-in (InstalledService), reloaded with `systemctl reload`;
- a plain uvicorn started by its own socket unit (`uvicorn --fd 3`), reloaded the only way it can be: `systemctl
  restart` (the socket stays open, so connections wait in its backlog meanwhile).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from bench.servers import REPO, UVICORN_ENGINE, BenchError, Reload, free_port, wait_serving
from harness.systemd_service import APP_DIR, SERVICE, SOCKET, VENV_DIR, InstalledService

APP_MODULE = "benchapp"
# What bench.unit_ab's side B and the "idle start" rows add to the unit (see SystemdGraceful.grant_idle_start).
IDLE_START_GRANT = "CapabilityBoundingSet=CAP_SYS_NICE\nAmbientCapabilities=CAP_SYS_NICE\nPrivateUsers=no\n"
UVICORN_UNIT = "bench-uvicorn"


class Containers:
    """Boot the container once; `graceful(workers)` and `uvicorn(workers)` are the servers in it."""

    def __init__(self, workers: int):
        # InstalledService binds the venv named here at /opt/graceful-http/venv: ours, so that the
        # engine inside is the very uvicorn/uvloop/httptools the other servers run.
        os.environ["GRACEFUL_HTTP_TEST_VENV"] = sys.prefix
        self.workers = workers
        self.service = InstalledService(f"gh-bench-{os.getpid()}", "pypi",
                                        serve_args=f"{APP_MODULE}:app --no-access-log --workers {workers}")
        self.uvicorn_port = free_port()

    def __enter__(self) -> "Containers":
        self.service.__enter__()
        try:
            c = self.service.container
            self.service.write_app(APP_MODULE, (REPO / "bench" / "app.py").read_text())
            c.write_file(f"/etc/systemd/system/{UVICORN_UNIT}.socket",
                         "[Socket]\n"
                         f"ListenStream=127.0.0.1:{self.uvicorn_port}\n"
                         "Backlog=4096\n")
            workers = f" --workers {self.workers}" if self.workers > 1 else ""
            c.write_file(f"/etc/systemd/system/{UVICORN_UNIT}.service",
                         "[Unit]\n"
                         # Restarted every second or two here: systemd's start rate limit would refuse.
                         "StartLimitIntervalSec=0\n"
                         f"Requires={UVICORN_UNIT}.socket\n"
                         f"After={UVICORN_UNIT}.socket\n"
                         "[Service]\n"
                         "Environment=PYTHONDONTWRITEBYTECODE=1\n"
                         f"ExecStart={VENV_DIR}/bin/python -m uvicorn {APP_MODULE}:app --app-dir {APP_DIR} --fd 3 "
                         f"{shlex.join(UVICORN_ENGINE)} --log-level warning{workers}\n"
                         "DynamicUser=yes\n")
            c.systemctl("daemon-reload")
        except BaseException:
            self.service.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.service.__exit__(*exc)

    def graceful(self) -> "SystemdGraceful":
        return SystemdGraceful(self)

    def uvicorn(self) -> "SystemdUvicorn":
        return SystemdUvicorn(self)


class _InContainer:
    name = ""
    reload_how = ""
    unit = ""

    def __init__(self, containers: Containers):
        self.containers = containers
        self.container = containers.service.container
        self.workers = containers.workers

    @property
    def label(self) -> str:
        return f"{self.name} ({self.reload_how}, workers={self.workers})"

    def main_pid(self) -> int:
        return int(self.container.show(self.unit, "MainPID")["MainPID"])

    def start(self) -> None:
        self.container.systemctl("start", self.unit)
        wait_serving(self.port)

    def stop(self) -> None:
        self.container.systemctl("stop", self.unit, check=False)

    def log_tail(self, lines: int = 30) -> str:
        return self.container.run(f"journalctl --no-pager -o cat -n {lines} -u {self.unit}", check=False).stdout

    def _systemctl_timed(self, verb: str) -> Reload:
        record = Reload(time.monotonic())
        result = self.container.systemctl(verb, self.unit, check=False)
        record.done = time.monotonic()
        record.ok = result.returncode == 0
        record.detail = (result.stderr or result.stdout).strip()[-300:]
        # No `systemctl show MainPID` here: it would run (nsenter, a shell, systemctl, PID 1 answering on D-Bus)
        # in the very second whose latency is measured; which pids answered comes from the load tool.
        return record


class SystemdGraceful(_InContainer):
    name = "graceful-http under systemd"
    reload_how = "systemctl reload"
    unit = SERVICE

    def __init__(self, containers: Containers):
        super().__init__(containers)
        self.port = containers.service.port

    def start(self) -> None:
        self.container.systemctl("start", SOCKET)
        super().start()

    def reload(self) -> Reload:
        return self._systemctl_timed("reload")

    def set_workers(self, workers: int) -> None:
        """Change --workers in the drop-in and restart (a changed command line needs a restart)."""
        service = self.containers.service
        service.serve_args = f"{APP_MODULE}:app --no-access-log --workers {workers}"
        self.container.write_file(f"/etc/systemd/system/{SERVICE}.d/test.conf", service.drop_in())
        self.container.systemctl("daemon-reload")
        self.container.systemctl("restart", SERVICE)
        wait_serving(self.port)
        self.workers = workers

    def timed_reload_inside(self) -> dict[str, float]:
        """One `systemctl reload`, timed inside the container (nsenter's own start is not in the figure).

        Seconds: "total" until `systemctl reload` returns; from the journal's timestamps (the same clock),
        "before" until graceful-http logged the request, "service" from there until the new generation
        logged that it took over as main (MAINPID is then its own).
        """
        cursor = self.container.run("journalctl -q -n 0 --show-cursor", check=False).stdout
        after = cursor.strip().rpartition("cursor: ")[2]
        script = (f"s=$(date +%s%N); systemctl reload {SERVICE} || echo FAIL; e=$(date +%s%N); "
                  "echo $(( s / 1000 )) $(( e / 1000 ))")
        out = self.container.run(script, timeout=120).stdout
        if "FAIL" in out:
            raise BenchError(f"systemctl reload failed inside the container:\n{out}\n{self.log_tail()}")
        started, ended = (int(field) for field in out.split()[-2:])
        times = {"total": (ended - started) / 1e6}
        journal = self.container.run(f"journalctl -u {SERVICE} -o json --after-cursor={shlex.quote(after)}",
                                     check=False).stdout
        requested = took_over = None
        for line in journal.splitlines():
            entry = json.loads(line)
            message, at = str(entry.get("MESSAGE", "")), int(entry["__REALTIME_TIMESTAMP"])
            if requested is None and message.startswith("reload requested by"):
                requested = at
            elif took_over is None and message.startswith("took over as main"):
                took_over = at
        if requested is not None and took_over is not None:
            times["before"] = (requested - started) / 1e6
            times["service"] = (took_over - requested) / 1e6
        return times

    def idle_start_in_effect(self) -> bool:
        """Could systemd apply the shipped unit's LimitNICE=+0 here (then a new generation starts at SCHED_IDLE
        and can leave it: see startpriority)?"""
        return self.containers.service.nice_limit(self.main_pid()) >= 20

    def grant_idle_start(self, granted: bool) -> None:
        """What LimitNICE=+0 allows on a host, the other way the kernel allows it (CAP_SYS_NICE), for a machine
        whose systemd cannot apply the limit (its root lacks CAP_SYS_RESOURCE, as here); restarts the unit."""
        path = f"/etc/systemd/system/{SERVICE}.d/zz-bench-idle-start.conf"
        if granted:
            self.container.write_file(path, f"[Service]\n{IDLE_START_GRANT}")
            self.name = f"{SystemdGraceful.name}, idle start (CAP_SYS_NICE granted)"
        else:
            self.container.run(f"rm -f {path}")
            self.name = SystemdGraceful.name
        self.container.systemctl("daemon-reload")
        self.container.systemctl("restart", SERVICE)
        wait_serving(self.port)

    def set_exec_reload(self, command: str | None) -> None:
        """Replace ExecReload= (None: back to graceful-http's), for the no-op reference."""
        path = f"/etc/systemd/system/{SERVICE}.d/zz-bench-reload.conf"
        if command is None:
            self.container.run(f"rm -f {path}")
        else:
            self.container.write_file(path, f"[Service]\nExecReload=\nExecReload={command}\n")
        self.container.systemctl("daemon-reload")


class SystemdUvicorn(_InContainer):
    name = "uvicorn --fd 3 under a socket unit"
    reload_how = "systemctl restart"
    unit = f"{UVICORN_UNIT}.service"

    def __init__(self, containers: Containers):
        super().__init__(containers)
        self.port = containers.uvicorn_port

    def start(self) -> None:
        self.container.systemctl("start", f"{UVICORN_UNIT}.socket")
        super().start()

    def reload(self) -> Reload:
        return self._systemctl_timed("restart")


def boot_check() -> Path:
    """Fail (never skip) when containers cannot be booted here."""
    from harness.container import require_container_support

    require_container_support()
    return Path(sys.prefix)
