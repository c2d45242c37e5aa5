"""fdlimit's pure parts: reporting once per interval, and raising the soft limit (in a child process)."""

from __future__ import annotations

import resource
import subprocess
import sys

from graceful_http.fdlimit import OncePerInterval


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_event_is_reported_at_once_then_at_most_once_per_interval():
    clock = Clock()
    reports = OncePerInterval(interval=10.0, clock=clock)
    assert reports.record() == 1
    for _ in range(500):
        clock.now += 0.01
        assert reports.record() == 0
    clock.now = 110.0
    assert reports.record(3) == 503  # everything since the last report, counted
    clock.now = 115.0
    assert reports.record() == 0
    clock.now = 120.5
    assert reports.record() == 2


def test_raise_soft_limit_takes_the_hard_limit():
    code = ("import resource; from graceful_http.fdlimit import raise_soft_limit;"
            " print(raise_soft_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))")

    def limited(soft, hard):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=limited(256, 2048)).stdout
    assert out.strip() == "(256, 2048, 2048) (2048, 2048)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=limited(300, 300)).stdout
    assert out.strip() == "(300, 300, 300) (300, 300)"
