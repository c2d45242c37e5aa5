"""The benchmark's analysis of reload latency, on synthetic records: the interval it prints beside "p99 after a
reload ÷ steady" must say how far one run's reloads let that figure be trusted; and the machine's own wake-up
check (`bench.wakeup`), which the README reads those figures beside."""

from __future__ import annotations

import numpy as np

from bench import analyze

SPACING = 1.5


def records(slow_in: dict[int, int], base_ms: float = 2.0, per_second: int = 4000, seed: int = 7):
    """A run of requests with latencies around `base_ms`, reloads every SPACING s, and `slow_in[i]` requests of
    5× that latency in the second after reload i. Returns (latency, start, after: in flight within a second
    after a reload, reload times)."""
    rng = np.random.default_rng(seed)
    times = [1.0 + SPACING * i for i in range(14)]
    duration = times[-1] + 2.0
    start = np.sort(rng.uniform(0.0, duration, int(per_second * duration)))
    latency = rng.normal(base_ms, base_ms / 10, start.size).clip(0.1) / 1000
    for index, count in slow_in.items():
        window = np.nonzero((start >= times[index]) & (start < times[index] + 1.0))[0]
        latency[rng.choice(window, count, replace=False)] = 5 * base_ms / 1000
    after = np.zeros(start.shape, dtype=bool)
    for t in times:
        after |= (start < t + 1.0) & (start + latency >= t)
    return latency, start, after, times


def test_reloads_that_change_nothing_give_an_interval_around_one():
    latency, start, after, times = records({})
    low, high = analyze.ratio_interval(latency, start, after, times)
    assert low <= 1.0 <= high
    assert high - low < 0.1


def test_one_bad_reload_in_fourteen_widens_the_interval_around_the_figure():
    latency, start, after, times = records({3: 400})  # 10 % of one reload's second, none in the others
    low, high = analyze.ratio_interval(latency, start, after, times)
    figure = np.percentile(latency[after], 99) / np.percentile(latency[~after], 99)
    assert low <= figure <= high
    assert low < 1.1 and high > 2.0  # drawn without that reload, or with it twice: the figure moves that far


def test_every_reload_slow_alike_gives_a_narrow_interval_well_above_one():
    latency, start, after, times = records({index: 200 for index in range(14)})
    low, high = analyze.ratio_interval(latency, start, after, times)
    assert 2.0 < low and high - low < 0.5


def test_too_few_reloads_give_no_interval():
    latency, start, after, times = records({})
    assert analyze.ratio_interval(latency, start, after, times[:2]) is None


def test_the_wakeup_check_summarises_its_round_trips():
    from bench import wakeup

    times = [0.00004] * 990 + [0.003] * 9 + [0.006]
    s = wakeup.summary(times)
    assert (s["round_trips"], s["p50_us"], s["over_2ms"], s["over_5ms"], s["max_ms"]) == (1000, 40, 10, 1, 6.0)
    assert s["p999_ms"] == 6.0 and s["p99_us"] == 3000
    measured = wakeup.round_trips(0.2)
    assert measured and all(t > 0 for t in measured)
