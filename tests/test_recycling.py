"""Which worker to recycle, and when (the pure policy), and when a worker's event loop counts as stuck."""

from __future__ import annotations

from graceful_http.heartbeat import ping_interval, silent_for
from graceful_http.recycling import (
    MAX_LIFETIME,
    MAX_MEMORY,
    MAX_REQUESTS,
    RecycleLimits,
    RecyclePolicy,
    WorkerState,
)


def worker(key, requests=0, age=1.0, rss=None, index=None):
    return WorkerState(key, index or key, requests, age, rss)


def test_a_worker_is_due_at_its_request_limit_and_the_log_says_why():
    policy = RecyclePolicy(RecycleLimits(max_requests=1000))
    assert policy.next_due([worker(1, 999), worker(2, 10)], now=0) is None
    due = policy.next_due([worker(1, 1012), worker(2, 10)], now=0)
    assert (due.key, due.reason, due.detail) == (1, MAX_REQUESTS, "1012 requests >= max-requests 1000")


def test_one_worker_at_a_time_until_its_recycle_is_over():
    policy = RecyclePolicy(RecycleLimits(max_requests=100))
    both_due = [worker(1, 150, age=5), worker(2, 200, age=4)]
    first = policy.next_due(both_due, now=0)
    assert first.key == 1  # the oldest first
    assert policy.next_due(both_due, now=1) is None  # 1 is still being recycled
    assert policy.next_due(both_due, now=2) is None
    policy.finished(1)
    second = policy.next_due([worker(2, 210, age=5), worker(3, 0, age=0.5)], now=3)
    assert second.key == 2


def test_jitter_draws_each_workers_limit_once_within_n_to_n_plus_j():
    draws = iter([7, 0, 3])
    policy = RecyclePolicy(RecycleLimits(max_requests=100, max_requests_jitter=10),
                           randint=lambda low, high: (low, high) == (0, 10) and next(draws))
    assert [policy.request_limit(key) for key in (1, 2, 3, 1, 2)] == [107, 100, 103, 107, 100]
    assert policy.next_due([worker(1, 106), worker(2, 50)], now=0) is None
    assert policy.next_due([worker(1, 107), worker(2, 50)], now=0).key == 1


def test_jitter_with_the_real_random_stays_in_range_and_spreads():
    policy = RecyclePolicy(RecycleLimits(max_requests=1000, max_requests_jitter=50))
    limits = {policy.request_limit(key) for key in range(200)}
    assert min(limits) >= 1000 and max(limits) <= 1050
    assert len(limits) > 10


def test_memory_and_lifetime_limits():
    policy = RecyclePolicy(RecycleLimits(max_memory_mib=200, max_lifetime=3600))
    assert policy.next_due([worker(1, rss=150.0, age=100), worker(2, rss=None, age=10)], now=0) is None
    due = policy.next_due([worker(1, rss=150.0, age=100), worker(2, rss=250.4, age=10)], now=0)
    assert (due.key, due.reason, due.detail) == (2, MAX_MEMORY, "250 MiB resident > max-worker-memory 200 MiB")
    policy.finished(2)
    due = policy.next_due([worker(1, rss=150.0, age=3600)], now=1)
    assert (due.key, due.reason, due.detail) == (1, MAX_LIFETIME, "3600s old >= max-worker-lifetime 3600s")


def test_lifetime_due_for_all_at_once_still_recycles_them_one_by_one():
    policy = RecyclePolicy(RecycleLimits(max_lifetime=10))
    workers = [worker(key, age=11) for key in (1, 2, 3)]
    order = []
    for now in range(6):
        due = policy.next_due([w for w in workers if w.key not in order], now)
        if due is not None:
            order.append(due.key)
        elif policy.recycling is not None:
            policy.finished(policy.recycling)
    assert sorted(order) == [1, 2, 3]


def test_a_failed_replacement_pauses_recycling_and_the_worker_keeps_its_limit():
    policy = RecyclePolicy(RecycleLimits(max_requests=10))
    assert policy.next_due([worker(1, 20)], now=100).key == 1
    policy.failed(1, now=101, retry_after=30)
    assert policy.recycling is None
    assert policy.next_due([worker(1, 25)], now=120) is None
    assert policy.next_due([worker(1, 30)], now=131).key == 1


def test_nothing_is_due_with_every_limit_off():
    policy = RecyclePolicy(RecycleLimits())
    assert not policy.limits.enabled
    assert policy.next_due([worker(1, 10**9, age=10**9, rss=10**6)], now=0) is None


def test_a_worker_that_exits_on_its_own_ends_its_recycle_and_its_limit():
    policy = RecyclePolicy(RecycleLimits(max_requests=5, max_requests_jitter=5), randint=lambda a, b: 2)
    assert policy.next_due([worker(1, 9)], now=0).key == 1
    policy.forget(1)
    assert policy.recycling is None
    assert policy._request_limits == {}


def test_stuck_means_silent_for_at_least_the_timeout():
    assert silent_for(answered_at=10.0, now=14.9, timeout=5.0) is None
    assert silent_for(answered_at=10.0, now=15.0, timeout=5.0) == 5.0
    assert silent_for(answered_at=10.0, now=99.0, timeout=0.0) is None  # off
    assert ping_interval(60) == 1.0 and ping_interval(2) == 0.5
