"""How long this machine takes to wake a process that has work: a ping-pong of one byte between two processes.

The reload targets compare tails of a few milliseconds (p99 in the second
after a reload ÷ steady p99, about 3.5 ms here). A virtual machine whose
vCPU is sometimes not running when a wake-up arrives adds stalls of that
size to any run, reload or not, and no service can avoid them: read the
figures of a run beside this machine's own. Each round trip is a send, a
wake-up of the other process, its answer and our wake-up; nothing else
runs. Usage (no root, nothing to install):

    python3 -m bench.wakeup --seconds 10
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time


def round_trips(seconds: float, pause: float = 0.0005) -> list[float]:
    """Round-trip times (s) of one byte between this process and a forked echo, for `seconds`, with `pause`
    between them (so each one starts from sleeping processes, as a request on an idle connection does)."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the echo
        ours.close()
        while byte := theirs.recv(1):
            theirs.send(byte)
        os._exit(0)
    theirs.close()
    times = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            began = time.monotonic()
            ours.send(b"x")
            ours.recv(1)
            times.append(time.monotonic() - began)
            time.sleep(pause)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    n = len(ordered)
    return {"round_trips": n, "p50_us": round(ordered[n // 2] * 1e6), "p99_us": round(ordered[int(n * 0.99)] * 1e6),
            "p999_ms": round(ordered[int(n * 0.999)] * 1e3, 2), "max_ms": round(ordered[-1] * 1e3, 2),
            "over_2ms": sum(t > 0.002 for t in ordered), "over_5ms": sum(t > 0.005 for t in ordered)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.wakeup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    s = summary(round_trips(args.seconds))
    print(f"{s['round_trips']} round trips in {args.seconds:g} s: p50 {s['p50_us']} µs, p99 {s['p99_us']} µs, "
          f"p99.9 {s['p999_ms']} ms, max {s['max_ms']} ms; {s['over_2ms']} over 2 ms, {s['over_5ms']} over 5 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
