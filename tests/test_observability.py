"""Logs people can query, Prometheus metrics, and a `systemctl status` that explains itself.

All under real systemd in a container (see test_systemd_service.py), with the
Starlette test app of tests/apps (it has 404s, a /sleep and a lifespan whose
startup can be made slow).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

from harness.container import wait_until
from harness.systemd_service import SERVICE, InstalledService
from support.appfiles import app_source, require_packages
from support.load import Load, get, pid_of
from support.prometheus import Samples, value
from support.prometheus import scrape as scrape_metrics

pytestmark = pytest.mark.systemd

APP = "sample_starlette_app"


def container_name(test: str) -> str:
    return f"gh-obs-{test}-{os.getpid()}"[:60]


def started(service: InstalledService, greeting: str = "hello") -> int:
    require_packages(service.engine)
    service.write_app(APP, app_source(APP, GREETING=greeting))
    service.container.systemctl("start", SERVICE)
    return service.main_pid()


def journal_query(service: InstalledService, *matches: str) -> list[dict]:
    """`journalctl -u graceful-http MATCH... -o json`, exactly as a user would type it."""
    out = service.container.run(f"journalctl --no-pager -u graceful-http {' '.join(matches)} -o json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def access_entries(entries: list[dict]) -> list[dict]:
    return [e for e in entries if "REQUEST_METHOD" in e]


def request(service: InstalledService, path: str, method: str = "GET") -> int:
    status, _, _ = get("127.0.0.1", service.port, path, method=method)
    return status


# ---- the journal ----------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["pypi", "debian"])
def test_journal_entries_of_one_generation_with_request_fields(engine):
    with InstalledService(container_name(f"journal-{engine}"), engine, serve_args=f"{APP}:app") as service:
        pids = [started(service)]
        for _ in range(3):
            assert request(service, "/in-gen-1") == 404
        service.reload()
        pids.append(service.main_pid())
        # The old generation may still answer a connection it accepted just before the handover.
        wait_until(lambda: pid_of(get("127.0.0.1", service.port, "/")[1]) == pids[1], timeout=10,
                   what="generation 2 to answer")
        sent = [("GET", "/", 200), ("GET", "/sleep?seconds=0.05", 200), ("GET", "/missing", 404),
                ("POST", "/", 405), ("GET", "/lifespan", 200)]
        for method, path, status in sent:
            assert request(service, path, method) == status
        service.reload()
        pids.append(service.main_pid())
        wait_until(lambda: pid_of(get("127.0.0.1", service.port, "/")[1]) == pids[2], timeout=10,
                   what="generation 3 to answer")
        assert request(service, "/in-gen-3") == 404

        # Generation 2 has handed over and exits after draining: wait for its last line.
        entries = service.container.wait_for(
            lambda: (lambda found: found if any("exited: generation 2" in e["MESSAGE"] for e in found) else None)(
                journal_query(service, "GENERATION=2")), what="generation 2's last line")
        assert {e["GENERATION"] for e in entries} == {"2"}
        assert {int(e["_PID"]) for e in entries} == {pids[1]}
        assert {e.get("SYSLOG_IDENTIFIER") for e in entries} == {"graceful-http"}
        assert {e.get("_SYSTEMD_UNIT") for e in entries} == {SERVICE}
        messages = [e["MESSAGE"] for e in entries]
        assert any("took over as main: generation 2" in m for m in messages), messages
        assert any(f"handed over to pid {pids[2]} (generation 3)" in m for m in messages), messages
        assert any("app lifespan startup" in m for m in messages), "the app's own log lines carry the generation"

        access = access_entries(entries)
        # The probe requests that waited for generation 2 come first; then exactly what was sent.
        assert [(e["REQUEST_METHOD"], e["REQUEST_PATH"], e["STATUS"]) for e in access[-len(sent):]] == \
            [(method, path.split("?")[0], str(status)) for method, path, status in sent]
        assert all(e["REQUEST_PATH"] != "/in-gen-1" and e["REQUEST_PATH"] != "/in-gen-3" for e in access)
        for entry in access:
            assert float(entry["DURATION_MS"]) >= 0
            assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["CLIENT"]), entry
            assert entry["PRIORITY"] == "6"
        sleep_entry = next(e for e in access if e["REQUEST_PATH"] == "/sleep")
        # The app slept 50 ms on the loop's clock; uvloop's (libuv's) counts whole milliseconds from the start of
        # a loop turn, so its timer may fire up to 1 ms before 50 ms have passed on time.monotonic (49.756 once).
        assert float(sleep_entry["DURATION_MS"]) >= 49
        assert re.fullmatch(r'127\.0\.0\.1:\d+ "GET /sleep\?seconds=0\.05 HTTP/1\.1" 200 \d+\.\dms',
                            sleep_entry["MESSAGE"]), sleep_entry["MESSAGE"]
        # The other generations' requests are theirs.
        assert [e["REQUEST_PATH"] for e in access_entries(journal_query(service, "GENERATION=1"))] == ["/in-gen-1"] * 3
        wait_until(lambda: access_entries(journal_query(service, "GENERATION=3")), timeout=10,
                   what="generation 3's access lines")
        assert "/in-gen-3" in [e["REQUEST_PATH"] for e in access_entries(journal_query(service, "GENERATION=3"))]


def test_access_lines_carry_the_worker():
    with InstalledService(container_name("worker"), "pypi", serve_args=f"{APP}:app --workers 2") as service:
        main = started(service)
        workers = set(service.children(main))
        assert len(workers) == 2
        with Load("127.0.0.1", service.port, clients=6, pause=0.002) as load:
            wait_until(lambda: all(load.result.pids[w] for w in workers), timeout=20, what="both workers to answer")
        assert load.result.failures == [], load.result.summary()

        def enough():
            entries = journal_query(service, "GENERATION=1")
            access = access_entries(entries)
            return entries if len(access) >= load.result.ok else None
        entries = service.container.wait_for(enough, what="every request's access line")
        access = access_entries(entries)
        assert {e.get("WORKER") for e in access} == {"1", "2"}
        pid_of_worker = {}
        for entry in access:
            pid_of_worker.setdefault(entry["WORKER"], set()).add(int(entry["_PID"]))
        assert {p for pids in pid_of_worker.values() for p in pids} == workers
        assert all(len(pids) == 1 for pids in pid_of_worker.values()), pid_of_worker
        # Query by worker, as a user would.
        one = access_entries(journal_query(service, "GENERATION=1", "WORKER=1"))
        assert one and {e["WORKER"] for e in one} == {"1"}
        # The main's own lines name no worker.
        main_lines = [e for e in entries if int(e["_PID"]) == main]
        assert main_lines and all("WORKER" not in e for e in main_lines)
        assert any("worker 2 started as pid" in e["MESSAGE"] for e in main_lines)


def test_no_access_log_means_no_access_lines():
    with InstalledService(container_name("noaccess"), "pypi", serve_args=f"{APP}:app --no-access-log") as service:
        started(service)
        for _ in range(10):
            assert request(service, "/") == 200
        service.reload()
        for _ in range(10):
            request(service, "/missing")
        # Lifecycle lines still arrive, and the last one of generation 2 comes after its requests.
        assert request(service, "/healthz") == 200
        service.container.wait_for(
            lambda: any("took over as main: generation 2" in e["MESSAGE"] for e in journal_query(service)),
            what="generation 2's lifecycle lines")
        service.container.systemctl("stop", SERVICE)
        entries = journal_query(service)
        assert any("exited: generation 2" in e["MESSAGE"] for e in entries)
        assert access_entries(entries) == []
        assert not [e["MESSAGE"] for e in entries if "HTTP/1.1" in e["MESSAGE"]]


# ---- metrics --------------------------------------------------------------------------------


def scrape(service: InstalledService) -> Samples:
    return scrape_metrics("127.0.0.1", service.port)


@pytest.mark.parametrize("engine", ["pypi", "debian"])
def test_metrics_across_generations(engine):
    with InstalledService(container_name(f"metrics-{engine}"), engine,
                          serve_args=f"{APP}:app --metrics --ready-timeout 5") as service:
        started(service)
        for path in ("/", "/", "/", "/missing", "/missing"):
            request(service, path)
        first = scrape(service)
        assert value(first, "graceful_http_generation") == 1
        assert value(first, "graceful_http_requests_total", worker="0", status_class="2xx") == 3
        assert value(first, "graceful_http_requests_total", worker="0", status_class="4xx") == 2
        assert value(first, "graceful_http_request_duration_seconds_count", worker="0") == 5
        assert value(first, "graceful_http_requests_in_flight", worker="0") == 1  # this scrape
        assert value(first, "graceful_http_reloads_total", result="succeeded") == 0
        assert value(first, "graceful_http_reloads_total", result="failed") == 0
        assert value(first, "graceful_http_drain_cut_requests_total") == 0
        assert abs(value(first, "graceful_http_generation_start_time_seconds") - time.time()) < 120

        service.reload()
        wait_until(lambda: value(scrape(service), "graceful_http_generation") == 2, timeout=10,
                   what="generation 2 to answer the scrape")
        request(service, "/")
        second = scrape(service)
        assert value(second, "graceful_http_reloads_total", result="succeeded") == 1
        assert 0 < value(second, "graceful_http_last_handoff_seconds") < 10
        # Request counters start again with each generation (the generation gauge says so).
        assert value(second, "graceful_http_requests_total", worker="0", status_class="2xx") <= 3
        assert ("graceful_http_requests_total", (("status_class", "4xx"), ("worker", "0"))) not in second
        assert value(second, "graceful_http_generation_start_time_seconds") > \
            value(first, "graceful_http_generation_start_time_seconds")

        # A failed reload is counted, and the count is carried to the next generation.
        service.write_app(APP, 'raise RuntimeError("not today")\n')
        assert service.reload(check=False).returncode != 0
        failed = scrape(service)
        assert value(failed, "graceful_http_generation") == 2
        assert value(failed, "graceful_http_reloads_total", result="failed") == 1
        service.write_app(APP, app_source(APP))
        service.reload()
        wait_until(lambda: value(scrape(service), "graceful_http_generation") == 3, timeout=10,
                   what="generation 3 to answer the scrape")
        third = scrape(service)
        assert value(third, "graceful_http_reloads_total", result="succeeded") == 2
        assert value(third, "graceful_http_reloads_total", result="failed") == 1

        # Only GET/HEAD; and /metrics is not served without --metrics (covered below for workers).
        assert request(service, "/metrics", "POST") == 405


def test_metrics_are_off_unless_asked_for():
    with InstalledService(container_name("nometrics"), "pypi", serve_args=f"{APP}:app") as service:
        started(service)
        status, body, _ = get("127.0.0.1", service.port, "/metrics")
        assert (status, body) == (404, b"Not Found"), "without --metrics, /metrics is the app's"


def test_metrics_with_workers_count_reloads_too():
    with InstalledService(container_name("metricsw"), "pypi",
                          serve_args=f"{APP}:app --metrics --workers 2") as service:
        main = started(service)
        samples = scrape(service)
        worker_labels = {labels for (name, labels) in samples if name == "graceful_http_requests_in_flight"}
        assert worker_labels == {(("worker", "1"),), (("worker", "2"),)}, "a scrape shows every worker"
        for generation in (2, 3):
            service.reload()
            wait_until(lambda: value(scrape(service), "graceful_http_generation") == generation, timeout=10,
                       what=f"generation {generation} to answer the scrape")
        assert service.main_pid() != main
        samples = scrape(service)
        assert value(samples, "graceful_http_reloads_total", result="succeeded") == 2, \
            "two reloads succeeded; a multi-worker generation must count them as a single process does"
        assert value(samples, "graceful_http_last_handoff_seconds") > 0


# ---- STATUS= in systemctl status -------------------------------------------------------------

SERVING = re.compile(r"gen (\d+) · pid (\d+) · serving · (\d+) in flight · (\d+) requests(?: · \d+ connections adopted)?")


def status_text(service: InstalledService) -> str:
    return service.container.show(SERVICE, "StatusText")["StatusText"]


def test_status_text_tells_generation_pid_traffic_reloads_and_failures():
    with InstalledService(container_name("status"), "pypi", serve_args=f"{APP}:app --ready-timeout 20") as service:
        main = started(service)
        for _ in range(12):
            assert request(service, "/") == 200
        # Serving: generation, pid, in flight, requests (updated within about a second).
        wait_until(lambda: SERVING.fullmatch(status_text(service)) and
                   int(SERVING.fullmatch(status_text(service)).group(4)) >= 12, timeout=5,
                   what="STATUS= to count the requests")
        gen, pid, in_flight, total = SERVING.fullmatch(status_text(service)).groups()
        assert (int(gen), int(pid), int(in_flight)) == (1, main, 0)

        # A request in flight shows.
        slow = threading.Thread(target=request, args=(service, "/sleep?seconds=3"))
        slow.start()
        wait_until(lambda: " · 1 in flight · " in status_text(service), timeout=5, what="1 in flight")
        slow.join()

        # A slow reload: the new generation's lifespan startup takes 3 s.
        service.write_app(APP, app_source(APP, STARTUP_SECONDS=3))
        service.container.systemctl("reload", "--no-block", SERVICE)
        starting = wait_until(lambda: re.fullmatch(r"reloading: starting pid (\d+)", status_text(service)),
                              timeout=3, what="STATUS=reloading: starting pid N")
        new = int(starting.group(1))
        assert new != main
        assert service.main_pid() == main, "still the old main while the new generation starts"
        wait_until(lambda: service.main_pid() == new, timeout=15, what="the slow generation to take over")
        wait_until(lambda: SERVING.fullmatch(status_text(service)), timeout=5, what="STATUS= serving again")
        assert SERVING.fullmatch(status_text(service)).groups()[:2] == ("2", str(new))

        # A failed reload: the reason comes first, then the serving status, and the counts go on.
        for _ in range(5):
            request(service, "/")
        wait_until(lambda: int(SERVING.fullmatch(status_text(service)).group(4)) >= 5, timeout=5,
                   what="STATUS= to count generation 2's requests")
        before = int(SERVING.fullmatch(status_text(service)).group(4))
        service.write_app(APP, 'raise RuntimeError("bad deploy")\n')
        assert service.reload(check=False).returncode != 0
        text = status_text(service)
        failure = re.fullmatch(r"reload failed: (.+) · " + SERVING.pattern, text)
        assert failure, text
        assert failure.group(1).startswith("importing 'sample_starlette_app' raised RuntimeError: bad deploy"), text
        assert failure.groups()[1:3] == ("2", str(new)), text
        assert int(failure.group(5)) >= before, f"the request count went back from {before}: {text!r}"
        # The failure is logged as an error (journalctl -p err finds it).
        errors = [e["MESSAGE"] for e in journal_query(service, "-p", "err")]
        assert any(m.startswith("reload failed: importing 'sample_starlette_app' raised RuntimeError: bad deploy")
                   for m in errors), errors

        # The next successful reload clears the failure.
        service.write_app(APP, app_source(APP))
        service.reload()
        wait_until(lambda: SERVING.fullmatch(status_text(service)) and
                   SERVING.fullmatch(status_text(service)).group(1) == "3", timeout=5, what="gen 3 serving")
