"""Scraping graceful-http's GET /metrics the way Prometheus does, for tests."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from support.load import get

Samples = dict[tuple[str, tuple], float]


def scrape(host: str, port: int) -> Samples:
    """GET /metrics on a fresh connection, parsed as Prometheus text: {(sample name, sorted labels): value}."""
    status, body, headers = get(host, port, "/metrics")
    assert status == 200, body
    # prometheus_client's own format: 0.0.4 (Debian's 0.16), 1.0.0 (newer); Prometheus reads both.
    assert re.match(r"text/plain; version=(0\.0\.4|1\.0\.0)", headers["content-type"]), headers
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]
