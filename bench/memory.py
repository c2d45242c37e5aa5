"""Memory through reloads: PSS summed over a server's processes (shared pages split among the processes sharing
them), in steady state and at its peak while reloading under wrk, with an app holding 40 MB per worker.

A whole-generation handoff runs both generations' workers for a moment (peak ≈ 2× steady); uvicorn
replaces one worker at a time; graceful-http's worker-by-worker rollout (the default with --workers) never
runs more than N+1 workers.
"""

from __future__ import annotations

import statistics
import time

from bench import wrk
from bench.servers import GracefulHttp, Gunicorn, Uvicorn, marked_pids
from harness.pss import PeakSampler

FOOTPRINT_APP = "bench.footprint_app:app"
CONNECTIONS = 16


def servers(workers: int, whole_generation: bool, peers, raw) -> list:
    made = [GracefulHttp(workers, raw)]
    if whole_generation:
        whole = GracefulHttp(workers, raw)
        whole.name = "graceful-http --rollout generation"
        whole.extra = ["--rollout", "generation"]
        made.append(whole)
    makers = {"uvicorn": lambda: Uvicorn(workers, raw), "gunicorn": lambda: Gunicorn(workers, raw, "HUP")}
    made += [makers[peer]() for peer in peers]
    for server in made:
        server.app = FOOTPRINT_APP
    return made


def measure(server, reloads: int, steady_seconds: float, per_reload: float, say) -> dict:
    """Steady PSS (median over `steady_seconds`), then `reloads` reloads under wrk, each waited for and followed
    by a second's settling: peak PSS, workers and processes over the whole run."""
    with PeakSampler(lambda: marked_pids(server.tag)) as sampler:
        time.sleep(steady_seconds)
        steady = list(sampler.samples)
        duration = int(reloads * per_reload + 4)
        process = wrk.start(f"http://127.0.0.1:{server.port}/", duration, CONNECTIONS)
        time.sleep(1.0)
        records = []
        for _ in range(reloads):
            records.append(server.reload())
            time.sleep(1.0)
        load = wrk.finish(process, timeout=duration + 120)
        samples = list(sampler.samples)
    steady_pss = statistics.median(s[2] for s in steady)
    peak = max(samples, key=lambda s: s[2])
    row = {
        "server": server.label, "workers": server.workers, "reloads": len(records),
        "failed_reloads": sum(1 for r in records if not r.ok),
        "steady_pss_mib": round(steady_pss / 1024, 1), "peak_pss_mib": round(peak[2] / 1024, 1),
        "peak_vs_steady": round(peak[2] / steady_pss, 2) if steady_pss else None,
        "steady_processes": max(s[1] for s in steady), "peak_processes": max(s[1] for s in samples),
        "peak_workers": max(s[0] for s in samples), "samples": len(samples),
        "requests": load["requests"], "non_2xx_3xx": load["non_2xx_3xx"], "socket_errors": load["socket_errors"],
    }
    say(f"memory: {server.label}: steady {row['steady_pss_mib']} MiB, peak {row['peak_pss_mib']} MiB"
        f" ({row['peak_vs_steady']}×), peak processes {row['peak_processes']}")
    return row


def memory_section(workers: int, reloads: int, steady_seconds: float, per_reload: float, whole_generation: bool,
                   peers, raw, say) -> list[dict]:
    rows = []
    for server in servers(workers, whole_generation, peers, raw):
        say(f"memory: {server.label}, {reloads} reload(s) under wrk -c{CONNECTIONS}")
        server.start()
        try:
            rows.append(measure(server, reloads, steady_seconds, per_reload, say))
        finally:
            server.stop()
    return rows
