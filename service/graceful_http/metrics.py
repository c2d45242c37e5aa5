"""Prometheus metrics (`--metrics`, served at GET /metrics by the control layer).

Counters of requests reset with each generation; `graceful_http_generation`
tells the scraper which generation it is looking at, so rate() over a reset is
read correctly. Reload counts and the last handoff duration are carried from
one generation to the next, so they survive the handoffs they count.

With `--workers`, a scrape is answered by whichever worker the connection
lands on, so the generation's processes share their metrics through
prometheus_client's multiprocess files, in a directory the main makes for its
generation and removes when the generation exits: every scrape sees every
worker's requests (labelled by `worker`) and the reload counts the main keeps.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import MutableMapping

from graceful_http.inherited import METRICS_SHARED_DIR


class Metrics:
    """One process's metrics: a single-process generation's (everything), a multi-worker generation's
    main (the generation and its reloads) or one of its workers (the requests it answers)."""

    def __init__(self, generation: int, worker: int | None = None, carried: str = "",
                 shared_dir: str | None = None):
        """`carried`: the reload counts the previous generation passed on (see `carried_on`)."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.shared_dir = shared_dir
        self._users_shared_dir: str | None = None  # a directory the user had set: the next generation's
        self.registry = CollectorRegistry(auto_describe=True)
        self._scrape_registry = self.registry
        if shared_dir is not None:
            _write_metrics_to(shared_dir)
            from prometheus_client.multiprocess import MultiProcessCollector

            self._scrape_registry = CollectorRegistry()
            MultiProcessCollector(self._scrape_registry, path=shared_dir)
        labels = {"worker": str(worker or 0)}
        self._labels = labels
        if shared_dir is None or worker is not None:  # a main with workers answers no requests
            self.requests = Counter("graceful_http_requests", "HTTP requests answered, by status class",
                                    ["worker", "status_class"], registry=self.registry)
            self.in_flight = Gauge("graceful_http_requests_in_flight", "HTTP requests being answered",
                                   ["worker"], registry=self.registry, multiprocess_mode="livesum").labels(**labels)
            self.websockets = Gauge("graceful_http_websockets_open", "WebSockets open", ["worker"],
                                    registry=self.registry, multiprocess_mode="livesum").labels(**labels)
            self.duration = Histogram("graceful_http_request_duration_seconds", "Time to answer an HTTP request",
                                      ["worker"], registry=self.registry).labels(**labels)
            self.handover = Counter("graceful_http_handover_connections",
                                    "Keep-alive connections of the previous generation at the reload that started"
                                    " this one: adopted here, and handed over or fallen back (drained there, closed)"
                                    " as the previous generation counted them", ["worker", "result"],
                                    registry=self.registry)
        self.cut = Counter("graceful_http_drain_cut_requests", "Requests cut at the graceful timeout by this process",
                           registry=self.registry)
        if worker is not None:  # the reloads are the main's
            return
        Gauge("graceful_http_generation", "The generation serving this scrape (1 for the first start)",
              registry=self.registry, multiprocess_mode="max").set(generation)
        Gauge("graceful_http_generation_start_time_seconds", "When this generation started (unix time)",
              registry=self.registry, multiprocess_mode="max").set(time.time())
        self.reloads = Counter("graceful_http_reloads", "Reloads since the service started, by result",
                               ["result"], registry=self.registry)
        self.last_handoff = Gauge("graceful_http_last_handoff_seconds",
                                  "From the reload request to this generation serving as main",
                                  registry=self.registry, multiprocess_mode="max")
        self._succeeded, self._failed, self._last, self._reload_started = parse_carried(carried)
        self.reloads.labels(result="succeeded").inc(self._succeeded)
        self.reloads.labels(result="failed").inc(self._failed)
        self.last_handoff.set(self._last)

    @classmethod
    def for_main_of_workers(cls, generation: int, carried: str = "") -> "Metrics":
        """The main's metrics in a multi-worker generation: make the generation's shared directory, which
        the workers inherit through our environment (a user's own value is put back for the next generation)."""
        shared_dir = tempfile.mkdtemp(prefix=f"graceful-http-metrics-gen{generation}-")
        users = os.environ.get(METRICS_SHARED_DIR)
        metrics = cls(generation, carried=carried, shared_dir=shared_dir)
        metrics._users_shared_dir = users
        return metrics

    def observe(self, status: int | None, seconds: float) -> None:
        status_class = f"{status // 100}xx" if status else "5xx"
        self.requests.labels(worker=self._labels["worker"], status_class=status_class).inc()
        self.duration.observe(seconds)

    def connections(self, adopted: int = 0, handed_over: int = 0, fell_back: int = 0) -> None:
        for result, count in (("adopted", adopted), ("handed_over", handed_over), ("fell_back", fell_back)):
            if count:
                self.handover.labels(worker=self._labels["worker"], result=result).inc(count)

    def worker_recycled(self, reason: str) -> None:
        """The main recycled a worker, or replaced a stuck one; `reason`: the option that made it due."""
        if getattr(self, "_recycles", None) is None:
            from prometheus_client import Counter

            self._recycles = Counter("graceful_http_worker_recycles", "Workers replaced new-first, by the option"
                                     " that made them due (worker-timeout: stuck, killed)", ["reason"],
                                     registry=self.registry)
        self._recycles.labels(reason=reason).inc()

    def became_main_after_handoff(self) -> None:
        """This generation now serves as main: the reload that started it succeeded."""
        self._succeeded += 1
        self.reloads.labels(result="succeeded").inc()
        if self._reload_started:
            self._last = max(0.0, time.monotonic() - self._reload_started)
            self.last_handoff.set(self._last)

    def reload_failed(self) -> None:
        self._failed += 1
        self.reloads.labels(result="failed").inc()

    def count_reloads(self, event, before, after) -> None:
        """Count what the state machine's last step (`event`, phase `before` → `after`) meant for reloads."""
        from graceful_http.generation import BecameMain, Phase

        if before in (Phase.RELOADING, Phase.HANDING_OVER) and after is Phase.SERVING:
            self.reload_failed()
        elif isinstance(event, BecameMain) and event.handed_over:
            self.became_main_after_handoff()

    def carried_on(self, reload_started: float) -> str:
        """The counts a successor carries on, its reload having started at `reload_started` (monotonic)."""
        return f"{self._succeeded} {self._failed} {self._last:.6f} {reload_started:.6f}"

    def successor_environ(self, environ: MutableMapping[str, str]) -> None:
        """Not this generation's shared directory for a successor: the user's own, if they had one."""
        if self.shared_dir is not None:
            if self._users_shared_dir is None:
                environ.pop(METRICS_SHARED_DIR, None)
            else:
                environ[METRICS_SHARED_DIR] = self._users_shared_dir

    def process_exited(self, pid: int) -> None:
        """A worker exited: its requests stay counted, its in-flight gauge goes."""
        if self.shared_dir is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid, self.shared_dir)

    def remove_shared_dir(self) -> None:
        """The generation has exited: its shared directory goes with it."""
        if self.shared_dir is not None:
            shutil.rmtree(self.shared_dir, ignore_errors=True)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self._scrape_registry), CONTENT_TYPE_LATEST


def _write_metrics_to(shared_dir: str) -> None:
    """Make prometheus_client keep this process's values in files in `shared_dir` (its multiprocess mode);
    it reads the directory from the environment, which this process's workers inherit.

    prometheus_client picks its value class when it is first imported, from the
    environment; this process may have imported it before the directory existed.
    """
    from prometheus_client import values

    os.environ[METRICS_SHARED_DIR] = shared_dir
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


def parse_carried(text: str) -> tuple[int, int, float, float]:
    """`succeeded failed last_handoff reload_started` -> numbers; zeros for anything malformed."""
    parts = text.split()
    try:
        return int(parts[0]), int(parts[1]), float(parts[2]), float(parts[3])
    except (IndexError, ValueError):
        return 0, 0, 0.0, 0.0
