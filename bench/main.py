"""Run graceful-http and its peers side by side on this machine; print a table, write markdown, JSON and a PNG.

Sections (see README, "Benchmark"):
  steady    the same app under wrk: graceful-http, plain uvicorn, gunicorn + uvicorn workers; workers 1 and 2
  handoff   reload request → new generation serving (and holding MAINPID), beside the floor: a bare
            `uvicorn --fd` from exec to its first answered request
  reloads   wrk -c50 (totals) and the per-request load tool (each request) while reloading every 1–2 s
  soak      graceful-http under systemd, many reloads under wrk: errors, RSS, descriptors, processes
  websockets  WebSocket clients that reconnect at once, through reloads: close codes, time back, stampede
  naive     keep-alive clients that reuse a connection without checking it, through reloads: failed, reconnects
  proxy     behind nginx and HAProxy with their defaults, idle gaps around the servers' keep-alive timeouts:
            requests that cross the server's close of an idle upstream connection (502s)
  memory    PSS of all of a server's processes, steady and at the peak of reloads under wrk, 4 workers of a 40 MB app
  instructions  instructions per request (valgrind): plain uvicorn's protocol and graceful-http's, same app, one process

Timings are figures to read, never pass/fail: the targets table says how they compare with the issue's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench import analyze, wrk
from bench.servers import (
    PYTHON,
    REPO,
    SERVICE_DIR,
    BenchError,
    GracefulHttp,
    Gunicorn,
    Uvicorn,
    alive,
    cpu_seconds,
    environment,
    kill_marked,
    marked_pids,
    time_command,
    time_first_answer,
    wait_for,
)

RESULTS = REPO / "bench" / "results"
PICTURE = "reload-latency.png"
CONNECTIONS = 50


@dataclasses.dataclass
class Plan:
    kind: str
    steady_workers: tuple[int, ...] = (1, 2)
    steady_runs: int = 5
    steady_duration: int = 5
    steady_warmup: int = 1
    reload_workers: int = 2
    reload_duration: int = 12
    reload_interval: float = 1.5
    reload_warmup: float = 1.0
    reload_tail: float = 1.5
    peers: tuple[str, ...] = ("gunicorn-hup", "gunicorn-usr2", "uvicorn-hup", "uvicorn-socket-unit")
    handoff_reloads: int = 20
    soak_reloads: int = 100
    soak_interval: float = 1.0
    soak_chunk: int = 30  # seconds per wrk run in the soak (back to back until the reloads are done)
    ws_clients: int = 50
    ws_reloads: int = 3
    ws_interval: float = 6.0  # above graceful-http's default WebSocket close spread (5 s)
    naive_clients: int = 60
    naive_duration: float = 20.0
    naive_interval: float = 1.2
    proxy_bursts: int = 8  # bursts per gap length
    proxy_gaps: tuple[float, ...] = (2.0, 5.0)  # idle gaps around the peers' keep-alive timeouts (gunicorn, uvicorn)
    proxy_delay: float = 0.005  # one way, between the proxy and the server
    memory_workers: int = 4
    memory_reloads: int = 3
    memory_steady: float = 3.0  # seconds of steady-state samples before the reloads
    memory_per_reload: float = 6.0  # seconds of wrk per reload
    memory_whole_generation: bool = True  # also graceful-http --rollout generation, for comparison
    memory_peers: tuple[str, ...] = ("uvicorn", "gunicorn")
    systemd: bool = True
    restart_duration: float = 20.0
    restart_interval: float = 2.0
    store_restarts: int = 100
    store_cost_pairs: int = 20000
    instruction_requests: int = 2000  # counted after a warm-up of instruction_warmup
    instruction_warmup: int = 200
    sections: tuple[str, ...] = ("steady", "handoff", "reloads", "soak", "websockets", "naive", "proxy", "memory",
                                 "restart", "instructions")


FULL = Plan("full")
SMOKE = Plan("smoke", steady_runs=1, steady_duration=1, steady_warmup=0, reload_duration=3, reload_interval=1.0,
             reload_warmup=0.5, reload_tail=0.8, peers=("gunicorn-hup",), handoff_reloads=3, soak_reloads=3,
             soak_interval=0.5, soak_chunk=3, ws_clients=10, ws_reloads=1, ws_interval=3.0,
             naive_clients=10, naive_duration=3.0, proxy_bursts=1, proxy_gaps=(2.0,), memory_reloads=1,
             memory_steady=0.5, memory_per_reload=3.0, memory_whole_generation=False, memory_peers=("gunicorn",),
             restart_duration=3.0, restart_interval=1.5, store_restarts=0, store_cost_pairs=500,
             instruction_requests=50, instruction_warmup=20)


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}/"


# ---- running loads while reloading ---------------------------------------------------------------------------------


def drive_reloads(server, first_at: float, last_at: float, interval: float, limit: int | None = None) -> list[dict]:
    """Reload at first_at, then every `interval` s (never before the previous one is done) until last_at."""
    records = []
    at = first_at
    while at <= last_at and (limit is None or len(records) < limit):
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        record = server.reload()
        if not record.ok:
            say(f"  reload failed: {record.detail}")
        records.append(record.as_dict())
        at = max(record.requested + interval, (record.done or time.monotonic()) + 0.05)
    return records


def probe(port: int, duration: float, out: Path, connections: int = CONNECTIONS) -> subprocess.Popen:
    process = subprocess.Popen([PYTHON, "-m", "bench.load", "--port", str(port), "--connections", str(connections),
                                "--duration", str(duration), "--out", str(out)], cwd=REPO, env=environment("load"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if line.strip() != "running":
        process.wait()
        raise BenchError(f"the load tool did not start: {line}{process.stderr.read()}")
    return process


def finish_probe(process: subprocess.Popen, out: Path, timeout: float) -> dict:
    _, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise BenchError(f"the load tool failed ({process.returncode}): {err}")
    return json.loads(out.read_text())


def load_tool_through_reloads(server, plan: Plan, out: Path) -> tuple[dict, list[dict]]:
    """The load tool for reload_duration, reloading `server` on the plan's schedule: (its records, the reloads)."""
    process = probe(server.port, plan.reload_duration, out)
    began = time.monotonic()
    reloads = drive_reloads(server, began + plan.reload_warmup, began + plan.reload_duration - plan.reload_tail,
                            plan.reload_interval)
    return finish_probe(process, out, plan.reload_duration + 120), reloads


def under_reloads(server, plan: Plan, raw: Path, tag: str) -> tuple[dict, tuple[dict, list[dict]]]:
    """wrk for totals, then the load tool for every request, each for reload_duration with reloads."""
    duration = plan.reload_duration
    say(f"reloads: {server.label}, wrk -c{CONNECTIONS} {duration}s")
    process = wrk.start(url(server), duration, CONNECTIONS)
    began = time.monotonic()
    wrk_reloads = drive_reloads(server, began + plan.reload_warmup, began + duration - plan.reload_tail,
                                plan.reload_interval)
    wrk_result = wrk.finish(process, timeout=duration + 120)

    say(f"reloads: {server.label}, load tool -c{CONNECTIONS} {duration}s")
    data, probe_reloads = load_tool_through_reloads(server, plan, raw / f"{tag}.json")
    summary = analyze.summarize_probe(data, probe_reloads)
    result = {
        "server": server.name, "reload": server.reload_how, "label": server.label, "workers": server.workers,
        "wrk": {"reloads": len(wrk_reloads), "failed_reloads": sum(1 for r in wrk_reloads if not r["ok"]),
                "requests": wrk_result["requests"], "req_s": wrk_result["req_s"],
                "non_2xx_3xx": wrk_result["non_2xx_3xx"], "socket_errors": wrk_result["socket_errors"],
                "errors": wrk_result["errors"], "p99_ms": analyze.ms(wrk_result["p99"]),
                "max_ms": analyze.ms(wrk_result["max"])},
        "probe": summary,
        "reload_done_ms": analyze.spread([r["done"] - r["requested"] for r in wrk_reloads + probe_reloads
                                          if r["done"]]),
    }
    return result, (data, probe_reloads)


# ---- sections ------------------------------------------------------------------------------------------------------


def websocket_section(plan: Plan, raw: Path) -> list[dict]:
    """The same reconnecting WebSocket clients through reloads of graceful-http, uvicorn and gunicorn."""
    from bench.websockets import websocket_reloads

    rows = []
    for server in (GracefulHttp(2, raw), Uvicorn(2, raw), Gunicorn(2, raw, "HUP")):
        say(f"websockets: {server.label}, {plan.ws_clients} clients, {plan.ws_reloads} reload(s)")
        server.start()
        try:
            rows.append(websocket_reloads(server, plan.ws_clients, plan.ws_reloads, plan.ws_interval,
                                          settle=plan.ws_interval))
        finally:
            server.stop()
    return rows


def naive_section(plan: Plan, raw: Path) -> list[dict]:
    """The same naive keep-alive clients through reloads of graceful-http, uvicorn and gunicorn."""
    from bench.naive import naive_reloads

    rows = []
    for server in (GracefulHttp(2, raw), Uvicorn(2, raw), Gunicorn(2, raw, "HUP")):
        say(f"naive clients: {server.label}, {plan.naive_clients} clients, {plan.naive_duration} s")
        server.start()
        try:
            rows.append(naive_reloads(server, plan.naive_clients, plan.naive_duration, plan.naive_interval))
        finally:
            server.stop()
    return rows


def proxy_section(plan: Plan, raw: Path) -> list[dict]:
    """Each server with its default keep-alive timeout behind nginx and HAProxy, the same bursts of clients."""
    from bench.proxy_keepalive import gap_schedule, keepalive_behind_proxy

    rows, gaps = [], gap_schedule(plan.proxy_bursts, plan.proxy_gaps)
    for server in (GracefulHttp(1, raw), Uvicorn(1, raw), Gunicorn(1, raw, "HUP")):
        server.start()
        try:
            for proxy in ("nginx", "haproxy"):
                say(f"behind a proxy: {server.label} behind {proxy}, {len(gaps) + 1} bursts")
                rows.append(keepalive_behind_proxy(server, proxy, gaps, delay=plan.proxy_delay))
        finally:
            server.stop()
    return rows


def steady_section(plan: Plan, raw: Path) -> list[dict]:
    servers = []
    for workers in plan.steady_workers:
        for kind in (GracefulHttp, Uvicorn, Gunicorn):
            servers.append(kind(workers, raw))
    runs = defaultdict(list)
    splits = defaultdict(list)
    try:
        for server in servers:
            server.start()
        if plan.steady_warmup:
            for server in servers:
                wrk.run(url(server), plan.steady_warmup, CONNECTIONS)
        # Round robin, so that whatever else the machine does falls on every server alike.
        # Beside wrk's figures, the CPU time the server's processes used per request: on a busy
        # machine req/s moves with whatever else runs, CPU per request much less.
        for run in range(plan.steady_runs):
            for server in servers:
                pids = marked_pids(server.tag)
                cpu_before, load_before = cpu_seconds(pids), children_cpu_seconds()
                result = wrk.run(url(server), plan.steady_duration, CONNECTIONS)
                server_cpu = cpu_seconds(pids) - cpu_before
                result["cpu_us_per_request"] = server_cpu / result["requests"] * 1e6
                # CPUs busy on average: what the server and the load generator (wrk, our child) each took.
                result["server_cpus"] = server_cpu / plan.steady_duration
                result["wrk_cpus"] = (children_cpu_seconds() - load_before) / plan.steady_duration
                runs[id(server)].append(result)
                split = ""
                if server.workers > 1:  # how a burst of new connections (the load tool's) lands on the workers
                    out = raw / f"steady-split-{server.tag}-{run + 1}.json"
                    splits[id(server)].append(connection_split(finish_probe(probe(server.port, 0.5, out), out, 60),
                                                               server.workers))
                    split = f", {CONNECTIONS} new connections split {'/'.join(map(str, splits[id(server)][-1]))}"
                say(f"steady: {server.name} workers={server.workers} run {run + 1}/{plan.steady_runs}: "
                    f"{result['req_s']:.0f} req/s, p99 {result['p99'] * 1000:.2f} ms, "
                    f"{result['cpu_us_per_request']:.1f} µs CPU/request{split}")
        processes = {}
        for server in servers:  # how many processes really answer (workers > 1 may be ignored)
            out = raw / f"steady-pids-{server.tag}.json"
            data = finish_probe(probe(server.port, 0.5, out), out, 60)
            processes[id(server)] = len({p for p, c in zip(data["pid"], data["code"]) if c == 200})
    finally:
        for server in servers:
            server.stop()
    rows = []
    for server in servers:
        rows.append({"server": server.name, "workers": server.workers, "processes": processes[id(server)],
                     "splits": splits[id(server)], **analyze.median_of_runs(runs[id(server)])})
    for row in rows:
        base = next(r for r in rows if r["server"] == "uvicorn" and r["workers"] == row["workers"])
        row["req_s_vs_uvicorn"] = round(row["req_s"] / base["req_s"], 3) if base["req_s"] else None
        row["p99_vs_uvicorn"] = round(row["p99_ms"] / base["p99_ms"], 3) if base["p99_ms"] else None
        row["cpu_vs_uvicorn"] = (round(row["cpu_us_per_request"] / base["cpu_us_per_request"], 3)
                                 if base["cpu_us_per_request"] else None)
    return rows


def connection_split(data: dict, workers: int) -> list[int]:
    """How many of the load tool's connections each pid answered first, largest first (0 for a worker that
    answered none)."""
    first: dict[int, int] = {}
    for conn, pid, code in zip(data.get("conn", ()), data["pid"], data["code"]):
        if conn and code == 200 and conn not in first:
            first[conn] = pid
    counts = sorted(Counter(first.values()).values(), reverse=True)
    return counts + [0] * (workers - len(counts))


def balanced(split: list[int], connections: int = CONNECTIONS) -> bool:
    """Each worker holds its share of the connections give or take a fifth (20–30 of 50 for 2 workers)."""
    share = connections / len(split)
    return sum(split) == connections and all(0.8 * share <= n <= 1.2 * share for n in split)


def children_cpu_seconds() -> float:
    """CPU time of our reaped children (wrk, once it has finished)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed_reload(server: GracefulHttp, method: str) -> float:
    old = server.main_pid()
    record = {"sighup": lambda: server.reload(poll=0.001), "control": server.reload_by_control_socket,
              "command": server.reload_by_command}[method]()
    if not record.ok:
        raise BenchError(f"graceful-http reload ({method}) failed: {record.detail}\n{server.log_tail()}")
    # Let the old generation finish before the next measurement (it drains in the background).
    wait_for(lambda: not alive(old), 30, f"the old generation (pid {old}) to exit", interval=0.01)
    return record.done - record.requested


HANDOFF_ROWS = {
    "floor-uvicorn": "floor: bare `uvicorn --fd` exec → first answered request",
    "cold-graceful": "graceful-http cold start (socket passed as by systemd) exec → first answer",
    "sighup-w1": "graceful-http standalone, workers=1: SIGHUP → new pid in the pid file",
    "control-w1": "graceful-http standalone, workers=1: control socket reload → done"
                  " (what `graceful-http reload` waits for)",
    "command-w1": "graceful-http standalone, workers=1: `graceful-http reload --pid-file` command, exec → exit",
    "sighup-wN": "graceful-http standalone, workers={n}: SIGHUP → new pid in the pid file",
    "floor-uvicorn-systemd": "floor, measured again between the `systemctl reload`s below",
    "systemd-w1": "graceful-http under systemd, workers=1: `systemctl reload` returns (timed inside the container)",
    "systemd-w1-before": "… of which: until the request reaches graceful-http (systemd, then the ExecReload="
                         " process starts)",
    "systemd-w1-service": "… of which: from the request reaching graceful-http to the new generation holding MAINPID"
                          " and serving (journal)",
    "systemd-wN": "graceful-http under systemd, workers={n}: `systemctl reload` returns (timed inside the container)",
    "systemd-wN-before": "… of which: until the request reaches graceful-http",
    "systemd-wN-service": "… of which: from the request reaching graceful-http to the new generation holding MAINPID"
                          " and serving (journal)",
    "systemd-noop": "context: the same unit with `ExecReload=+/bin/true`: `systemctl reload` returns (systemd's"
                    " share)",
    "python-pass": "context: `python -c pass`",
    "imports": "context: `python -c 'import uvicorn, uvloop, httptools'`",
}


def handoff_section(plan: Plan, raw: Path) -> dict:
    """Interleaved rounds, so the floor and the handoffs see the same machine."""
    samples = defaultdict(list)
    one = GracefulHttp(1, raw)
    many = GracefulHttp(plan.reload_workers, raw) if plan.reload_workers != 1 else None
    try:
        one.start()
        if many:
            many.start()
        for round_ in range(plan.handoff_reloads):
            samples["floor-uvicorn"].append(time_first_answer("uvicorn"))
            samples["cold-graceful"].append(time_first_answer("graceful-http"))
            for method in ("sighup", "control", "command"):
                samples[f"{method}-w1"].append(_timed_reload(one, method))
            if many:
                samples["sighup-wN"].append(_timed_reload(many, "sighup"))
            say(f"handoff: round {round_ + 1}/{plan.handoff_reloads}: floor {samples['floor-uvicorn'][-1] * 1000:.0f} ms,"
                f" SIGHUP {samples['sighup-w1'][-1] * 1000:.0f} ms")
    finally:
        one.stop()
        if many:
            many.stop()
    for _ in range(plan.handoff_reloads):
        samples["python-pass"].append(time_command([PYTHON, "-c", "pass"]))
        samples["imports"].append(time_command([PYTHON, "-c", "import uvicorn, uvloop, httptools"]))
    return {key: analyze.spread(values) for key, values in samples.items()}


def graceful_reload_workers(plan: Plan) -> list[int]:
    """graceful-http's worker counts in the reload runs, standalone and under systemd: the plan's, and 1 too in a
    full run (a generation without workers starts differently: no fork, no rollout)."""
    return [plan.reload_workers] + ([1] if plan.reload_workers != 1 and plan.kind == "full" else [])


def standalone_reloads(plan: Plan, raw: Path, keep: dict) -> list[dict]:
    scenarios = [lambda workers=workers: GracefulHttp(workers, raw) for workers in graceful_reload_workers(plan)]
    makers = {
        "gunicorn-hup": lambda: Gunicorn(plan.reload_workers, raw, "HUP"),
        "gunicorn-usr2": lambda: Gunicorn(plan.reload_workers, raw, "USR2"),
        "uvicorn-hup": lambda: Uvicorn(max(2, plan.reload_workers), raw),
    }
    scenarios += [makers[p] for p in plan.peers if p in makers]
    results = []
    for make in scenarios:
        server = make()
        server.start()
        try:
            result, kept = under_reloads(server, plan, raw, f"reloads-{server.tag}")
        except BaseException:
            say(f"{server.label} log:\n{server.log_tail()}")
            raise
        finally:
            server.stop()
        results.append(result)
        keep[server.label] = kept
    return results


def generation(containers, main: int) -> list[int]:
    """The serving generation inside the container: its main and the main's children (its workers)."""
    out = containers.service.container.run(f"cat /proc/{main}/task/*/children", check=False).stdout
    return [main, *(int(p) for p in out.split())]


def resources(service, containers) -> dict:
    """The serving generation's RSS and descriptors (main and workers), and the processes in the unit's cgroup."""
    c = containers.service.container
    pids = generation(containers, service.main_pid())
    rss = fds = 0
    for pid in pids:
        status = c.run(f"cat /proc/{pid}/status", check=False).stdout
        rss += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        fds += int(c.run(f"ls /proc/{pid}/fd | wc -l", check=False).stdout.strip() or 0)
    return {"main_pid": pids[0], "generation_processes": len(pids), "rss_kib": rss, "fds": fds,
            "cgroup_processes": len(containers.service.cgroup_pids())}


def settle(service, containers) -> dict:
    """Wait until only the serving generation is left in the cgroup, then read the resources."""
    def only_serving():
        return set(containers.service.cgroup_pids()) <= set(generation(containers, service.main_pid()))
    try:
        wait_for(only_serving, 30, "old generations to exit", interval=0.1)
    except BenchError as exc:
        say(f"soak: {exc}")
    return resources(service, containers)


def soak_section(plan: Plan, service, containers) -> dict:
    """Many `systemctl reload`s under wrk -c50 (in back-to-back runs of soak_chunk s): errors, and growth."""
    service.reload()
    before = settle(service, containers)
    say(f"soak: {plan.soak_reloads} × systemctl reload under wrk -c{CONNECTIONS}")
    reloads, chunks = [], []
    while len(reloads) < plan.soak_reloads:
        process = wrk.start(url(service), plan.soak_chunk, CONNECTIONS)
        began = time.monotonic()
        reloads += drive_reloads(service, began + plan.reload_warmup, began + plan.soak_chunk - plan.reload_tail,
                                 plan.soak_interval, limit=plan.soak_reloads - len(reloads))
        chunks.append(wrk.finish(process, timeout=plan.soak_chunk + 120))
        if not reloads:
            raise BenchError(f"no reload fitted in a {plan.soak_chunk} s soak run")
        say(f"soak: {len(reloads)}/{plan.soak_reloads} reloads")
    after = settle(service, containers)
    return {
        "reloads": len(reloads), "failed_reloads": sum(1 for r in reloads if not r["ok"]),
        "wrk": {"runs": len(chunks), "duration_s": len(chunks) * plan.soak_chunk,
                "requests": sum(c["requests"] for c in chunks),
                "req_s": round(sum(c["requests"] for c in chunks) / (len(chunks) * plan.soak_chunk), 1),
                "non_2xx_3xx": sum(c["non_2xx_3xx"] for c in chunks),
                "socket_errors": sum(c["socket_errors"] for c in chunks),
                "errors": {k: sum(c["errors"][k] for c in chunks) for k in chunks[0]["errors"]},
                "p99_ms": analyze.ms(max(c["p99"] for c in chunks)),  # the worst run's
                "max_ms": analyze.ms(max(c["max"] for c in chunks))},
        "before": before, "after": after,
        "reload_done_ms": analyze.spread([r["done"] - r["requested"] for r in reloads if r["done"]]),
    }


def systemd_handoff(plan: Plan, graceful) -> dict:
    """`systemctl reload` timed inside the container, interleaved with the floor measured on the host."""
    samples = defaultdict(list)
    phases = [(1, "systemd-w1")] + ([(plan.reload_workers, "systemd-wN")] if plan.reload_workers != 1 else [])
    for workers, key in phases:
        if graceful.workers != workers:
            graceful.set_workers(workers)
        for _ in range(plan.handoff_reloads):
            samples["floor-uvicorn-systemd"].append(time_first_answer("uvicorn"))
            times = graceful.timed_reload_inside()
            samples[key].append(times["total"])
            for part in ("before", "service"):
                if part in times:
                    samples[f"{key}-{part}"].append(times[part])
            time.sleep(0.3)  # the old generation drains and exits
        say(f"handoff: systemctl reload, workers={workers}: median {statistics.median(samples[key]) * 1000:.0f} ms")
    # The reference: the same unit and sandbox with a no-op ExecReload (systemd's own share of a reload).
    graceful.set_exec_reload("+/bin/true")  # outside the sandbox, as the shipped ExecReload=
    try:
        for _ in range(plan.handoff_reloads):
            samples["systemd-noop"].append(graceful.timed_reload_inside()["total"])
    finally:
        graceful.set_exec_reload(None)
    if graceful.workers != plan.reload_workers:
        graceful.set_workers(plan.reload_workers)
    return {key: analyze.spread(values) for key, values in samples.items()}


def systemd_noop_reloads(plan: Plan, graceful, raw: Path) -> dict:
    """The load tool through `systemctl reload`s of the same unit that reload nothing (`ExecReload=+/bin/true`):
    what systemd's own part (systemctl, D-Bus, PID 1, starting the ExecReload= process) costs the second after a
    reload, which no service avoids. Our rows under systemd are read against it."""
    workers = graceful.workers
    say(f"reloads: systemctl reload doing nothing (ExecReload=+/bin/true), workers={workers}, load tool")
    graceful.set_exec_reload("+/bin/true")  # outside the sandbox, as the shipped ExecReload=
    try:
        data, reloads = load_tool_through_reloads(graceful, plan, raw / f"reloads-systemd-noop-w{workers}.json")
    finally:
        graceful.set_exec_reload(None)
    return {"label": f"systemctl reload doing nothing (ExecReload=+/bin/true, workers={workers})", "workers": workers,
            "probe": analyze.summarize_probe(data, reloads),
            "reload_done_ms": analyze.spread([r["done"] - r["requested"] for r in reloads if r["done"]])}


def systemd_sections(plan: Plan, raw: Path, keep: dict, results: dict) -> None:
    from bench.systemd import Containers

    say(f"booting systemd in a container (graceful-http --workers {plan.reload_workers}, uvicorn socket unit)")
    with Containers(plan.reload_workers) as containers:
        if "restart" in plan.sections:
            from bench.restart import restart_section

            results["restart"] = restart_section(plan, containers, say)
        graceful = containers.graceful()
        graceful.start()
        try:
            if "handoff" in plan.sections:
                results["handoff"].update(systemd_handoff(plan, graceful))
            if "reloads" in plan.sections:
                for workers in graceful_reload_workers(plan):
                    if graceful.workers != workers:
                        graceful.set_workers(workers)
                    result, kept = under_reloads(graceful, plan, raw, f"reloads-systemd-graceful-w{workers}")
                    results["reloads"].append(result)
                    keep[graceful.label] = kept
                    results.setdefault("reload_noop", []).append(systemd_noop_reloads(plan, graceful, raw))
                    results["systemd_idle_start"] = graceful.idle_start_in_effect()
                    if not results["systemd_idle_start"]:  # what the shipped unit does on a host, beside it
                        graceful.grant_idle_start(True)
                        try:
                            result, kept = under_reloads(graceful, plan, raw, f"reloads-systemd-idle-w{workers}")
                            results["reloads"].append(result)
                            keep[graceful.label] = kept
                        finally:
                            graceful.grant_idle_start(False)
                if graceful.workers != plan.reload_workers:
                    graceful.set_workers(plan.reload_workers)
            if "soak" in plan.sections and plan.soak_reloads:
                results["soak"] = soak_section(plan, graceful, containers)
        except BaseException:
            say(f"{graceful.label} journal:\n{graceful.log_tail()}")
            raise
        finally:
            graceful.stop()
        if "reloads" in plan.sections and "uvicorn-socket-unit" in plan.peers:
            uvicorn = containers.uvicorn()
            uvicorn.start()
            try:
                result, kept = under_reloads(uvicorn, plan, raw, "reloads-systemd-uvicorn")
                results["reloads"].append(result)
                keep[uvicorn.label] = kept
            finally:
                uvicorn.stop()


# ---- versions, targets, report -------------------------------------------------------------------------------------


def byte_compile() -> None:
    """Compile graceful-http's modules (and the bench's app) to bytecode once, as installing a package does (pip,
    dh_python3). The servers inherit PYTHONDONTWRITEBYTECODE when the caller's environment sets it, and the
    container's code is read-only: without this, every new generation would compile every module from source
    (about 80 ms of CPU per start on this machine), a cost of running from a bare checkout, not of a reload."""
    import compileall

    compileall.compile_dir(SERVICE_DIR, quiet=1)
    compileall.compile_dir(REPO / "bench", quiet=1, maxlevels=0)


def versions() -> dict:
    def package(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    sys.path.insert(0, str(SERVICE_DIR))
    import graceful_http

    systemd = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "graceful-http": f"{graceful_http.__version__} ({_git_revision()})"
                         + ("" if SERVICE_DIR == REPO / "service" else f" from {SERVICE_DIR}"),
        "python": platform.python_version(),
        "uvicorn": package("uvicorn"), "gunicorn": package("gunicorn"), "uvloop": package("uvloop"),
        "httptools": package("httptools"), "matplotlib": package("matplotlib"),
        "wrk": wrk.version(),
        "systemd": systemd[0] if systemd else "not found",
        "kernel": platform.release(),
    }


def format_interval(bounds: list[float] | None) -> str:
    """A ratio's interval as the tables print it (see `analyze.ratio_interval`)."""
    return f"{bounds[0]:.2f}–{bounds[1]:.2f}×" if bounds else "–"


def _git_revision() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def machine() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def floor_for(handoff: dict, key: str) -> float | None:
    """The floor measured in the same phase as `key` (the systemd rows have their own, interleaved with them)."""
    floor_key = "floor-uvicorn-systemd" if key.startswith("systemd") or key == "floor-uvicorn-systemd" \
        else "floor-uvicorn"
    return (handoff.get(floor_key) or {}).get("median_ms")


def targets(results: dict) -> list[dict]:
    rows = []

    def add(target, measured, met):
        rows.append({"target": target, "measured": measured, "met": bool(met)})

    steady = results.get("steady") or []
    ours = next((r for r in steady if r["server"] == "graceful-http" and r["workers"] == 1), None)
    if ours and ours["req_s_vs_uvicorn"] is not None:
        add("steady, workers=1: req/s ≥ 0.98× plain uvicorn", f"{ours['req_s_vs_uvicorn']:.3f}×",
            ours["req_s_vs_uvicorn"] >= 0.98)
        add("steady, workers=1: p99 ≤ 1.1× plain uvicorn", f"{ours['p99_vs_uvicorn']:.3f}×",
            ours["p99_vs_uvicorn"] <= 1.1)
        if ours.get("cpu_vs_uvicorn"):
            add("steady, workers=1: server CPU per request ≤ 1.02× plain uvicorn's (the per-request overhead; the"
                " figure a busy machine disturbs least)", f"{ours['cpu_vs_uvicorn']:.3f}×", ours["cpu_vs_uvicorn"] <= 1.02)
    for workers in sorted({r["workers"] for r in steady if r["workers"] > 1}):
        row = next((r for r in steady if r["server"] == "graceful-http" and r["workers"] == workers), None)
        if row and row["p99_vs_uvicorn"] is not None:
            add(f"steady, workers={workers}: p99 ≤ 1.1× uvicorn --workers {workers} (balanced workers)",
                f"{row['p99_vs_uvicorn']:.3f}× ({row['processes']} pids answering)", row["p99_vs_uvicorn"] <= 1.1)
        if row and row.get("splits"):
            add(f"steady, workers={workers}: every burst of {CONNECTIONS} new keep-alive connections split evenly"
                f" (each worker within a fifth of its share)", ", ".join("/".join(map(str, s)) for s in row["splits"]),
                all(balanced(s) for s in row["splits"]))
    for row in results.get("reloads") or []:
        if not row["server"].startswith("graceful-http"):
            continue
        errors = row["wrk"]["non_2xx_3xx"] + row["wrk"]["socket_errors"] + row["probe"]["errors"]["total"]
        reloads = row["wrk"]["reloads"] + row["probe"]["reloads"]
        add(f"{row['label']}: zero errors over reloads under load", f"{errors} errors over {reloads} reloads",
            errors == 0 and row["wrk"]["failed_reloads"] + row["probe"]["failed_reloads"] == 0)
        after, steady_p99 = row["probe"]["after_reload"]["p99_ms"], row["probe"]["steady"]["p99_ms"]
        if after is not None and steady_p99:
            interval = row["probe"].get("p99_after_vs_steady_interval")
            add(f"{row['label']}: p99 ≤1 s after a reload ≤ 1.3× steady p99",
                f"{after:.1f} ms vs {steady_p99:.1f} ms ({after / steady_p99:.2f}×"
                + (f"; 95 % interval over its reloads {format_interval(interval)}" if interval else "") + ")",
                after <= 1.3 * steady_p99)
        # Not the wording: under systemd, what a `systemctl reload` that reloads nothing costs the same
        # second (systemd's share, measured in the same container) comes first; ours is read on top of it.
        noop = next((n for n in results.get("reload_noop") or () if n["workers"] == row["workers"]
                     and row["reload"] == "systemctl reload"), None)
        if noop and after is not None and steady_p99:
            n_after, n_steady = noop["probe"]["after_reload"]["p99_ms"], noop["probe"]["steady"]["p99_ms"]
            if n_after is not None and n_steady:
                ours, floor = after / steady_p99, n_after / n_steady
                add(f"(for reference, not the issue's target) {row['label']}: p99 after ÷ steady ≤ 1.3× on top of"
                    " what a `systemctl reload` doing nothing costs (ExecReload=+/bin/true)",
                    f"{ours:.2f}× vs {floor:.2f}× for nothing: +{ours - floor:.2f}", ours - floor <= 0.3)
    soak = results.get("soak")
    if soak:
        errors = soak["wrk"]["non_2xx_3xx"] + soak["wrk"]["socket_errors"]
        add(f"soak: zero errors over {soak['reloads']} systemctl reloads under wrk -c{CONNECTIONS}",
            f"{errors} errors, {soak['failed_reloads']} failed reloads", errors == 0 and not soak["failed_reloads"])
        b, a = soak["before"], soak["after"]
        add("soak: no growth in RSS, fds, cgroup processes",
            f"RSS {b['rss_kib']}→{a['rss_kib']} KiB, fds {b['fds']}→{a['fds']}, "
            f"processes {b['cgroup_processes']}→{a['cgroup_processes']}",
            a["fds"] <= b["fds"] and a["cgroup_processes"] <= b["cgroup_processes"]
            and a["rss_kib"] <= b["rss_kib"] * 1.1)
    for row in results.get("proxy") or []:
        if row["server"].startswith("graceful-http"):
            failed = row["failed_post"] + row["failed_get"]
            add(f"behind {row['proxy']} with its defaults: no request crosses the server's close of an idle"
                " upstream connection", f"{failed} failed of {row['requests']}", failed == 0)
    handoff = results.get("handoff") or {}
    if handoff:
        n = results["settings"]["reload_workers"]
        short = {"sighup-w1": "standalone, workers=1, SIGHUP",
                 "control-w1": "standalone, workers=1, control socket (`graceful-http reload` minus its start)",
                 "systemd-w1": "under systemd, workers=1, `systemctl reload` returns",
                 "systemd-w1-service": "under systemd, workers=1, from the request reaching graceful-http",
                 "sighup-wN": f"standalone, workers={n}, SIGHUP",
                 "systemd-wN": f"under systemd, workers={n}, `systemctl reload` returns",
                 "systemd-wN-service": f"under systemd, workers={n}, from the request reaching graceful-http"}
        for key, title in short.items():
            value = (handoff.get(key) or {}).get("median_ms")
            floor = floor_for(handoff, key)
            if value is not None and floor:
                add(f"handoff median ≤ 1.5× floor: {title}", f"{value:.0f} ms vs floor {floor:.0f} ms "
                    f"({value / floor:.2f}×)", value <= 1.5 * floor)
        # Not the wording: under systemd, the floor plus what a no-op `systemctl reload` of the same
        # unit costs (systemd's share), which no ExecReload= can avoid.
        noop = (handoff.get("systemd-noop") or {}).get("median_ms")
        floor = floor_for(handoff, "systemd-w1")
        for key in ("systemd-w1", "systemd-wN"):
            value = (handoff.get(key) or {}).get("median_ms")
            if value is not None and floor and noop:
                add(f"(for reference, not the issue's target) {short[key]}: ≤ 1.5× (floor + no-op reload)",
                    f"{value:.0f} ms vs {floor:.0f} + {noop:.0f} ms ({value / (floor + noop):.2f}×)",
                    value <= 1.5 * (floor + noop))
    counted = results.get("instructions")
    if counted:
        add("workers=1: instructions per request ≤ 1.02× plain uvicorn's (callgrind, same app, same engine; the"
            " per-request overhead, whatever the machine's load)", f"{counted['graceful-http']:,} vs"
            f" {counted['uvicorn']:,} ({counted['ratio']:.3f}×)", counted["ratio"] <= 1.02)
    for row in results.get("memory") or []:
        if row["server"].startswith("graceful-http (") and row["peak_vs_steady"] is not None:
            add(f"{row['server']}: peak PSS during reloads ≤ 1.3× steady (40 MB per worker)",
                f"{row['peak_pss_mib']} MiB vs {row['steady_pss_mib']} MiB ({row['peak_vs_steady']}×)",
                row["peak_vs_steady"] <= 1.3)
    return rows


def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def workers_paragraph(results: dict) -> list[str]:
    """How req/s grows with workers here, and why: how many CPUs the servers and wrk kept busy."""
    cpus = results["machine"]["cpus"]
    lines = []
    for name in ("graceful-http", "uvicorn", "gunicorn"):
        rows = {r["workers"]: r for r in results["steady"] if r["server"] == name}
        if 1 in rows and 2 in rows and rows[1]["req_s"]:
            one, two = rows[1], rows[2]
            lines.append(f"- {name}: {one['req_s']:,.0f} → {two['req_s']:,.0f} req/s from 1 to 2 workers"
                         f" ({two['req_s'] / one['req_s']:.2f}×); busy CPUs: server {one.get('server_cpus', 0):.2f} →"
                         f" {two.get('server_cpus', 0):.2f}, wrk {one.get('wrk_cpus', 0):.2f} →"
                         f" {two.get('wrk_cpus', 0):.2f}.")
    if not lines:
        return []
    return [f"**Workers.** This machine has {cpus} CPUs and the load generator runs on it too: a second worker"
            " can only use what wrk (one thread) leaves, so req/s cannot double here; near-linear growth needs"
            " spare cores beyond the load generator's.", "", *lines]


def markdown(results: dict) -> str:
    v, m, s = results["versions"], results["machine"], results["settings"]
    parts = [f"# graceful-http benchmark ({results['kind']} run, {results['started']})", ""]
    parts.append(f"Machine: {m['cpus']} CPUs ({m['cpu']}), load average at start {m['loadavg_at_start']}, "
                 f"at end {m.get('loadavg_at_end')}. Took {results['seconds']:.0f} s.")
    parts.append("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".")
    parts.append("")
    if results.get("steady"):
        parts += [f"## Steady state (wrk -t1 -c{CONNECTIONS} -d{s['steady_duration']}s, median of "
                  f"{s['steady_runs']} runs, round robin; access logs off)", ""]
        rows = [[r["server"], r["workers"], r["processes"], r["req_s"], r["p50_ms"], r["p99_ms"],
                 f"{r['req_s_vs_uvicorn']:.3f}×" if r["req_s_vs_uvicorn"] else "–",
                 f"{r['p99_vs_uvicorn']:.3f}×" if r["p99_vs_uvicorn"] else "–",
                 r["cpu_us_per_request"], f"{r['cpu_vs_uvicorn']:.3f}×" if r["cpu_vs_uvicorn"] else "–",
                 " / ".join(str(x) for x in r["runs_req_s"]), r["errors"],
                 ", ".join("/".join(map(str, split)) for split in r.get("splits") or ()) or "–"]
                for r in results["steady"]]
        parts.append("\"pids answering\": distinct pids in 0.5 s of the load tool's 50 connections (with 2 workers,"
                     " a burst of new connections can all land on one of them). \"split\": after each run, how the"
                     " load tool's burst of 50 new keep-alive connections landed on the workers.\n")
        parts.append(_table(["server", "workers", "pids answering", "req/s", "p50 ms", "p99 ms", "req/s vs uvicorn",
                             "p99 vs uvicorn", "server CPU µs/request", "CPU vs uvicorn", "runs (req/s)", "errors",
                             "split (each run)"], rows))
        parts += ["", *workers_paragraph(results), ""]
    if results.get("instructions"):
        c = results["instructions"]
        parts += [f"## Instructions per request (valgrind --tool=callgrind, {c['requests']} requests after"
                  f" {c['warmup']}, one process per stack: `python -m bench.instructions`)", "",
                  _table(["uvicorn (httptools, uvloop)", "graceful-http (workers=1)", "ratio"],
                         [[c["uvicorn"], c["graceful-http"], f"{c['ratio']:.3f}×"]]), ""]
    if results.get("reloads"):
        parts += [f"## Reloads under load (every {s['reload_interval']} s, {s['reload_duration']} s runs, "
                  f"{s['reload_workers']} workers where the server has workers)", "",
                  f"wrk -t1 -c{CONNECTIONS} (totals):", ""]
        rows = [[r["label"], r["wrk"]["reloads"], r["wrk"]["requests"], r["wrk"]["req_s"], r["wrk"]["non_2xx_3xx"],
                 r["wrk"]["socket_errors"], r["wrk"]["p99_ms"], r["wrk"]["max_ms"]] for r in results["reloads"]]
        parts.append(_table(["server (reload)", "reloads", "requests", "req/s", "non-2xx/3xx", "socket errors",
                             "p99 ms", "max ms"], rows))
        parts += ["", f"The load tool (bench/load.py, {CONNECTIONS} keep-alive connections, every request recorded; "
                      "\"after\" = in flight within 1 s after a reload was requested):", ""]
        rows = []
        for r in results["reloads"] + results.get("reload_noop", []):
            p = r["probe"]
            rows.append([r["label"], p["reloads"], p["requests"], p["errors"]["non_2xx"], p["errors"]["socket"],
                         p["p99_ms"], p["steady"]["p99_ms"], p["after_reload"]["p99_ms"],
                         format_interval(p.get("p99_after_vs_steady_interval")), p["after_reload"]["max_ms"],
                         p["after_reload"]["errors"]["total"], p["new_pid_answers_after_ms"]["median"],
                         r["reload_done_ms"]["median_ms"], p["pids"]])
        parts.append(_table(["server (reload)", "reloads", "requests", "non-2xx", "socket errors", "p99 ms",
                             "p99 between reloads", "p99 after", "after ÷ between, 95 % interval", "max after",
                             "errors after",
                             "new pid answers after (median ms)", "reload done after (median ms)", "pids"], rows))
        parts.append("")
    if results.get("soak"):
        k = results["soak"]
        parts += [f"## Soak: graceful-http under systemd, {k['reloads']} × `systemctl reload` under wrk -c{CONNECTIONS}"
                  f" ({k['wrk']['runs']} back-to-back wrk runs of {s['soak_chunk']} s; p99 is the worst run's)", "",
                  _table(["requests", "req/s", "non-2xx/3xx", "socket errors", "failed reloads", "p99 ms", "max ms",
                          "RSS KiB before → after", "fds before → after", "cgroup processes before → after"],
                         [[k["wrk"]["requests"], k["wrk"]["req_s"], k["wrk"]["non_2xx_3xx"], k["wrk"]["socket_errors"],
                           k["failed_reloads"], k["wrk"]["p99_ms"], k["wrk"]["max_ms"],
                           f"{k['before']['rss_kib']} → {k['after']['rss_kib']}",
                           f"{k['before']['fds']} → {k['after']['fds']}",
                           f"{k['before']['cgroup_processes']} → {k['after']['cgroup_processes']}"]]), ""]
    if results.get("handoff"):
        h = results["handoff"]
        parts += ["## Handoff time (no load; interleaved with the floor; each row ÷ the floor of its own phase)", ""]
        rows = []
        for key, title in HANDOFF_ROWS.items():
            if key not in h:
                continue
            n = s["reload_workers"]
            row = h[key]
            floor = floor_for(h, key)
            rows.append([title.format(n=n), row["n"], row["median_ms"], row["p90_ms"], row["min_ms"], row["max_ms"],
                         f"{row['median_ms'] / floor:.2f}×" if floor and row["median_ms"] else "–"])
        parts.append(_table(["what", "n", "median ms", "p90 ms", "min ms", "max ms", "median ÷ floor"], rows))
        parts.append("")
    if results.get("targets"):
        parts += ["## Against the issue's targets (figures, not pass/fail)", ""]
        parts.append(_table(["target", "measured", "met"],
                            [[t["target"], t["measured"], "yes" if t["met"] else "**no**"] for t in results["targets"]]))
        parts.append("")
    if results.get("picture"):
        parts += ["## Latency during reloads", "", f"![request latency during reloads]({results['picture']})", "",
                  results.get("picture_note", ""), ""]
    if results.get("naive"):
        parts += ["", f"## Naive keep-alive clients through reloads ({s['naive_clients']} clients, http.client reusing"
                      f" its connection without checking it, no retry, 0.6–1.4 s between requests; a reload every"
                      f" {s['naive_interval']} s for {s['naive_duration']} s, 2 workers)", ""]
        rows = [[r["server"], r["reloads"], r["requests"], r["failed"], r["reconnects"], r["p99_steady_ms"],
                 r["p99_after_reload_ms"]] for r in results["naive"]]
        parts.append(_table(["server (reload)", "reloads", "requests", "failed", "reconnects", "p99 steady ms",
                             "p99 within 1 s after a reload ms"], rows))
    if results.get("restart"):
        from bench.restart import markdown as restart_markdown

        parts += restart_markdown(results["restart"], s)
    if results.get("proxy"):
        parts += ["", f"## Behind a proxy with its default idle-connection handling ({s['proxy_delay'] * 1000:g} ms"
                      " each way between proxy and server; bursts of 40 requests, half POST, half GET, after idle gaps"
                      f" just around {' and '.join(f'{g:g} s' for g in s['proxy_gaps'])}; each server with its default"
                      " keep-alive timeout)", ""]
        rows = [[r["server"].split(" (")[0], r["proxy"], r["requests"], f"{r['failed_post']} of {r['posts']}",
                 f"{r['failed_get']} of {r['gets']}", r["closed_by_server"]] for r in results["proxy"]]
        parts.append(_table(["server", "proxy", "requests", "failed POST", "failed GET",
                             "upstream connections the server closed"], rows))
    if results.get("memory"):
        parts += ["", f"## Memory through reloads ({s['memory_workers']} workers of an app holding 40 MB each,"
                      f" {s['memory_reloads']} reload(s) under wrk -c16; PSS summed over all the server's processes,"
                      " sampled every 20 ms)", ""]
        rows = [[r["server"], r["steady_pss_mib"], r["peak_pss_mib"], f"{r['peak_vs_steady']}×",
                 r["steady_processes"], r["peak_processes"], r["peak_workers"], r["reloads"], r["failed_reloads"],
                 r["non_2xx_3xx"] + r["socket_errors"]] for r in results["memory"]]
        parts.append(_table(["server (reload)", "steady PSS MiB", "peak PSS MiB", "peak ÷ steady",
                             "processes steady", "processes peak", "children of a main, peak", "reloads",
                             "failed reloads", "errors (wrk)"], rows))
    if results.get("websockets"):
        parts += ["", f"## WebSockets through reloads ({s['ws_clients']} clients that reconnect at once, "
                      f"{s['ws_reloads']} reload(s) {s['ws_interval']} s apart, 2 workers)", "",
                  "Close codes as the clients saw them (1012 Service Restart; 1006: dropped without a close frame);"
                  " \"back\": from the end of a connection until the next one is open; the peak of"
                  " connection ends within 100 ms is the reconnect stampede.", ""]
        rows = [[r["server"], r["connections_ended"],
                 ", ".join(f"{code}: {n}" for code, n in sorted(r["close_codes"].items())) or "–",
                 r["dropped_without_close_frame"], r["failed_reconnects"], r["back_p50_ms"], r["back_max_ms"],
                 r["peak_ends_per_100ms"]] for r in results["websockets"]]
        parts.append(_table(["server (reload)", "connections ended", "close codes", "dropped (1006)",
                             "failed reconnects", "back p50 ms", "back max ms", "peak ends / 100 ms"], rows))
    return "\n".join(parts)


def picture(out: Path, keep: dict, results: dict) -> str | None:
    from bench import plot

    reloads = results.get("reloads") or []
    ours = [r for r in reloads if r["server"].startswith("graceful-http") and r["label"] in keep]
    peers = [r for r in reloads if not r["server"].startswith("graceful-http") and r["label"] in keep]
    if not ours:
        return None
    mine = next((r for r in ours if "systemd" in r["server"]), ours[0])
    panels = [(mine["label"], *keep[mine["label"]], mine["probe"])]
    note = ""
    if peers:
        best = min(peers, key=lambda r: (r["probe"]["errors"]["total"], r["probe"]["after_reload"]["p99_ms"] or 0))
        panels.append((f"best peer: {best['label']}", *keep[best["label"]], best["probe"]))
        note = ("best peer = fewest failed requests, then lowest p99 within 1 s after reloads, among "
                + ", ".join(r["label"] for r in peers))
    plot.draw(out / PICTURE, panels, note)
    results["picture_note"] = f"Left: {mine['label']}." + (f" Right: the best peer, {best['label']} ({note})."
                                                            if peers else "")
    return PICTURE


# ---- main ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds of everything (what CI runs)")
    parser.add_argument("--out", type=Path, help="where to write results (default: bench/results, or "
                                                 "bench/results/smoke with --smoke)")
    parser.add_argument("--only", help="comma-separated sections: steady,handoff,reloads,soak,websockets,naive,proxy,"
                                         "memory,restart,instructions")
    parser.add_argument("--no-systemd", action="store_true", help="skip everything that boots systemd in a container")
    parser.add_argument("--runs", type=int, help="steady-state runs per server")
    parser.add_argument("--duration", type=int, help="seconds per steady-state run")
    parser.add_argument("--reload-duration", type=int, help="seconds per run with reloads")
    parser.add_argument("--interval", type=float, help="seconds between reloads")
    parser.add_argument("--reload-workers", type=int, help="workers of every server in the reload runs")
    parser.add_argument("--handoff-reloads", type=int, help="reloads timed for the handoff figures")
    parser.add_argument("--soak", type=int, help="reloads in the soak (0: none)")
    return parser


def plan_from(args) -> Plan:
    plan = SMOKE if args.smoke else FULL
    changes = {}
    for option, name in (("runs", "steady_runs"), ("duration", "steady_duration"),
                         ("reload_duration", "reload_duration"), ("interval", "reload_interval"),
                         ("reload_workers", "reload_workers"), ("handoff_reloads", "handoff_reloads"),
                         ("soak", "soak_reloads")):
        if getattr(args, option) is not None:
            changes[name] = getattr(args, option)
    if args.only:
        changes["sections"] = tuple(s.strip() for s in args.only.split(",") if s.strip())
        unknown = set(changes["sections"]) - set(FULL.sections)
        if unknown:
            raise SystemExit(f"bench: unknown section(s) {', '.join(sorted(unknown))}")
    if args.no_systemd:
        changes["systemd"] = False
    return dataclasses.replace(plan, **changes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_from(args)
    out = args.out or (RESULTS / "smoke" if plan.kind == "smoke" else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw"  # every request of the load tool, the servers' logs: this run's only
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir()
    began = time.monotonic()
    results = {"kind": plan.kind, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine(), "versions": versions(), "settings": dataclasses.asdict(plan),
               "steady": [], "reloads": [], "handoff": {}, "soak": None, "websockets": [], "naive": [], "proxy": [],
               "memory": [], "instructions": None}
    byte_compile()
    if plan.systemd:
        from bench.systemd import boot_check

        boot_check()
    keep: dict = {}
    try:
        if "steady" in plan.sections:
            results["steady"] = steady_section(plan, raw)
        if "handoff" in plan.sections:
            results["handoff"] = handoff_section(plan, raw)
        if "reloads" in plan.sections:
            results["reloads"] = standalone_reloads(plan, raw, keep)
        if "websockets" in plan.sections:
            results["websockets"] = websocket_section(plan, raw)
        if "naive" in plan.sections:
            results["naive"] = naive_section(plan, raw)
        if "proxy" in plan.sections:
            results["proxy"] = proxy_section(plan, raw)
        if "memory" in plan.sections:
            from bench.memory import memory_section

            results["memory"] = memory_section(plan.memory_workers, plan.memory_reloads, plan.memory_steady,
                                               plan.memory_per_reload, plan.memory_whole_generation,
                                               plan.memory_peers, raw, say)
        if "instructions" in plan.sections:
            from bench.instructions import instructions_section

            results["instructions"] = instructions_section(plan.instruction_requests, plan.instruction_warmup, raw, say)
        if plan.systemd and set(plan.sections) & {"handoff", "reloads", "soak", "restart"}:
            systemd_sections(plan, raw, keep, results)
    finally:
        left = kill_marked()
        if left:
            say(f"cleaned up {len(left)} leftover process(es): {left}")
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = targets(results)
    results["picture"] = picture(out, keep, results)
    results["seconds"] = round(time.monotonic() - began, 1)
    text = markdown(results)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    say(f"wrote {out / 'results.md'}, {out / 'results.json'}" + (f", {out / PICTURE}" if results["picture"] else ""))
    return 0
