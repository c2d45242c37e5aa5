"""Logging: native journal entries under systemd, plain lines on a terminal.

Under systemd every generation shares the stderr stream the first one was
started with, and journald attributes a stream's lines to the process that
opened it. Native journal messages carry each sender's own pid, so
`journalctl -u graceful-http` stays truthful after any number of handoffs.
"""

from __future__ import annotations

import logging
import os
import sys


def stderr_is_journal(environ=os.environ) -> bool:
    """True when stderr is the journal stream systemd connected us to (JOURNAL_STREAM=dev:ino)."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class _ProcessFields(logging.Filter):
    """Journal fields naming the generation (and worker) of every line."""

    def __init__(self, generation: int, worker: int | None):
        super().__init__()
        self.generation = generation
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.GENERATION = self.generation
        if self.worker is not None:
            record.WORKER = self.worker
        return True


def setup(generation: int, level: str = "info", worker: int | None = None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if stderr_is_journal():
        from systemd.journal import JournalHandler

        handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="graceful-http")
        prefix = f"worker {worker}: " if worker is not None else ""
        handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        who = f"gen {generation}" + (f" worker {worker}" if worker is not None else "")
        handler.setFormatter(logging.Formatter(f"graceful-http[%(process)d] {who}: %(message)s"))
    handler.addFilter(_ProcessFields(generation, worker))
    root.addHandler(handler)
    root.setLevel(level.upper())


access_log = logging.getLogger("graceful_http.access")


def log_access(scope, status: int | None, duration: float) -> None:
    """One line per request: peer, request line, status, duration."""
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "unix"
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    target = path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
    status_text = str(status) if status is not None else "500"
    access_log.info(
        '%s "%s %s HTTP/%s" %s %.1fms',
        peer, scope["method"], target, scope.get("http_version", "1.1"), status_text, duration * 1000,
        extra={
            "REQUEST_METHOD": scope["method"],
            "REQUEST_PATH": scope["path"],
            "STATUS": status_text,
            "DURATION_MS": f"{duration * 1000:.3f}",
            "CLIENT": peer,
        },
    )
