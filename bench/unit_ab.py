"""Interleaved A/B under systemd: the same code, the shipped unit with two drop-ins, and the latency in the second
after each `systemctl reload`.

`bench.reload_ab` compares two copies of the code standalone; what a unit's settings do (the idle start that
`LimitNICE=+0` allows, a sandbox option) shows only under systemd. One container (bench/systemd.py) runs
graceful-http's shipped units; before each run the test drop-in gets side A's or side B's extra lines and the
service restarts; the load tool runs with a `systemctl reload` every `--interval` s, and each side's median of
p99 after a reload ÷ steady is compared. Usage, after one `bench/run` made the venv, as root:

    bench/.venv/bin/python -m bench.unit_ab --workers 1 --pairs 4 [--a-extra LINES] [--b-extra LINES]

(`\\n` separates lines in an extra.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import analyze
from bench.main import drive_reloads, finish_probe, probe
from bench.servers import wait_serving
from bench.systemd import IDLE_START_GRANT, Containers
from harness.systemd_service import SERVICE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.unit_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--a-extra", default="", help="side A's drop-in lines (default: none, the shipped unit)")
    parser.add_argument("--b-extra", default=IDLE_START_GRANT,
                        help="side B's drop-in lines (default: the idle start's grant, see bench/systemd.py)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=1.5)
    args = parser.parse_args(argv)
    extras = {"a": args.a_extra.replace("\\n", "\n"), "b": args.b_extra.replace("\\n", "\n")}
    raw = Path(tempfile.mkdtemp(prefix="graceful-http-unit-ab-"))
    ratios: dict[str, list[float]] = {"a": [], "b": []}
    with Containers(args.workers) as containers:
        server = containers.graceful()
        server.start()
        for pair in range(args.pairs):
            for side, extra in extras.items():
                containers.service.service_extra = extra.rstrip("\n") + "\n" if extra else ""
                server.container.write_file(f"/etc/systemd/system/{SERVICE}.d/test.conf",
                                            containers.service.drop_in())
                server.container.systemctl("daemon-reload")
                server.container.systemctl("restart", SERVICE)
                wait_serving(server.port)
                out = raw / f"{side}{pair}.json"
                load = probe(server.port, args.duration, out)
                began = time.monotonic()
                reloads = drive_reloads(server, began + 1.0, began + args.duration - 1.5, args.interval)
                summary = analyze.summarize_probe(finish_probe(load, out, args.duration + 60), reloads)
                after, steady = summary["after_reload"]["p99_ms"], summary["steady"]["p99_ms"]
                ratios[side].append(after / steady)
                print(f"pair {pair} {side}: p99 after {after:.1f} ms, steady {steady:.1f} ms ({after / steady:.2f}×),"
                      f" {summary['reloads']} reloads, {summary['failed_reloads']} failed,"
                      f" {summary['errors']['total']} errors", flush=True)
    for side in extras:
        print(f"{side}: p99 after ÷ steady, median {statistics.median(ratios[side]):.2f}× "
              f"({', '.join(f'{r:.2f}' for r in ratios[side])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
