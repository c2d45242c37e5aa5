"""The demo app's /sleep parameter (demo.parse_sleep_seconds)."""

from __future__ import annotations

import pytest

from graceful_http.demo import DEFAULT_SLEEP, parse_sleep_seconds


@pytest.mark.parametrize("query, seconds", [
    ("", DEFAULT_SLEEP),
    ("other=1", DEFAULT_SLEEP),
    ("seconds=3", 3.0),
    ("seconds=0", 0.0),
    ("seconds=0.25", 0.25),
    ("seconds=3600", 3600.0),
    ("seconds=1&seconds=2", 2.0),  # the last one wins
])
def test_parse_sleep_seconds(query, seconds):
    assert parse_sleep_seconds(query) == seconds


@pytest.mark.parametrize("query, message", [
    ("seconds=abc", "seconds must be a number, got 'abc'"),
    ("seconds=", "seconds must be a number, got ''"),
    ("seconds=-1", "seconds must be between 0 and 3600, got '-1'"),
    ("seconds=3600.5", "seconds must be between 0 and 3600, got '3600.5'"),
    ("seconds=nan", "seconds must be between 0 and 3600, got 'nan'"),
    ("seconds=inf", "seconds must be between 0 and 3600, got 'inf'"),
])
def test_parse_sleep_seconds_invalid(query, message):
    with pytest.raises(ValueError) as caught:
        parse_sleep_seconds(query)
    assert str(caught.value) == message
