"""Prometheus metrics (`--metrics`, served at GET /metrics by the control layer).

Counters of requests reset with each generation (and, with `--workers`, each
worker counts its own requests: a scrape sees the process that answered it,
labelled by `worker`); `graceful_http_generation` tells the scraper which
generation it is looking at, so rate() over a reset is read correctly.
Reload counts and the last handoff duration are carried from one generation
to the next, so they survive the handoffs they count.
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping

CARRIED_VARIABLE = "GRACEFUL_HTTP_RELOADS"  # "succeeded failed last_handoff_seconds reload_started_monotonic"


class Metrics:
    def __init__(self, generation: int, worker: int | None = None, environ: MutableMapping[str, str] = os.environ):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"worker": str(worker or 0)}
        self._labels = labels
        self.requests = Counter("graceful_http_requests", "HTTP requests answered, by status class",
                                ["worker", "status_class"], registry=self.registry)
        self.in_flight = Gauge("graceful_http_requests_in_flight", "HTTP requests being answered",
                               ["worker"], registry=self.registry).labels(**labels)
        self.duration = Histogram("graceful_http_request_duration_seconds", "Time to answer an HTTP request",
                                  ["worker"], registry=self.registry).labels(**labels)
        Gauge("graceful_http_generation", "The generation serving this scrape (1 for the first start)",
              registry=self.registry).set(generation)
        Gauge("graceful_http_generation_start_time_seconds", "When this generation started (unix time)",
              registry=self.registry).set(time.time())
        self.reloads = Counter("graceful_http_reloads", "Reloads since the service started, by result",
                               ["result"], registry=self.registry)
        self.last_handoff = Gauge("graceful_http_last_handoff_seconds",
                                  "From the reload request to this generation serving as main",
                                  registry=self.registry)
        self.cut = Counter("graceful_http_drain_cut_requests", "Requests cut at the graceful timeout by this process",
                           registry=self.registry)
        self._succeeded, self._failed, self._last, self._reload_started = parse_carried(
            environ.pop(CARRIED_VARIABLE, ""))
        self.reloads.labels(result="succeeded").inc(self._succeeded)
        self.reloads.labels(result="failed").inc(self._failed)
        self.last_handoff.set(self._last)

    def observe(self, status: int | None, seconds: float) -> None:
        status_class = f"{status // 100}xx" if status else "5xx"
        self.requests.labels(worker=self._labels["worker"], status_class=status_class).inc()
        self.duration.observe(seconds)

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

    def carried_for_successor(self, reload_started: float) -> str:
        """The value of CARRIED_VARIABLE for a successor whose reload started at `reload_started` (monotonic)."""
        return f"{self._succeeded} {self._failed} {self._last:.6f} {reload_started:.6f}"

    def reload_counts(self) -> str:
        """The value of CARRIED_VARIABLE for this generation's workers: the counts, no handoff to time."""
        return f"{self._succeeded} {self._failed} {self._last:.6f} 0"

    def update_reload_counts(self, text: str) -> None:
        """In a worker: take the counts its main sends (`reload_counts()`)."""
        succeeded, failed, last, _ = parse_carried(text)
        if succeeded > self._succeeded:
            self.reloads.labels(result="succeeded").inc(succeeded - self._succeeded)
            self._succeeded = succeeded
        if failed > self._failed:
            self.reloads.labels(result="failed").inc(failed - self._failed)
            self._failed = failed
        self._last = last
        self.last_handoff.set(last)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def parse_carried(text: str) -> tuple[int, int, float, float]:
    """`succeeded failed last_handoff reload_started` -> numbers; zeros for anything malformed."""
    parts = text.split()
    try:
        return int(parts[0]), int(parts[1]), float(parts[2]), float(parts[3])
    except (IndexError, ValueError):
        return 0, 0, 0.0, 0.0
