"""Interleaved A/B of graceful-http's latency in the second after a reload, standalone, and where that second goes.

A busy machine moves p99 by more than most changes do, so two copies of
`service/` run in alternation (A, B, A, B, …) under the load tool with a
reload every `--interval` s, and each side's median is compared. For every
reload it also prints where the slow requests were (above 1.3× the run's
steady p99): how many, whether an old or a new pid answered them, and when
they started (100 ms bins after the reload request). Usage, after one
`bench/run` made the venv:

    bench/.venv/bin/python -m bench.reload_ab --a /tmp/base/service --b service --workers 1 --pairs 5 [--detail]
"""

from __future__ import annotations

import argparse
import compileall
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench import analyze, servers
from bench.main import drive_reloads, finish_probe, format_interval, probe

SLOW = 1.3  # × the run's steady p99


def one_run(service: Path, workers: int, duration: float, interval: float, raw: Path) -> tuple[dict, list, dict]:
    servers.SERVICE_DIR = service  # read by servers.environment() at each start
    server = servers.GracefulHttp(workers, raw)
    server.start()
    try:
        out = raw / f"{server.tag}.json"
        load = probe(server.port, duration, out)
        began = time.monotonic()
        reloads = drive_reloads(server, began + 1.0, began + duration - 1.5, interval)
        data = finish_probe(load, out, duration + 60)
    finally:
        server.stop()
    return data, reloads, analyze.summarize_probe(data, reloads)


def where_slow(data: dict, reloads: list[dict], steady_p99: float) -> list[dict]:
    """Per reload: requests in flight within 1 s, the slow ones, by old/new pid and by start (ms after)."""
    start, latency, code, pid = analyze.arrays(data)
    first_seen: dict[int, float] = {}
    for index in np.argsort(start):
        first_seen.setdefault(int(pid[index]), float(start[index]))
    rows = []
    for reload in reloads:
        at = reload["requested"]
        window = (start < at + analyze.AFTER_RELOAD) & (start + latency >= at) & (code > 0)
        new = np.array([first_seen.get(int(p), 0.0) >= at for p in pid])
        slow = window & (latency > SLOW * steady_p99)
        bins: dict[int, int] = {}
        for index in np.nonzero(slow)[0]:
            key = int((start[index] - at) * 10) * 100
            bins[key] = bins.get(key, 0) + 1
        answered_new = new & (code > 0) & (start + latency >= at)
        rows.append({"requests": int(window.sum()), "slow": int(slow.sum()), "slow_old_pid": int((slow & ~new).sum()),
                     "slow_new_pid": int((slow & new).sum()), "slow_by_start_ms": dict(sorted(bins.items())),
                     "first_new_pid_ms": round(float((start + latency)[answered_new].min() - at) * 1000)
                     if answered_new.any() else None,
                     "done_ms": round((reload["done"] - at) * 1000) if reload.get("done") else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reload_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline's service/ directory")
    parser.add_argument("--b", type=Path, required=True, help="the candidate's service/ directory")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=1.5)
    parser.add_argument("--detail", action="store_true", help="print each reload's slow requests")
    args = parser.parse_args(argv)
    raw = Path("/tmp") / "graceful-http-reload-ab"
    raw.mkdir(exist_ok=True)
    sides = {"a": args.a.resolve(), "b": args.b.resolve()}
    for directory in sides.values():
        compileall.compile_dir(directory, quiet=1)  # as bench/run does: no module compiled from source at a start
    ratios: dict[str, list[float]] = {"a": [], "b": []}
    slow: dict[str, list[int]] = {"a": [], "b": []}
    for pair in range(args.pairs):
        for side, directory in sides.items():
            data, reloads, summary = one_run(directory, args.workers, args.duration, args.interval, raw)
            after, steady = summary["after_reload"]["p99_ms"], summary["steady"]["p99_ms"]
            ratios[side].append(after / steady)
            rows = where_slow(data, reloads, steady / 1000)
            slow[side] += [row["slow"] for row in rows]
            interval = summary["p99_after_vs_steady_interval"]
            print(f"pair {pair} {side}: p99 after {after:.1f} ms, steady {steady:.1f} ms ({after / steady:.2f}×"
                  + (f", 95 % interval over its reloads {format_interval(interval)}" if interval else "") + "),"
                  f" {summary['reloads']} reloads, {summary['errors']['total']} errors", flush=True)
            if args.detail:
                for row in rows:
                    print(f"    {row}", flush=True)
    for side in sides:
        print(f"{side}: p99 after ÷ steady, median {statistics.median(ratios[side]):.2f}× "
              f"({', '.join(f'{r:.2f}' for r in ratios[side])}); slow requests per reload, median "
              f"{statistics.median(slow[side]):g} over {len(slow[side])} reloads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
