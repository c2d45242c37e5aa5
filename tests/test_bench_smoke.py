"""The benchmark's smoke run (`bench/run --smoke`), so the benchmark never rots.

It must run (as root, with systemd-nspawn, like the other end-to-end tests:
a bench that cannot run fails here, it is never skipped) and write
well-formed results. Timings are only shape-checked: performance targets
belong in the printed figures, never in pass/fail.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.systemd  # it boots systemd in a container for the systemd figures

SERVERS = {"graceful-http", "uvicorn", "gunicorn"}
VERSIONS = ("graceful-http", "python", "uvicorn", "gunicorn", "uvloop", "httptools", "wrk", "systemd")
HANDOFF_KEYS = ("floor-uvicorn", "cold-graceful", "sighup-w1", "control-w1", "command-w1", "sighup-wN", "systemd-w1",
                "systemd-wN")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results"
    result = subprocess.run([str(REPO / "bench" / "run"), "--smoke", "--out", str(out)], cwd=REPO,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (f"bench/run --smoke exited {result.returncode}\n--- stdout ---\n"
                                    f"{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}")
    return out, result.stdout


def test_results_json_is_complete(smoke):
    out, _ = smoke
    data = json.loads((out / "results.json").read_text())
    assert data["kind"] == "smoke"
    for name in VERSIONS:
        assert data["versions"][name] and "not installed" not in data["versions"][name], name

    steady = {(row["server"], row["workers"]): row for row in data["steady"]}
    assert set(steady) == {(server, workers) for server in SERVERS for workers in (1, 2)}
    for row in steady.values():
        assert is_number(row["req_s"]) and row["req_s"] > 0, row
        assert is_number(row["p50_ms"]) and is_number(row["p99_ms"]), row
        assert row["processes"] >= 1, row
        assert is_number(row["req_s_vs_uvicorn"]), row

    reloads = {(row["server"], row["reload"]): row for row in data["reloads"]}
    assert {("graceful-http", "SIGHUP"), ("graceful-http under systemd", "systemctl reload"),
            ("gunicorn", "HUP")} <= set(reloads)
    systemd_workers = {row["workers"] for row in data["reloads"] if row["server"] == "graceful-http under systemd"}
    if not data["systemd_idle_start"]:  # systemd could not apply LimitNICE=+0 here: the row a host would get, beside
        assert {row["workers"] for row in data["reloads"]
                if row["server"] == "graceful-http under systemd, idle start (CAP_SYS_NICE granted)"} == systemd_workers
    assert {row["workers"] for row in data["reload_noop"]} == systemd_workers  # systemd's share, per row
    for row in data["reload_noop"]:
        assert row["probe"]["reloads"] >= 1 and row["probe"]["requests"] > 0, row["label"]
    for label, row in reloads.items():
        assert row["wrk"]["reloads"] >= 1 and row["wrk"]["requests"] > 0, label
        probe = row["probe"]
        assert probe["reloads"] >= 1 and probe["requests"] > 0, label
        assert len(probe["per_reload"]) == probe["reloads"], label
        for key in ("non_2xx", "socket", "total"):
            assert isinstance(probe["errors"][key], int), (label, key)
        assert is_number(probe["p99_ms"]) and is_number(probe["after_reload"]["p99_ms"]), label

    handoff = data["handoff"]
    for key in HANDOFF_KEYS:
        assert handoff[key]["n"] == data["settings"]["handoff_reloads"], key
        assert is_number(handoff[key]["median_ms"]) and handoff[key]["median_ms"] > 0, key

    soak = data["soak"]
    assert soak["reloads"] == data["settings"]["soak_reloads"]
    assert soak["before"]["cgroup_processes"] >= 1 and soak["after"]["rss_kib"] > 0

    websockets = {row["server"]: row for row in data["websockets"]}
    assert len(websockets) == 3, websockets
    for label, row in websockets.items():
        assert row["reloads_ok"] == data["settings"]["ws_reloads"], label
        assert row["connections_ended"] >= 1 and sum(row["close_codes"].values()) == row["connections_ended"], label
        assert is_number(row["back_p50_ms"]) and row["peak_ends_per_100ms"] >= 1, label

    naive = {row["server"]: row for row in data["naive"]}
    assert len(naive) == 3, naive
    for label, row in naive.items():
        assert row["reloads"] >= 1 and row["requests"] > 0, label
        assert isinstance(row["failed"], int) and isinstance(row["reconnects"], int), label

    proxied = {(row["server"].split(" (")[0], row["proxy"]): row for row in data["proxy"]}
    assert set(proxied) == {(server, proxy) for server in SERVERS for proxy in ("nginx", "haproxy")}, proxied
    for key, row in proxied.items():
        assert row["requests"] == row["bursts"] * 40 and row["posts"] + row["gets"] == row["requests"], key
        assert isinstance(row["closed_by_server"], int), key
    memory = {row["server"].split(" (")[0]: row for row in data["memory"]}
    assert set(memory) == {"graceful-http", "gunicorn"}, memory  # the full run adds uvicorn
    for label, row in memory.items():
        assert row["reloads"] == data["settings"]["memory_reloads"] and row["samples"] > 10, label
        assert row["peak_pss_mib"] >= row["steady_pss_mib"] > 0 and is_number(row["peak_vs_steady"]), label
    assert memory["graceful-http"]["peak_workers"] >= data["settings"]["memory_workers"]

    restart = data["restart"]
    assert len(restart["naive"]) == 3, restart["naive"]
    for row in restart["naive"]:
        assert row["reloads"] >= 1 and row["requests"] > 0 and isinstance(row["failed"], int), row
    assert restart["store_cost"]["pairs"] == data["settings"]["store_cost_pairs"]
    assert is_number(restart["store_cost"]["sender_us_per_message"])

    counted = data["instructions"]
    assert counted["requests"] == data["settings"]["instruction_requests"], counted
    assert counted["uvicorn"] > 10_000 and counted["graceful-http"] > 10_000, counted
    assert counted["ratio"] == round(counted["graceful-http"] / counted["uvicorn"], 4), counted

    assert data["targets"], "the targets table is empty"
    for row in data["targets"]:
        assert set(row) == {"target", "measured", "met"} and isinstance(row["met"], bool), row


def test_markdown_and_table_are_printed(smoke):
    out, stdout = smoke
    text = (out / "results.md").read_text()
    for heading in ("## Steady state", "## Reloads under load", "## Soak", "## Handoff time", "## WebSockets",
                    "## Naive keep-alive", "## Behind a proxy", "## Memory through reloads", "## Instructions per request",
                    "## Against the issue's targets", "](reload-latency.png)"):
        assert heading in text, heading
        assert heading in stdout, heading


def test_picture_is_a_png(smoke):
    out, _ = smoke
    data = (out / "reload-latency.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 300, (width, height)
