"""`systemctl restart` under load, under systemd 252 in the bench's container.

Three servers, the same naive keep-alive clients (bench.naive: http.client reusing its connection without
checking, never retrying, idle 0.6-1.4 s between requests) through a restart every interval:
- graceful-http with its shipped unit (idle connections kept in systemd's fd store across the restart);
- the same with the store turned off (FileDescriptorStoreMax=0, FDSTORE=0): what a restart did before;
- plain uvicorn started by its own socket unit (`uvicorn --fd 3`).
Then the store's size over many restarts with clients connected (`NFileDescriptorStore`, never above the
open connections), and what one store message costs: the sender's time per FDSTORE=1/FDSTOREREMOVE=1 pair
and PID 1's CPU time for it.
"""

from __future__ import annotations

import json
import time

from bench.naive import naive_reloads
from bench.servers import Reload
from harness.systemd_service import SERVICE

STORE_OFF = f"/etc/systemd/system/{SERVICE}.d/zz-bench-no-fd-store.conf"

# Runs inside the container as the main process of a transient Type=notify unit with a store.
COST_PROBE = r"""
import json, os, select, socket, sys, time
from systemd import daemon

def cpu_of_pid1():
    fields = open("/proc/1/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def barrier():
    r, w = os.pipe()
    daemon.notify("BARRIER=1", fds=[w])
    os.close(w)
    poller = select.poll()
    poller.register(r, select.POLLHUP)
    poller.poll(10000)
    os.close(r)

daemon.notify("READY=1")
pairs = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(listener.getsockname())
conn, _ = listener.accept()
barrier()
cpu, started = cpu_of_pid1(), time.perf_counter()
for n in range(pairs):
    daemon.notify(f"FDSTORE=1\nFDNAME=conn-bench-{n}", fds=[conn.fileno()])
    daemon.notify(f"FDSTOREREMOVE=1\nFDNAME=conn-bench-{n}")
sent = time.perf_counter() - started
barrier()
print(json.dumps({"pairs": pairs, "sender_us_per_message": round(sent / (2 * pairs) * 1e6, 2),
                  "pid1_cpu_us_per_message": round((cpu_of_pid1() - cpu) / (2 * pairs) * 1e6, 2),
                  "wall_us_per_message": round((time.perf_counter() - started) / (2 * pairs) * 1e6, 2)}))
"""


class Restarting:
    """A server in the container whose "reload" is `systemctl restart` (after `reset-failed`: restarts every
    second would hit the unit's start limit, which counts restarts too)."""

    def __init__(self, server, label: str):
        self.server = server
        self.label = label
        self.port = server.port
        self.stored: list[int] = []  # NFileDescriptorStore after each restart

    def reload(self) -> Reload:
        container = self.server.container
        container.run(f"systemctl reset-failed {self.server.unit}", check=False)
        record = self.server._systemctl_timed("restart")
        self.stored.append(int(container.show(self.server.unit, "NFileDescriptorStore").get("NFileDescriptorStore")
                               or 0))
        return record


def set_store(graceful, on: bool) -> None:
    container = graceful.container
    if on:
        container.run(f"rm -f {STORE_OFF}")
    else:
        container.write_file(STORE_OFF, "[Service]\nFileDescriptorStoreMax=0\nEnvironment=FDSTORE=0\n")
    container.systemctl("daemon-reload")
    container.systemctl("restart", SERVICE)


def store_message_cost(container, python: str, pairs: int) -> dict:
    container.write_file("/srv/fdstore_cost.py", COST_PROBE)
    out = container.run(f"systemd-run --quiet --wait --pipe -p Type=notify -p FileDescriptorStoreMax=16 "
                        f"{python} /srv/fdstore_cost.py {pairs}", timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def restart_section(plan, containers, say) -> dict:
    from harness.systemd_service import VENV_DIR

    graceful = containers.graceful()
    graceful.start()
    rows, sizes = [], {}
    try:
        if graceful.workers != 1:
            graceful.set_workers(1)  # the store is kept by a main that serves itself
        for label, on in (("graceful-http, fd store (systemctl restart)", True),
                          ("graceful-http, no fd store (systemctl restart)", False)):
            set_store(graceful, on)
            server = Restarting(graceful, label)
            say(f"restart: {label}, {plan.naive_clients} naive clients, {plan.restart_duration} s")
            row = naive_reloads(server, plan.naive_clients, plan.restart_duration, plan.restart_interval)
            row["store_max"] = max(server.stored, default=0)
            rows.append(row)
        set_store(graceful, True)
        if plan.store_restarts:  # not in the smoke run: the tests restart 5 times
            server = Restarting(graceful, "store size")
            clients = min(plan.naive_clients, 20)
            say(f"restart: store size over {plan.store_restarts} restarts, {clients} clients")
            started = time.monotonic()
            sized = naive_reloads(server, clients, plan.store_restarts * 60.0, plan.restart_interval,
                                  limit=plan.store_restarts)
            sizes = {"restarts": len(server.stored), "clients": clients, "max_stored": max(server.stored, default=0),
                     "failed": sized["failed"], "reconnects": sized["reconnects"],
                     "seconds": round(time.monotonic() - started, 1)}
        cost = store_message_cost(graceful.container, f"{VENV_DIR}/bin/python", plan.store_cost_pairs)
        if graceful.workers != containers.workers:
            graceful.set_workers(containers.workers)  # as the other sections expect
    finally:
        graceful.stop()
    uvicorn = containers.uvicorn()
    uvicorn.start()
    try:
        say(f"restart: {uvicorn.label}")
        rows.append(naive_reloads(uvicorn, plan.naive_clients, plan.restart_duration, plan.restart_interval))
    finally:
        uvicorn.stop()
    return {"naive": rows, "store_size": sizes, "store_cost": cost}


def markdown(section: dict, settings: dict) -> list[str]:
    from bench.main import _table

    parts = ["", f"## `systemctl restart` under load ({settings['naive_clients']} naive keep-alive clients, a restart"
                 f" every {settings['restart_interval']} s for {settings['restart_duration']} s, 1 process)", ""]
    rows = [[r["server"], r["reloads"], r["requests"], r["failed"], r["reconnects"], r["p99_after_reload_ms"],
             r["p99_steady_ms"], r.get("store_max", "")] for r in section["naive"]]
    parts.append(_table(["server", "restarts", "requests", "failed", "reconnects", "p99 after a restart (ms)",
                         "p99 steady (ms)", "max NFileDescriptorStore"], rows))
    s = section["store_size"]
    if s:
        parts += ["", f"Store size over {s['restarts']} restarts with {s['clients']} clients connected: at most"
                      f" {s['max_stored']} descriptors stored ({s['failed']} failed requests, {s['reconnects']}"
                      f" reconnects, {s['seconds']} s)."]
    c = section["store_cost"]
    if c:
        parts += ["", f"One store message (FDSTORE=1 or FDSTOREREMOVE=1, {c['pairs']} pairs): {c['sender_us_per_message']}"
                      f" µs in the sender, {c['pid1_cpu_us_per_message']} µs of PID 1's CPU, {c['wall_us_per_message']}"
                      " µs until processed. A connection is stored once idle for 1 s and taken out at its next"
                      " request: a busy connection costs nothing, one with pauses over 1 s two messages per pause."]
    return parts
