"""Fork a worker from a main, not exec one: before its event loop starts (a generation's workers) or while it
runs (a rollout's later workers).

A forked worker shares the main's imported engine (uvicorn, uvloop, httptools) copy-on-write and starts by
loading the app; an exec'd one pays for a whole interpreter and its imports, in time and in private
memory (about 20 MB each, measured: enough to undo what a one-worker-at-a-time rollout saves). What the
child must not keep of its parent, it drops before anything else runs:

* the signal wake-up descriptor: the parent loop's, so a signal to the child would wake the parent's
  handlers (a SIGTERM to one new worker would stop the whole main);
* the sockets through which others reach the main: its control socket (an abstract address stays bound while
  any copy is open, and `graceful-http reload` would connect to the child), the handoff channel, and the
  other workers' channels (so a worker sees its main's channel close when the main dies).

The parent's loop itself is never touched in the child: Python's running-loop record is per pid, so the
child's `asyncio.run` starts a loop of its own.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable

from graceful_http import __version__
from graceful_http.inherited import Inherited
from graceful_http.spawn import fork_worker, reset_signals_after_fork


def fork_running(settings, listeners, inherited: Inherited, number: int, metrics_shared_dir: str | None,
                 not_for_the_child: Iterable[socket.socket]) -> tuple[int, socket.socket]:
    """Fork worker `number` (from 1) of this generation; return (pid, the main's end of its channel)."""
    from graceful_http.worker_process import run_worker
    from graceful_http.workers import MainLink, worker_environ

    environ = worker_environ(os.environ)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker_inherited = Inherited(generation=inherited.generation, worker_index=number, main_version=__version__,
                                 metrics_shared_dir=metrics_shared_dir)
    dropped = list(not_for_the_child)

    def worker() -> int:  # pragma: no cover - runs in the forked child
        reset_signals_after_fork()
        for sock in [mine, *dropped]:
            try:  # detached first where it can be, so that no later close of the object hits a reused fd
                os.close(sock.detach() if isinstance(sock, socket.socket) else sock.fileno())
            except (OSError, ValueError):
                pass
        os.environ.clear()
        os.environ.update(environ)
        link = MainLink(theirs, number)
        return asyncio.run(run_worker(settings, link, worker_inherited, listeners))

    try:
        pid = fork_worker(worker)
    except OSError:
        mine.close()
        raise
    finally:
        theirs.close()
    return pid, mine
