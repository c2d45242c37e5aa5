"""The stable-pid holder: the first process stays, the generations come and go below it.

When graceful-http is PID 1 (a container without an init) or runs outside
systemd, the pid its supervisor started must stay valid across reloads: a
container ends when its PID 1 exits, and docker, podman, Kubernetes,
supervisord or a shell's `$!` signal the pid they started. So that process
stays, as a small holder that

- marks itself child subreaper, so every generation (double-forked by its
  predecessor) and every orphan is reparented to it, and reaps them all;
- binds (or takes from LISTEN_FDS) the listening sockets and passes them to
  generation 1 exactly as a generation passes them to its successor;
- learns the current main from a datagram each new main sends when it takes
  over (the kernel attaches the sender's pid, so it cannot be spoofed), and
  forwards SIGHUP, SIGTERM, SIGINT, SIGQUIT, SIGUSR1 and SIGUSR2 to it;
- exits, once no process of the service is left, with the last main's status.

It never imports the app or the HTTP engine. Generations hand over among
themselves exactly as under systemd; only the main's report is new.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import sys
from typing import TYPE_CHECKING

from graceful_http.holderstate import (
    FORWARDED_SIGNALS,
    HOLDER_FD_VARIABLE,
    MAIN_REPORT,
    STOP_SIGNALS,
    Service,
    holder_wanted,
    parse_report,
)

if TYPE_CHECKING:
    from graceful_http.settings import ServeSettings

_PR_SET_CHILD_SUBREAPER = 36
_CREDENTIALS_SIZE = 12  # struct ucred: pid, uid, gid


def hold_if_wanted(settings: ServeSettings) -> int | None:
    """Called first by `serve`: hold and return the exit code, or None when this process is to serve itself."""
    if not holder_wanted(settings.stable_pid, os.getpid(), os.environ):
        return None
    return Holder(settings).run()


def report_main(generation: int) -> None:
    """Tell the holder (if there is one) that this process is the main now; it then gets the signals."""
    fd_text = os.environ.get(HOLDER_FD_VARIABLE, "")
    if not fd_text.isdigit():
        return
    try:
        with socket.socket(fileno=os.dup(int(fd_text))) as channel:
            if channel.family != socket.AF_UNIX or channel.type != socket.SOCK_DGRAM:
                raise OSError(f"fd {fd_text} in {HOLDER_FD_VARIABLE} is not the holder's channel")
            channel.send(f"{MAIN_REPORT} {generation}".encode(), socket.MSG_DONTWAIT)
    except OSError as exc:  # the holder cannot be gone while we live; a broken fd is worth a line, not a failure
        print(f"graceful-http[{os.getpid()}]: cannot report to the stable-pid holder: {exc}", file=sys.stderr)


def _say(message: str) -> None:
    try:
        print(f"graceful-http[{os.getpid()}] holder: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr gone (a closed pipe): the holder must not die of it, least of all as PID 1


class Holder:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.listeners = []
        self.service: Service | None = None
        self.served = False  # some generation became main (a start that failed leaves only its own line)

    def run(self) -> int:
        from graceful_http.listeners import ListenerError, acquire
        from graceful_http.listenfds import ListenFdsError

        self._become_subreaper()
        try:
            self.listeners = acquire(self.settings.binds)
        except (ListenerError, ListenFdsError) as exc:
            _say(f"cannot start: {exc}")
            return 1
        reports, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        reports.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        reports.setblocking(False)
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        for signum in (*FORWARDED_SIGNALS, signal.SIGCHLD):
            signal.signal(signum, _note)  # the wakeup fd carries the signal; the loop acts on it
        try:
            first = self._start_first_generation(theirs)
        except OSError as exc:
            _say(f"cannot start generation 1: {exc}")
            return 1
        finally:
            theirs.close()
        self.service = Service(main=first)  # until it reports: a signal before then goes to it, too
        return self._loop(reports, wake_read)

    def _become_subreaper(self) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            _say(f"warning: cannot become child subreaper: {os.strerror(ctypes.get_errno())}")

    def _start_first_generation(self, channel: socket.socket) -> int:
        """Fork and exec generation 1 with the sockets at fd 3… (LISTEN_FDS) and the report channel."""
        from graceful_http.spawn import successor_command

        command = successor_command()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the forked child
            try:
                os.setsid()  # leads its own process group, as every later generation does
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `serve` does first: a reload must not kill it
                _exec_with(self.listeners, channel.fileno(), command)
            finally:
                os._exit(127)
        return pid

    def _loop(self, reports: socket.socket, wake_read: int) -> int:
        service = self.service
        while True:
            select.select([wake_read, reports], [], [])
            self._read_reports(reports)  # first: a main that reported before a signal came gets that signal
            try:
                received = os.read(wake_read, 1024)
            except BlockingIOError:
                received = b""
            while True:  # every wake: a SIGCHLD may stand for several exits
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    if self.served:  # a generation that could not start has said why; nothing to add
                        _say(f"no process of the service is left; exiting with the last main's status,"
                             f" {service.exit_code()}")
                    return service.exit_code()
                if pid == 0:
                    break
                if service.reaped(pid, status) and os.WIFSIGNALED(status):
                    _say(f"main pid {pid} was killed by signal {os.WTERMSIG(status)}")
            for signum in received:
                if signum != signal.SIGCHLD:
                    self._deliver(service.signal_received(signum))
                    if signum in STOP_SIGNALS:
                        self._close_listeners()

    def _read_reports(self, reports: socket.socket) -> None:
        while True:
            try:
                message, ancillary, _, _ = reports.recvmsg(64, socket.CMSG_SPACE(_CREDENTIALS_SIZE))
            except BlockingIOError:
                return
            sender = _sender_pid(ancillary)
            generation = parse_report(message)
            if sender is None or generation is None:
                _say(f"ignored a report that is not a main's: {message[:40]!r} from pid {sender}")
                continue
            if not self.served:
                _say(f"pid {os.getpid()} holds the service (stable pid): it forwards signals to the main,"
                     f" generation {generation} (pid {sender})")
            elif sender != self.service.main:
                _say(f"generation {generation} (pid {sender}) is main; signals go to it")
            self.served = True
            self._deliver(self.service.main_reported(sender, generation))

    def _deliver(self, signals: list[tuple[int, int]]) -> None:
        for pid, signum in signals:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _close_listeners(self) -> None:
        """On a stop, drop our copies: once the draining generation stops accepting, new connections are
        refused at once (as without a holder) instead of waiting in the backlog for nobody."""
        for listener in self.listeners:
            listener.sock.close()
        self.listeners = []


def _note(signum, frame) -> None:
    """A Python-level handler, so the signal is caught (and its number written to the wakeup fd)."""


def _sender_pid(ancillary) -> int | None:
    import struct

    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _CREDENTIALS_SIZE:
            return struct.unpack("3i", data[:_CREDENTIALS_SIZE])[0]
    return None


def _exec_with(listeners, channel_fd: int, command: list[str]) -> None:  # pragma: no cover - in the child
    """Sockets at 3…, 3+n left free (a generation passes its successor's handoff channel there), the report
    channel at 3+n+1: no generation ever places an fd on it, so every generation inherits it untouched."""
    from graceful_http.listenfds import LISTEN_FDS_START, successor_environ

    try:
        count = len(listeners)
        channel_target = LISTEN_FDS_START + count + 1
        temporaries = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, channel_target + 1)
                       for fd in [*(listener.sock.fileno() for listener in listeners), channel_fd]]
        for index, fd in enumerate(temporaries[:-1]):
            os.dup2(fd, LISTEN_FDS_START + index, inheritable=True)
        os.dup2(temporaries[-1], channel_target, inheritable=True)
        environ = successor_environ(os.environ, [listener.name for listener in listeners], os.getpid())
        environ[HOLDER_FD_VARIABLE] = str(channel_target)
        os.execve(command[0], command, environ)
    except BaseException as exc:
        os.write(2, f"graceful-http: cannot start generation 1: {exc}\n".encode())
