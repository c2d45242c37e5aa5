"""How many processes a service runs and how much memory they take (PSS: shared pages split among the
processes sharing them, so a sum over processes is the memory they cost together), sampled while it reloads.

Standard library only: also copied into a systemd container and run there as a script,
`python3 pss.py CGROUP_PROCS_FILE SECONDS OUT_FILE`, writing one `<workers> <processes> <pss KiB>` line per
sample. A worker is a process whose parent is in the same set (a main's child); mains are PID 1's.
"""

from __future__ import annotations

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


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return int(file.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def sample(pids) -> tuple[int, int, int]:
    """(workers, processes, PSS KiB summed) of `pids` (those still alive)."""
    pids = set(pids)
    parents = {pid: parent_of(pid) for pid in pids}
    alive = {pid for pid, parent in parents.items() if parent is not None}
    workers = sum(1 for pid in alive if parents[pid] in alive)
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


def _cgroup_pids(path: str) -> list[int]:
    try:
        with open(path) as file:
            return [int(line) for line in file.read().split()]
    except OSError:
        return []


if __name__ == "__main__":
    procs_file, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    deadline = time.monotonic() + seconds
    with open(out, "w") as output:
        while time.monotonic() < deadline:
            workers, processes, pss = sample(_cgroup_pids(procs_file))
            output.write(f"{workers} {processes} {pss}\n")
            output.flush()
            time.sleep(0.02)
