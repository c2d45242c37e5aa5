"""The canary's verdict (pure `canary.judge`): a one-sided two-proportion test with a minimum count."""

from __future__ import annotations

import random

import pytest

from graceful_http.canary import MIN_REQUESTS, judge, z_score


def test_a_version_failing_one_request_in_five_is_rolled_back_with_the_figures():
    verdict = judge(21, 104, 0, 412, seconds=10)
    assert not verdict.promote
    assert verdict.text.startswith("canary: 21 of 104 requests failed vs 0 of 412 (z = ")
    assert "worse than the old generation" in verdict.text


def test_a_version_as_good_as_the_old_one_is_promoted():
    assert judge(0, 104, 0, 412, seconds=10).promote
    assert judge(2, 100, 8, 400, seconds=10).promote  # the same rate
    assert judge(0, 100, 40, 400, seconds=10).promote  # better


def test_too_few_requests_judge_nothing_and_promote_nothing():
    verdict = judge(0, MIN_REQUESTS - 1, 0, 500, seconds=5)
    assert not verdict.promote and "too few to judge" in verdict.text and "in 5s" in verdict.text
    assert not judge(0, 100, 0, MIN_REQUESTS - 1, seconds=5).promote


def test_one_unlucky_failure_does_not_roll_back():
    assert judge(1, 50, 2, 400, seconds=10).promote


def test_z_is_the_pooled_two_proportion_statistic():
    # p_new = 0.2, p_old = 0.1, pooled 0.12: (0.1) / sqrt(0.12 * 0.88 * (1/100 + 1/400)) = 2.752
    assert z_score(20, 100, 40, 400) == pytest.approx(2.752, abs=0.001)
    assert z_score(0, 10, 0, 10) == 0.0 and z_score(10, 10, 10, 10) == 0.0


def test_equal_rates_roll_back_about_one_time_in_a_hundred():
    rng = random.Random(7)
    rollbacks = 0
    for _ in range(2000):
        new = sum(rng.random() < 0.05 for _ in range(200))
        old = sum(rng.random() < 0.05 for _ in range(800))
        rollbacks += not judge(new, 200, old, 800, seconds=10).promote
    assert rollbacks / 2000 < 0.03
