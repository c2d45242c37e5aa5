"""How many processes a service runs and how much memory they take (PSS: shared pages split among the
processes sharing them, so a sum over processes is the memory they cost together), sampled while it reloads.

Standard library only: also copied into a systemd container and run there as a script,
`python3 pss.py SECONDS OUT_FILE CGROUP_PROCS_FILE...` (the first that can be read), writing one
`<workers> <processes> <pss KiB>` line per sample. A worker is a process whose parent is in the same set
(a main's child; mains are PID 1's, or the stable-pid holder's) and that has lived at least 50 ms: a new
generation is double-forked, and the intermediate process, a child of the old main for a millisecond or
so, is not a worker.
"""

from __future__ import annotations

import os
import sys
import threading
import time


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


TRANSIENT = 0.05  # seconds
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parent_and_age(pid: int) -> tuple[int | None, float]:
    """(parent pid, seconds since it started), or (None, 0) if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rpartition(")")[2].split()
        with open("/proc/uptime") as file:
            uptime = float(file.read().split()[0])
        return int(fields[1]), uptime - int(fields[19]) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None, 0.0


def parent_of(pid: int) -> int | None:
    return parent_and_age(pid)[0]


def sample(pids) -> tuple[int, int, int]:
    """(workers, processes, PSS KiB summed) of `pids` (those still alive)."""
    pids = set(pids)
    seen = {pid: parent_and_age(pid) for pid in pids}
    alive = {pid for pid, (parent, _) in seen.items() if parent is not None}
    workers = sum(1 for pid in alive if seen[pid][0] in alive and seen[pid][1] >= TRANSIENT)
    return workers, len(alive), sum(pss_kib(pid) for pid in alive)


class PeakSampler(threading.Thread):
    """Samples `list_pids()` every `interval` seconds until stopped; keeps every sample."""

    def __init__(self, list_pids, interval: float = 0.02):
        super().__init__(daemon=True)
        self.list_pids = list_pids
        self.interval = interval
        self.samples: list[tuple[int, int, int]] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            self.samples.append(sample(self.list_pids()))
            self._stopping.wait(self.interval)

    def stop(self) -> list[tuple[int, int, int]]:
        self._stopping.set()
        self.join(timeout=10)
        return self.samples

    def __enter__(self) -> PeakSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _cgroup_pids(paths: list[str]) -> list[int]:
    for path in paths:
        try:
            with open(path) as file:
                return [int(line) for line in file.read().split()]
        except OSError:
            continue
    return []


if __name__ == "__main__":
    seconds, out, procs_file = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
    deadline = time.monotonic() + seconds
    with open(out, "w") as output:
        while time.monotonic() < deadline:
            pids = _cgroup_pids(procs_file)
            workers, processes, pss = sample(pids)
            output.write(f"{workers} {processes} {pss}\n")
            output.flush()
            time.sleep(0.02)
