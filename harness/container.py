"""Boot a throwaway real systemd as PID 1 in a container, for end-to-end tests.

The machines that run the tests (Debian 12, systemd 252) do not have systemd
as PID 1, yet the things worth testing here -- socket activation, sd_notify,
``MAINPID=`` handoffs on reload, restarts, the journal -- only exist under a
real service manager.  ``systemd-nspawn`` can boot one in under a second on
top of the host's own ``/usr``::

    systemd-nspawn -D / --volatile=yes --console=pipe --register=no \\
        --keep-unit -b -M NAME [--bind-ro=HOST:CONTAINER ...]

* ``--volatile=yes``: the container's root is a fresh tmpfs and only ``/usr``
  (plus what we bind) comes from the host, so every container starts clean
  and nothing it writes survives it.
* ``--register=no --keep-unit``: there is no host systemd to register with.
* ``directory=ROOT`` boots a whole root file system of its own instead (e.g. a
  fresh Debian made with debootstrap), read-write and without ``--volatile``:
  what it writes stays in ROOT, so give each container its own copy.
* The network is the host's: a socket unit listening on 127.0.0.1:PORT inside
  is reachable from the test at 127.0.0.1:PORT.  Give each test its own port
  and machine name.

Commands run inside through ``nsenter -t <container PID 1> -a``.  See
/work/shared/notes/systemd-in-a-container.md for the facts this relies on.

Typical use::

    require_container_support()          # fail loudly, never skip
    with SystemdContainer("gh-e2e-1", binds_ro={venv: venv}) as c:
        c.write_file("/etc/systemd/system/x.socket", SOCKET_UNIT)
        c.systemctl("daemon-reload")
        c.systemctl("start", "x.socket")
        c.wait_for(lambda: "ready" in c.journal("x.service"),
                   what="x.service to log 'ready'")

Only the standard library is used, so this works before anything else of the
project is installed.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Callable, TypeVar

__all__ = [
    "ContainerError",
    "SystemdContainer",
    "require_container_support",
    "wait_until",
]

T = TypeVar("T")

# States of `systemctl is-system-running` that mean "booted".  "degraded" is
# normal here: systemd-firstboot fails on the volatile root, which is harmless.
_BOOTED_STATES = ("running", "degraded")

# Commands inside get this environment instead of the test runner's, so that
# e.g. VIRTUAL_ENV or PYTHONPATH set for pytest do not leak in: a command sees
# roughly what a unit would.
_CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
}

_STOP_GRACE_SECONDS = 15

# The host's cgroup v2 hierarchy, where a host without systemd as PID 1 has one
# (hybrid layout). Without a group of its own, every container booted from here
# sits at its root, so containers running the same unit at the same time share
# /system.slice/UNIT there: each systemd reads the others' processes as pid 0,
# and its kills of the unit's cgroup fail ("Failed to kill control group …:
# Input/output error"), so a stop no longer signals or waits for the unit's
# other processes.
_UNIFIED = "/sys/fs/cgroup/unified"


class ContainerError(RuntimeError):
    """The container failed to boot, or a command inside it failed."""


def require_container_support() -> None:
    """Raise RuntimeError naming whatever is missing to boot test containers.

    End-to-end tests call this instead of skipping: on CI a missing tool must
    fail the run, not quietly turn the important tests into no-ops.
    """
    missing = []
    if os.geteuid() != 0:
        missing.append("root privileges (systemd-nspawn and nsenter need euid 0)")
    if shutil.which("systemd-nspawn") is None:
        missing.append("systemd-nspawn (apt-get install systemd-container)")
    if shutil.which("nsenter") is None:
        missing.append("nsenter (apt-get install util-linux)")
    if not os.path.exists("/usr/lib/systemd/systemd"):
        missing.append("/usr/lib/systemd/systemd (apt-get install systemd)")
    if missing:
        raise RuntimeError(
            "cannot boot systemd test containers; missing: " + "; ".join(missing)
        )


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Things in the container happen asynchronously (units start, journald
    flushes, a handoff completes), so tests poll instead of sleeping for a
    guessed time.  Exceptions from ``predicate`` propagate at once; catch them
    inside the predicate if they are expected while waiting.  Raises
    TimeoutError naming ``what`` and the last value seen.
    """
    label = what or repr(predicate)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout}s waiting for {label}"
                f" (last result: {value!r})"
            )
        time.sleep(interval)


class SystemdContainer:
    """A systemd (PID 1) booted with systemd-nspawn on the host's /usr.

    Use as a context manager, or call start() and stop() yourself.  ``name``
    is the machine name (hostname inside) and must be unique among the
    containers running at the same time.  ``binds_ro`` maps host paths to
    container paths, bound read-only (e.g. the source tree or a venv made with
    ``/usr/bin/python3 -m venv --system-site-packages``, bound at the same
    path so its interpreter link still resolves).  ``directory``, if given,
    is a root file system to boot instead of the host's /usr on a tmpfs (for
    example a copy of a debootstrapped Debian): it is booted read-write, so
    the caller owns the copy and deletes it afterwards; or, with ``overlay``,
    read-only under a tmpfs overlay, so the root itself needs no copy.
    """

    def __init__(
        self,
        name: str,
        binds_ro: dict[str, str] | None = None,
        boot_timeout: float = 60,
        directory: str | None = None,
        overlay: bool = False,
    ) -> None:
        self.name = name
        self.overlay = overlay
        self.binds_ro = dict(binds_ro or {})
        self.boot_timeout = boot_timeout
        self.directory = directory
        #: Host PID of the container's PID 1 (systemd) while it runs, else None.
        self.init_pid: int | None = None
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._log_path: str | None = None
        self._cgroup: str | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Boot the container and wait until systemd reports running/degraded.

        On any failure the nspawn process is stopped again (nothing is left
        behind) and ContainerError carries the tail of nspawn's output, which
        includes the container's console.
        """
        if self._nspawn is not None:
            raise ContainerError(f"container {self.name} is already started")
        require_container_support()
        for host_path in self.binds_ro:
            if not os.path.exists(host_path):
                raise ContainerError(f"bind source does not exist: {host_path}")
        if self.directory is not None and not any(
            os.path.exists(os.path.join(self.directory, init))
            for init in ("usr/lib/systemd/systemd", "lib/systemd/systemd")
        ):
            raise ContainerError(f"no systemd to boot in {self.directory}")

        fd, self._log_path = tempfile.mkstemp(prefix=f"nspawn-{self.name}-", suffix=".log")
        if self.directory is None:
            root = ["-D", "/", "--volatile=yes"]
        elif self.overlay:  # read-only, with a tmpfs over it: no copy to make, nothing written to it
            root = ["-D", self.directory, "--volatile=overlay"]
        else:
            root = ["-D", self.directory]
        cmd = [
            "systemd-nspawn",
            *root,
            "--console=pipe",
            "--register=no",
            "--keep-unit",
            "-M", self.name,
        ]
        cmd += [f"--bind-ro={host}:{inside}" for host, inside in self.binds_ro.items()]
        cmd.append("-b")
        self._cgroup = _own_cgroup(self.name)
        cgroup = self._cgroup
        try:
            # Own session: Ctrl-C in the test runner's terminal must not reach
            # nspawn directly; stop() shuts the container down in order.
            self._nspawn = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=(lambda: _join_cgroup(cgroup)) if cgroup else None,
            )
        finally:
            os.close(fd)
        # Safety net for a test that forgets stop(); stop() unregisters it.
        atexit.register(self.stop)
        try:
            self._wait_for_boot(time.monotonic() + self.boot_timeout)
        except BaseException as exc:
            # Read the log before it is deleted.  Ask for an orderly shutdown
            # only if systemd got far enough to honour one.
            tail = self.log_tail()
            self._shut_down(grace=_STOP_GRACE_SECONDS if self.init_pid else 0)
            if isinstance(exc, ContainerError):
                raise ContainerError(f"{exc}\n--- nspawn output (tail) ---\n{tail}") from None
            raise

    def stop(self) -> None:
        """Shut the container down: SIGTERM to nspawn, SIGKILL after 15 s.

        SIGTERM makes nspawn ask systemd for an orderly poweroff, which takes
        a few seconds at most.  Safe to call more than once.
        """
        self._shut_down(grace=_STOP_GRACE_SECONDS)

    def _shut_down(self, grace: float) -> None:
        proc = self._nspawn
        if proc is None:
            return
        atexit.unregister(self.stop)
        try:
            if proc.poll() is None and grace > 0:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                self._kill(proc)
        finally:
            self._nspawn = None
            self.init_pid = None
            _remove_cgroup(self._cgroup)
            self._cgroup = None
            if self._log_path is not None:
                try:
                    os.unlink(self._log_path)
                except FileNotFoundError:
                    pass
                self._log_path = None

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the container's processes, then nspawn.

        Killing only nspawn would orphan the container: its PID 1 lives on,
        reparented to the host's init (seen when stopping a container that had
        not finished booting: systemd ignores the halt request until it has
        installed its signal handlers).  SIGKILL to PID 1 of the container's
        PID namespace takes the whole namespace with it; nspawn then exits on
        its own.  Children are re-listed each round because nspawn may still
        be creating the container.
        """
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            for pid in _children(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def __enter__(self) -> SystemdContainer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines nspawn wrote (its messages and the container console)."""
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as exc:
            return f"(could not read {self._log_path}: {exc})"

    # -- commands inside -----------------------------------------------------

    def run(
        self,
        command: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``sh -c command`` inside the container; capture text output.

        With ``check`` a non-zero exit raises ContainerError showing the
        command, exit code, stdout and stderr, so a failing test explains
        itself.  A timeout kills the command (inside too) and raises
        ContainerError.  The environment is a minimal one, not the runner's.
        """
        if self.init_pid is None:
            raise ContainerError(f"container {self.name} is not running (cannot run {command!r})")
        argv = ["nsenter", "-t", str(self.init_pid), "-a", "sh", "-c", command]
        # Own process group, so that on timeout the shell nsenter forked inside
        # the container's PID namespace is killed as well, not only nsenter.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_CONTAINER_ENV,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            stdout, stderr = proc.communicate()
            raise ContainerError(
                _describe(f"timed out after {timeout}s in {self.name}", command, None, stdout, stderr)
            ) from None
        result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise ContainerError(
                _describe(f"command failed in {self.name}", command, result.returncode, stdout, stderr)
            )
        return result

    def write_file(self, path: str, content: str, mode: int = 0o644) -> None:
        """Create or replace a file inside (parent directories included).

        Mainly for units in /etc/systemd/system and their drop-ins; remember
        ``systemctl daemon-reload`` afterwards.  Written from inside, so paths
        resolve as the container sees them.
        """
        q = shlex.quote(path)
        self.run(
            f"mkdir -p -- \"$(dirname -- {q})\" && cat > {q} && chmod {mode:o} -- {q}",
            input=content,
        )

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """``systemctl --no-pager ARGS`` inside (e.g. start blocks until started)."""
        return self.run(
            "systemctl --no-pager " + shlex.join(args), check=check, timeout=timeout
        )

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` of ``unit`` as a dict (only ``props`` if given).

        Values are the raw strings systemctl prints, e.g.
        ``{"ActiveState": "active", "MainPID": "123"}``.
        """
        args = ["show", unit]
        if props:
            args.append("--property=" + ",".join(props))
        out = self.systemctl(*args).stdout
        values = {}
        for line in out.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key] = value
        return values

    def journal(
        self, unit: str, output: str = "cat", since_cursor: str | None = None
    ) -> str:
        """The unit's journal as text (``journalctl -u unit -o output``).

        journald receives messages asynchronously: poll with wait_for() for a
        line you expect rather than reading once.  ``since_cursor`` (from
        journal_cursor()) limits it to entries after that point, e.g. to look
        only at what one reload logged.
        """
        args = ["journalctl", "--no-pager", "--quiet", "-u", unit, "-o", output]
        if since_cursor is not None:
            args.append(f"--after-cursor={since_cursor}")
        return self.run(shlex.join(args)).stdout

    def journal_json(self, unit: str, since_cursor: str | None = None) -> list[dict]:
        """The unit's journal entries as dicts (``-o json``), oldest first.

        Useful for fields such as ``_PID``, ``PRIORITY`` or ``MESSAGE``, which
        the cat format hides.
        """
        text = self.journal(unit, output="json", since_cursor=since_cursor)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def journal_cursor(self) -> str | None:
        """Cursor of the newest journal entry (any unit), for ``since_cursor``.

        None if the journal is still empty.
        """
        out = self.run("journalctl --no-pager --quiet -n 1 -o json").stdout.strip()
        return json.loads(out)["__CURSOR"] if out else None

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 30,
        interval: float = 0.05,
        what: str = "",
    ) -> T:
        """wait_until(), but fail at once if the container itself has died."""

        label = what or repr(predicate)

        def alive_and(pred: Callable[[], T]) -> T:
            if self._nspawn is None or self._nspawn.poll() is not None:
                raise ContainerError(
                    f"container {self.name} exited while waiting for {label}\n"
                    f"--- nspawn output (tail) ---\n{self.log_tail()}"
                )
            return pred()

        return wait_until(lambda: alive_and(predicate), timeout, interval, label)

    # -- boot ----------------------------------------------------------------

    def _wait_for_boot(self, deadline: float) -> None:
        self.init_pid = self._wait_for_init_pid(deadline)
        # systemctl may fail while systemd is still setting up (no bus yet);
        # retry until it gives a verdict, which --wait holds back until the
        # boot is over.
        last = ""
        while True:
            self._check_nspawn_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ContainerError(
                    f"container {self.name} did not finish booting within "
                    f"{self.boot_timeout}s (last: {last!r})"
                )
            try:
                result = self.run(
                    "systemctl is-system-running --wait",
                    check=False,
                    timeout=max(remaining, 0.1),
                )
            except ContainerError as exc:  # timed out: the deadline check ends it
                last = str(exc)
                continue
            state = result.stdout.strip()
            last = state or result.stderr.strip()
            if state in _BOOTED_STATES:
                return
            if state in ("maintenance", "stopping"):
                raise ContainerError(f"container {self.name} boot ended in state {state!r}")
            time.sleep(0.1)

    def _wait_for_init_pid(self, deadline: float) -> int:
        """Find the container's PID 1 among nspawn's children.

        nspawn briefly has another child while setting up, so take the child
        that is PID 1 in its own PID namespace, and wait until it has exec'd
        systemd (before that, nsenter would land in a half-built container).
        """
        assert self._nspawn is not None
        while True:
            self._check_nspawn_alive()
            for pid in _children(self._nspawn.pid):
                if _ns_pid(pid) == 1 and _comm(pid) == "systemd":
                    return pid
            if time.monotonic() >= deadline:
                raise ContainerError(
                    f"container {self.name}: systemd did not start as PID 1 within "
                    f"{self.boot_timeout}s"
                )
            time.sleep(0.02)

    def _check_nspawn_alive(self) -> None:
        assert self._nspawn is not None
        code = self._nspawn.poll()
        if code is not None:
            raise ContainerError(f"systemd-nspawn for {self.name} exited with status {code}")


def _own_cgroup(name: str) -> str | None:
    """A fresh cgroup v2 group for one container, or None where there is no such hierarchy to use."""
    if not os.path.exists(os.path.join(_UNIFIED, "cgroup.procs")):
        return None
    path = os.path.join(_UNIFIED, f"test-container-{name}-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    return path


def _join_cgroup(path: str) -> None:  # in the forked child, before exec
    with open(os.path.join(path, "cgroup.procs"), "w") as file:
        file.write(str(os.getpid()))


def _remove_cgroup(path: str | None) -> None:
    """Remove the container's group and what its systemd made inside (all empty once it is gone)."""
    if path is None:
        return
    for root, dirs, _ in os.walk(path, topdown=False):
        for name in dirs:
            try:
                os.rmdir(os.path.join(root, name))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def _describe(
    headline: str, command: str, code: int | None, stdout: str, stderr: str
) -> str:
    return (
        f"{headline}: {command}\n"
        f"exit code: {code}\n"
        f"--- stdout ---\n{stdout.rstrip()}\n"
        f"--- stderr ---\n{stderr.rstrip()}"
    )


def _children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return children
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass
    return children


def _ns_pid(pid: int) -> int | None:
    """The PID of ``pid`` in its innermost PID namespace (NSpid's last field)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
