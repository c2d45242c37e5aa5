"""graceful-http installed in a throwaway systemd: the shipped units plus a test drop-in.

The drop-in changes only what a test must: where the code is (the checkout,
bound read-only), which interpreter runs it (the venv with the newest uvicorn
from PyPI, or Debian's python3 with python3-uvicorn 0.17.6), the port, and
the app. Everything else, hardening included, is the shipped unit.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from harness.container import SystemdContainer, require_container_support
from harness.processes import free_port

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "packaging" / "systemd"
SERVICE = "graceful-http.service"
SOCKET = "graceful-http.socket"
CONTROL_SOCKET = "graceful-http-control.socket"
CONTROL_PATH = "/run/graceful-http/control.sock"
CODE_DIR = "/opt/graceful-http/service"
VENV_DIR = "/opt/graceful-http/venv"
APP_DIR = "/srv/app"

ENGINES = {
    "pypi": f"{VENV_DIR}/bin/python",  # the newest uvicorn, installed by tests/run
    "debian": "/usr/bin/python3",  # Debian 12's python3-uvicorn 0.17.6
}


def venv_path() -> Path:
    return Path(os.environ.get("GRACEFUL_HTTP_TEST_VENV", REPO / ".venv"))


class InstalledService:
    """A booted container with graceful-http's units installed and a test drop-in."""

    def __init__(self, name: str, engine: str, serve_args: str = "", service_extra: str = "",
                 root: str | None = None):
        """`root`: boot this root file system (e.g. a debootstrapped Debian 13, for its systemd) instead of the
        host's, under a tmpfs overlay (it is not written to); the venv's interpreter (the host's python, with
        the PyPI engine) is bound into it."""
        require_container_support()
        venv = venv_path()
        if engine == "pypi" and not (venv / "bin" / "python").exists():
            raise RuntimeError(f"no venv at {venv}: run tests/run, which makes it")
        if root is not None and engine != "pypi":
            raise ValueError("another root runs the venv's engine only")
        self.engine = engine
        self.python = ENGINES[engine]
        self.port = free_port()
        binds = {str(REPO / "service"): CODE_DIR, str(venv): VENV_DIR}
        if root is not None:
            interpreter = os.path.realpath(venv / "bin" / "python")
            version = f"python{sys.version_info.major}.{sys.version_info.minor}"
            binds.update({interpreter: os.readlink(venv / "bin" / "python3") if (venv / "bin" / "python3").is_symlink()
                          else interpreter, f"/usr/lib/{version}": f"/usr/lib/{version}",
                          "/usr/lib/python3/dist-packages": "/usr/lib/python3/dist-packages"})
        self.container = SystemdContainer(name, binds_ro=binds, directory=root, overlay=root is not None)
        self.serve_args = serve_args
        self.service_extra = service_extra

    def __enter__(self) -> "InstalledService":
        c = self.container
        c.start()
        try:
            for unit in (SERVICE, SOCKET, CONTROL_SOCKET):
                c.write_file(f"/etc/systemd/system/{unit}", (UNITS / unit).read_text())
            c.write_file(f"/etc/systemd/system/{SOCKET}.d/test.conf",
                         f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{self.port}\n")
            c.write_file(f"/etc/systemd/system/{SERVICE}.d/test.conf", self.drop_in())
            c.run(f"mkdir -p {APP_DIR} && chmod 755 {APP_DIR}")
            c.systemctl("daemon-reload")
        except BaseException:
            c.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.container.stop()

    def drop_in(self) -> str:
        command = f"{self.python} -m graceful_http"
        # A PIDFile= in the shipped unit is only true if the service writes it: keep that.
        pid_file = re.search(r"^PIDFile=(\S+)", (UNITS / SERVICE).read_text(), re.MULTILINE)
        pid_file_arg = f"--pid-file {pid_file.group(1)} " if pid_file else ""
        return (
            "[Service]\n"
            f"Environment=PYTHONPATH={CODE_DIR} PYTHONDONTWRITEBYTECODE=1\n"
            "ExecStart=\n"
            f"ExecStart={command} serve --app-dir {APP_DIR} {pid_file_arg}{self.serve_args}\n"
            "ExecReload=\n"
            f"ExecReload=+{command} reload\n"  # as the shipped unit: outside the sandbox
            # The load in these tests logs thousands of access lines a second;
            # journald's default rate limit would drop lifecycle lines with them.
            "LogRateLimitIntervalSec=0\n"
            f"{self.service_extra}"
        )

    # -- conveniences

    def write_app(self, name: str, source: str) -> None:
        self.container.write_file(f"{APP_DIR}/{name}.py", source)

    def main_pid(self) -> int:
        return int(self.container.show(SERVICE, "MainPID")["MainPID"])

    def state(self) -> dict[str, str]:
        return self.container.show(SERVICE, "MainPID", "ActiveState", "SubState", "NRestarts", "Result")

    def cgroup_pids(self) -> list[int]:
        group = self.container.show(SERVICE, "ControlGroup")["ControlGroup"]
        if not group:
            return []
        # cgroup v2, or the name=systemd hierarchy of v1/hybrid (what these machines boot).
        out = self.container.run(f"cat /sys/fs/cgroup{group}/cgroup.procs 2>/dev/null"
                                 f" || cat /sys/fs/cgroup/systemd{group}/cgroup.procs").stdout
        return [int(line) for line in out.split()]

    def children(self, pid: int) -> list[int]:
        out = self.container.run(f"cat /proc/{pid}/task/*/children", check=False).stdout
        return [int(p) for p in out.split()]

    def generation(self, main: int) -> set[int]:
        """The processes of the generation whose main is `main`: it and its children (its workers, or with one
        process its standby)."""
        return {main, *self.children(main)}

    def cmdline(self, pid: int) -> list[str]:
        out = self.container.run(f"cat /proc/{pid}/cmdline", check=False).stdout
        return out.split("\0")[:-1]

    def policies(self, pid: int) -> set[int]:
        """The scheduling policy of every thread of `pid` (field 41 of /proc/<pid>/task/<tid>/stat: 0 is
        SCHED_OTHER, 5 SCHED_IDLE)."""
        out = self.container.run(f"cat /proc/{pid}/task/*/stat", check=False).stdout
        return {int(line.rpartition(")")[2].split()[38]) for line in out.splitlines() if line}

    def nice_limit(self, pid: int) -> int:
        """RLIMIT_NICE (soft) of `pid`: 20 lets it take nice 0 back (see `startpriority`)."""
        out = self.container.run(f"cat /proc/{pid}/limits", check=False).stdout
        return int(next(line.split()[3] for line in out.splitlines() if line.startswith("Max nice priority")))

    def journal(self) -> str:
        return self.container.journal(SERVICE)

    def whole_journal(self) -> str:
        return self.container.run("journalctl --no-pager -o cat").stdout

    def control_post(self, path: str = "/graceful") -> tuple[int, str]:
        """POST over the admins' control socket, as root inside the container: (status, body)."""
        out = self.container.run(f"curl -sS --unix-socket {CONTROL_PATH} -X POST -w '\\n%{{http_code}}'"
                                 f" http://localhost{path}").stdout
        body, _, status = out.rpartition("\n")
        return int(status), body

    def reload(self, check: bool = True):
        """`systemctl reload`, once the unit's start has finished. systemd folds a reload asked while the unit
        is still activating into its start job and reloads nothing, yet systemctl exits 0; a socket-activated
        service answers its first request before systemd has read its READY=1, so a test that reloads right
        after that answer would otherwise race it (seen in CI: a "reload" that left MainPID as it was)."""
        self.container.wait_for(lambda: self.container.show(SERVICE, "ActiveState")["ActiveState"] != "activating",
                                timeout=90, what=f"{SERVICE} to finish starting before the reload")
        return self.container.systemctl("reload", SERVICE, check=check, timeout=120)


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))
