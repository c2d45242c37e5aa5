"""Start a new generation as a fork of this main, without exec, when exec would load the very code that is
loaded here: the new main then shares this one's interpreter, engine and graceful-http pages copy-on-write
instead of importing them again.

Why: during a worker-by-worker rollout two mains run side by side, and an exec'd new main is a second copy
of everything a main imports (about 20 MB, measured), on top of the one extra worker the rollout allows.

When: only a main with workers that has imported neither the app (no --preload) nor prometheus_client (no
--metrics); only with the same command and the same PYTHON*/LD_* variables; and only if no file this process
has loaded (the modules in sys.modules, the interpreter and shared libraries it maps) has changed since this
process (or the exec'd ancestor it was forked from) started: a new graceful-http, uvicorn or Python install,
or any edited module, is exec'd, as always. "Changed" is judged by the inode change time, which every write,
rename or install sets (unlike mtime, which installers preserve). The app (imported by the workers), the
configuration and the environment file are read anew by the new generation either way.

How: the fork is made from a thread of its own, so that the new generation's only thread starts on a short
stack, not inside the old main's running loop (which it would otherwise run within, one level deeper at
each reload). What exec would reset is reset by hand: the old main's close-on-exec descriptors closed, the
signal handlers restored, the environment replaced. The old main's objects stay where its thread left them
(frozen out of the collector, never run again): memory nothing can free, which grows with each forked
generation, so once it would pass LEFTOVER_BUDGET the next generation is exec'd. How much a fork keeps
depends on what it is a fork of: a serving main of workers keeps its loop and servers (about 0.35 MB of
anonymous memory a generation, measured), a standby only its own frames and its main's before the app
(about 0.06 MB; see `standby`). The exec'd generation starts an interpreter (about 180 ms of CPU) while
the old one serves: with the standby's smaller share that happens every 43rd reload, not every 9th.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Callable, Iterable, Mapping


def unchanged_since(paths: Iterable[str], since_ns: int, change_time: Callable[[str], int | None]) -> bool:
    """True if every file in `paths` still exists and was last changed (inode change time, ns) before
    `since_ns`; a file that cannot be examined counts as changed."""
    for path in paths:
        changed = change_time(path)
        if changed is None or changed >= since_ns:
            return False
    return True


# Mappings named like files that hold no code: shared memory (a memfd, SysV, POSIX's /dev/shm, a shared anonymous
# mapping shown as /dev/zero), devices, hugepages, AIO rings. The kernel names most of them "… (deleted)", which
# would read as a replaced library: a forking process that maps one (a library's, or a balance table a test
# left mapped, as in CI once) would be exec'd at every reload. (An app's never are: apps load after the fork.)
NOT_CODE = ("/memfd:", "/SYSV", "/dev/", "/anon_hugepage", "/[")


def mapped_files(maps_text: str) -> tuple[set[str], bool]:
    """(the files mapped in a /proc/<pid>/maps text, whether any of them was deleted or replaced)."""
    files: set[str] = set()
    replaced = False
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/") or fields[5].startswith(NOT_CODE):
            continue
        path = fields[5]
        if path.endswith(" (deleted)"):
            replaced = True
        else:
            files.add(path)
    return files, replaced


def loaded_files(module_files: Iterable[str] | None = None) -> set[str] | None:
    """Every file whose contents this process runs: its modules' files (`module_files`, if listed ahead) and its
    mapped files; None if a mapped file was replaced."""
    with open("/proc/self/maps") as file:
        files, replaced = mapped_files(file.read())
    if replaced:
        return None
    files.update(_module_files() if module_files is None else module_files)
    return files


def _module_files() -> list[str]:
    paths = []
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and os.path.isabs(path):
            paths.append(path)
    return paths


def _change_time(path: str) -> int | None:
    try:
        return os.stat(path).st_ctime_ns
    except OSError:
        return None


def _process_start_ns() -> int:
    """When this process started, as wall-clock time (rounded down to the clock tick the kernel counts in)."""
    import time

    with open("/proc/self/stat") as file:
        ticks = int(file.read().rpartition(")")[2].split()[19])
    since_boot = ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return time.time_ns() - (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - since_boot)


# When the code loaded here was loaded, at the latest: set on import, in a main that was exec'd (its forks
# inherit it with the code).
CODE_LOADED_SINCE_NS = _process_start_ns()


def same_code_as_on_disk() -> bool:
    files = loaded_files(_listed_ahead[1].split("\0") if _listed_ahead_still_whole() else None)
    return files is not None and unchanged_since(files, CODE_LOADED_SINCE_NS, _change_time)


def list_module_files_ahead() -> None:
    """Before forking a standby: list the files of the modules loaded, unless an ancestor did with as many
    loaded, so that a generation forked from it later only examines them. Listing them goes through every
    module, and in a fork, touching an object copies its page: about 550 copy-on-write faults and 4 ms of CPU
    (measured) in every new generation's start; now in an exec'd one's only. (One string, not a tuple of them,
    for the same reason; a module imported since: they are listed again. The mapped files are read anew.)"""
    global _listed_ahead
    if not _listed_ahead_still_whole():
        _listed_ahead = (len(sys.modules), "\0".join(_module_files()))


def _listed_ahead_still_whole() -> bool:
    """Were the module files listed ahead, with no module loaded since?"""
    return _listed_ahead is not None and _listed_ahead[0] == len(sys.modules)


_listed_ahead: tuple[int, str] | None = None  # (how many modules were loaded, their files) if listed ahead


LEFTOVER_BUDGET = 4 << 20  # bytes a forked generation may keep of its predecessors (see above)
KEPT_BY_A_FORKED_MAIN = 512 << 10  # bytes kept of a main of workers, a generation (measured: about 350 KB)
KEPT_BY_A_STANDBY_FORK = 96 << 10  # bytes kept of a standby and its main, a generation (measured: about 50 KB)
leftover = 0  # bytes this generation keeps of its predecessors, by the estimates above (0: it was exec'd)


def was_forked() -> bool:
    """Is this generation a fork of its predecessor's process (every fork keeps something of it)?"""
    return leftover > 0


def within_budget(kept: int) -> bool:
    """May the next generation be a fork, keeping `kept` more bytes of this one?"""
    return leftover + kept <= LEFTOVER_BUDGET


def interpreter_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables that shape an interpreter as it starts (PYTHONPATH, PYTHONHASHSEED, LD_PRELOAD, …)."""
    return {name: value for name, value in environ.items() if name.startswith(("PYTHON", "LD_"))}


def started_with_environment() -> dict[str, str]:
    """The environment this process (or the exec'd ancestor it was forked from) was started with."""
    with open("/proc/self/environ", "rb") as file:
        entries = file.read().split(b"\0")
    pairs = (entry.decode("utf-8", "surrogateescape").partition("=") for entry in entries if b"=" in entry)
    return {name: value for name, _, value in pairs}


def eligible(workers: int, preload: bool, metrics: bool) -> bool:
    """Whether a main so configured may fork its successor (see the module's docstring)."""
    return workers > 1 and not preload and not metrics


def fork_to_go_on_here(fork: Callable[..., tuple[int, int]], kept: int) -> tuple[int, int]:
    """`fork(instead_of_exec=…)` (`spawn.fork_successor` with its sockets) from a fresh stack, the new generation
    going on in the fork where the code on disk is the code loaded and it would keep no more than the budget
    allows of us (`kept` bytes more: see KEPT_BY_…) (`continue_as_successor`), else exec'd: what a main of
    workers and a standby do at a reload. Returns what `fork` returns."""
    return from_a_fresh_stack(lambda before: fork(instead_of_exec=functools.partial(continue_as_successor, before,
                                                                                    kept)))


def from_a_fresh_stack(spawn: Callable[..., int]) -> int:
    """spawn(open_before) in a thread of its own, waited for: the fork's only thread (its main thread) is then
    this one, whose stack holds nothing of the old main (forked from where the old main's loop runs, the new
    generation would run inside the old one's frames, deeper at each reload, and keep them alive).
    `open_before`: our descriptors, as they are just before the fork."""
    import threading

    from graceful_http.spawn import flush_standard_streams

    result: list = []

    def run() -> None:
        try:
            result.append(spawn(open_descriptors()))
        except BaseException as exc:  # handed back to the caller below
            result.append(exc)

    flush_standard_streams()
    thread = threading.Thread(target=run, name="graceful-http successor fork")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def open_descriptors() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def continue_as_successor(open_before: set[int], kept: int, command: list[str],
                          environ: dict[str, str]) -> None:  # pragma: no cover - in a fork
    """In the forked new generation, its sockets already in place: run it here and exit, if the code on disk
    is the code loaded and what it keeps of its predecessors (`kept` more bytes) is within the budget; else
    return (the caller execs `command`). `open_before`: the old main's descriptors."""
    from graceful_http.spawn import flush_and_exit, reset_signals_after_fork, successor_command

    global leftover
    if (command != successor_command() or not within_budget(kept) or "prometheus_client" in sys.modules
            or interpreter_environment(environ) != interpreter_environment(started_with_environment())
            or not same_code_as_on_disk()):
        return
    leftover += kept
    gc.freeze()  # the old main's objects, kept by its thread's stack: out of the collector's way for good
    reset_signals_after_fork()
    _close_the_old_mains_descriptors(open_before)
    os.environ.clear()
    os.environ.update(environ)
    from graceful_http.cli import main  # the same arguments: sys.argv is the one `command` gave this process

    code = 70
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        os.write(2, f"graceful-http: new generation {os.getpid()} failed: {exc!r}\n".encode())
    finally:
        flush_and_exit(code)


def _close_the_old_mains_descriptors(open_before: set[int]) -> None:  # pragma: no cover - in a fork
    """Close what exec would of the old main's descriptors (those marked close-on-exec: its control socket,
    its channels to its workers and generations, its loop's), but for the datagram sockets libraries keep
    to send on (libsystemd's to the journal, which it would go on using). Descriptors made since the fork
    (the C libraries' own after-fork handlers make some) are the new generation's."""
    import fcntl
    import socket

    for fd in sorted(open_before & open_descriptors()):
        try:
            if fd <= 2 or not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                continue
            if _unconnected_datagram_socket(fd, socket):
                continue
            os.close(fd)
        except OSError:
            pass


def _unconnected_datagram_socket(fd: int, socket) -> bool:  # pragma: no cover - in a fork
    try:
        probe = socket.socket(fileno=fd)
    except OSError:
        return False  # not a socket
    try:
        if probe.type != socket.SOCK_DGRAM:
            return False
        try:
            probe.getpeername()
        except OSError:
            return True
        return False
    finally:
        probe.detach()
