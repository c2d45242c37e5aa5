"""What a process inherits from the one that started it: the contract between graceful-http's processes.

systemd starts the first generation with its sockets only (LISTEN_*, see
`listenfds`). Every process graceful-http starts itself -- a new generation,
a worker -- gets the same sockets at fd 3… plus the variables below, which
are named here and nowhere else. `Inherited.from_environ` reads them once, at
start-up, and removes them (an app must not see them, nor pass them on);
`to_environ` writes them for a child. The role of a process follows from what
it inherited, and is decided here only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace

GENERATION = "GRACEFUL_HTTP_GENERATION"  # the generation number: 1 for the first, +1 per reload
HANDOFF_FD = "GRACEFUL_HTTP_HANDOFF_FD"  # a new generation's channel to the main it replaces
WORKER_FD = "GRACEFUL_HTTP_WORKER_FD"  # a worker's channel to its main
WORKER_INDEX = "GRACEFUL_HTTP_WORKER"  # a worker's number in its generation, from 1
MAIN_VERSION = "GRACEFUL_HTTP_MAIN_VERSION"  # a worker must run the code its main runs
CARRIED_METRICS = "GRACEFUL_HTTP_RELOADS"  # "succeeded failed last_handoff_seconds reload_started_monotonic"
HOLDER_FD = "GRACEFUL_HTTP_HOLDER_FD"  # the stable-pid holder's report channel, in every process it started
OURS = (GENERATION, HANDOFF_FD, WORKER_FD, WORKER_INDEX, MAIN_VERSION, CARRIED_METRICS)
# prometheus_client's own variable: it reads it from the environment, so it stays there (see `metrics`).
METRICS_SHARED_DIR = "PROMETHEUS_MULTIPROC_DIR"
# What the env file (--env-file) replaced in the environment, to be undone before the next generation applies
# the file again: it describes the environment, so it travels with it and stays there (see `envfile`).
ENV_FILE_ORIGINAL = "GRACEFUL_HTTP_ENV_FILE_ORIGINAL"


class Role(enum.Enum):
    FIRST_MAIN = "first main"  # started by systemd or by hand: nobody to hand over from
    NEW_GENERATION = "new generation"  # started by a main at a reload: reports to it over the handoff channel
    WORKER = "worker"  # started by its main to replace a worker that died


@dataclass(frozen=True)
class Inherited:
    generation: int = 1
    handoff_fd: int | None = None
    worker_fd: int | None = None
    worker_index: int | None = None
    main_version: str | None = None
    carried_metrics: str = ""
    metrics_shared_dir: str | None = None  # read only: prometheus_client finds it in the environment itself

    @property
    def role(self) -> Role:
        if self.worker_fd is not None and self.worker_index is not None:
            return Role.WORKER
        if self.handoff_fd is not None:
            return Role.NEW_GENERATION
        return Role.FIRST_MAIN

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> Inherited:
        """Take our variables out of `environ` (the process's own, at start-up)."""
        taken = {name: environ.pop(name, None) for name in OURS}
        return cls(
            generation=int(taken[GENERATION] or 1),
            handoff_fd=_number(taken[HANDOFF_FD]),
            worker_fd=_number(taken[WORKER_FD]),
            worker_index=_number(taken[WORKER_INDEX]),
            main_version=taken[MAIN_VERSION],
            carried_metrics=taken[CARRIED_METRICS] or "",
            metrics_shared_dir=environ.get(METRICS_SHARED_DIR),
        )

    def to_environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """`base` with our variables set to what a child inherits (and no stale ones of ours)."""
        environ = {k: v for k, v in base.items() if k not in OURS}
        values = {GENERATION: self.generation, HANDOFF_FD: self.handoff_fd, WORKER_FD: self.worker_fd,
                  WORKER_INDEX: self.worker_index, MAIN_VERSION: self.main_version,
                  CARRIED_METRICS: self.carried_metrics or None}
        environ.update({name: str(value) for name, value in values.items() if value is not None})
        return environ

    def for_new_generation(self, generation: int, carried_metrics: str | None = None) -> Inherited:
        """What the next generation inherits (its handoff fd is set where it is placed, after fork)."""
        return Inherited(generation=generation, carried_metrics=self.carried_metrics if carried_metrics is None
                         else carried_metrics)

    def for_worker(self, index: int, main_version: str) -> Inherited:
        """What a worker of this generation inherits (its channel fd is set where it is placed, after fork)."""
        return Inherited(generation=self.generation, worker_index=index, main_version=main_version)

    def with_channel(self, fd: int) -> Inherited:
        """This, with the fd of its channel to the process that starts it."""
        if self.worker_index is not None:
            return replace(self, worker_fd=fd)
        return replace(self, handoff_fd=fd)


def _number(text: str | None) -> int | None:
    return int(text) if text else None
