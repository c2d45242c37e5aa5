"""The LISTEN_* socket-passing protocol (sd_listen_fds(3)), as pure functions.

Reading the fds themselves is left to systemd-python; this module checks the
environment first so a bad one gets a precise error, and produces the
environment for a new generation, which nobody ships.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")  # the last: systemd >= 258


class ListenFdsError(ValueError):
    """The LISTEN_* environment is present but unusable."""


def passed_fd_count(environ: Mapping[str, str], pid: int) -> int:
    """How many sockets were passed to process `pid` (0 when none were).

    Unlike sd_listen_fds(), a LISTEN_PID for another process is an error
    rather than silence: it means a stale environment, and serving on a
    freshly bound socket instead would hide it.
    """
    if "LISTEN_FDS" not in environ:
        return 0
    count_text = environ["LISTEN_FDS"]
    if not (count_text.isascii() and count_text.isdigit()):
        raise ListenFdsError(f"LISTEN_FDS={count_text!r} is not a number")
    pid_text = environ.get("LISTEN_PID", "")
    if not (pid_text.isascii() and pid_text.isdigit()):
        raise ListenFdsError(f"LISTEN_FDS is set but LISTEN_PID={pid_text!r} is not a process id")
    if int(pid_text) != pid:
        raise ListenFdsError(
            f"LISTEN_PID={pid_text} is not this process ({pid}): the sockets were passed to another process"
        )
    count = int(count_text)
    names_text = environ.get("LISTEN_FDNAMES")
    if names_text is not None and count and len(names_text.split(":")) != count:
        raise ListenFdsError(f"LISTEN_FDNAMES={names_text!r} does not name {count} sockets (LISTEN_FDS={count})")
    return count


def successor_environ(base: Mapping[str, str], names: Sequence[str], pid: int,
                      pidfd_id: int | None = None) -> dict[str, str]:
    """The environment of a new generation that receives `names` sockets at fd 3….

    LISTEN_PID must be the new process's own pid, so this is called after fork; LISTEN_PIDFDID, if any,
    its own pidfd inode id (`pidfd.inode_id`): an inherited one would name another process.
    """
    for name in names:
        if not name or ":" in name or len(name) > 255:
            raise ListenFdsError(f"socket name {name!r} cannot be passed in LISTEN_FDNAMES")
    environ = {k: v for k, v in base.items() if k not in LISTEN_VARIABLES}
    environ["LISTEN_PID"] = str(pid)
    environ["LISTEN_FDS"] = str(len(names))
    environ["LISTEN_FDNAMES"] = ":".join(names)
    if pidfd_id is not None:
        environ["LISTEN_PIDFDID"] = str(pidfd_id)
    if "WATCHDOG_USEC" in environ:  # the watchdog follows the main pid
        environ["WATCHDOG_PID"] = str(pid)
    return environ
