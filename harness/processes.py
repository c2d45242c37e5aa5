"""Small process and port helpers on this machine (/proc), shared by the tests and the benchmark."""

from __future__ import annotations

import os
import random
import socket

FIRST_FIXED_PORT = 10000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, from below the kernel's ephemeral range.

    A port from bind(("", 0)) is free only until something else takes it: another test's client connection
    (the kernel gives those ports from the same range) or another bind(0). Below the range nothing is handed
    out by the kernel, parallel pytest workers draw from their own slices, and one process never hands out a
    port twice, so the port is still free when the server binds it.
    """
    start, stop = _port_slice()
    offset = random.randrange(stop - start)
    for step in range(stop - start):
        port = start + (offset + step) % (stop - start)
        if port not in _handed_out and _bindable(host, port):
            _handed_out.add(port)
            return port
    raise OSError(f"no free TCP port on {host} in {start}-{stop - 1}")


_handed_out: set[int] = set()


def _port_slice() -> tuple[int, int]:
    """This process's share of the ports between FIRST_FIXED_PORT and the ephemeral range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
            ephemeral = int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    stop = max(ephemeral, FIRST_FIXED_PORT + 1000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = (stop - FIRST_FIXED_PORT) // max(workers, 1)
    first = FIRST_FIXED_PORT + share * (int(worker) if worker.isdigit() else 0)
    return first, first + share


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> list[str]:
    """The command line of `pid` ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return [part.decode(errors="replace") for part in file.read().split(b"\0")[:-1]]
    except OSError:
        return []


def children(pid: int) -> list[int]:
    """The live children of `pid`, from every one of its threads ([] once it is gone)."""
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as file:
                    found.extend(int(child) for child in file.read().split())
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
    return [child for child in found if alive(child)]
