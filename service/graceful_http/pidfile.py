"""The pid file: always names the current main process, replaced atomically."""

from __future__ import annotations

import os


def write_pid_file(path: str, pid: int) -> None:
    temporary = f"{path}.{pid}.tmp"
    with open(temporary, "w") as file:
        file.write(f"{pid}\n")
    os.replace(temporary, path)


def read_pid_file(path: str) -> int:
    """The pid in `path`; ValueError with a one-line message if it holds none."""
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read pid file {path}: {exc.strerror}") from None
    if not text.isdigit():
        raise ValueError(f"pid file {path} does not hold a pid: {text[:20]!r}")
    return int(text)


def remove_pid_file(path: str, pid: int) -> None:
    """Remove `path` if it still names `pid` (a successor may have rewritten it)."""
    try:
        if read_pid_file(path) == pid:
            os.unlink(path)
    except (ValueError, OSError):
        pass


class PidFile:
    """PIDFile=, as the supervisor uses it: name the current main; on a stop, remove our own name."""

    def __init__(self, path: str):
        self.path = path

    def write(self, pid: int) -> None:
        write_pid_file(self.path, pid)

    def remove(self, pid: int) -> None:
        remove_pid_file(self.path, pid)
