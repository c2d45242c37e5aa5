"""The worker-by-worker rollout's sequencing (pure: `rollout.Rollout` and `rollout.Retirement`), played as
both mains would: never more than N+1 workers, an old worker retired only once a new one is ready."""

from __future__ import annotations

import pytest

from graceful_http import rollout as r
from graceful_http.workers import RestartBackoff


def kinds(actions):
    return [a for a in actions if not isinstance(a, r.Log)]


class Service:
    """Both mains' machines wired together, with worker counts, run to the end by a scripted world."""

    def __init__(self, new_total: int, old_workers: int, fail: dict[int, int] | None = None):
        self.new = r.Rollout(new_total, RestartBackoff())
        self.old = r.Retirement()
        self.old_serving = {1000 + i: 0 for i in range(old_workers)}
        self.new_ready = 1
        self.fail = dict(fail or {})  # new worker number -> how many of its starts fail
        self.peak = old_workers + 1
        self.retries: list[float] = []
        self.finished = False

    def run(self) -> None:
        pending = list(self.new.begin())
        while pending:
            action = pending.pop(0)
            if isinstance(action, r.Log):
                continue
            if isinstance(action, r.RetireOld):
                assert self.new_ready + len(self.old_serving) <= self.peak
                for reply in kinds(self.old.handle(r.RetireRequested(dict(self.old_serving)))):
                    if isinstance(reply, r.DrainWorker):
                        del self.old_serving[reply.pid]  # it drains, then exits
                        reply = kinds(self.old.handle(r.WorkerExited(reply.pid, len(self.old_serving))))[0]
                    assert isinstance(reply, r.ReplyRetired)
                    pending += self.new.handle(r.OldRetired(reply.pid, reply.left))
            elif isinstance(action, r.StartWorker):
                self.peak = max(self.peak, self.new_ready + 1 + len(self.old_serving))
                if self.fail.get(action.number, 0):
                    self.fail[action.number] -= 1
                    pending += self.new.handle(r.NewWorkerFailed(action.number, "boom"))
                else:
                    self.new_ready += 1
                    pending += self.new.handle(r.NewWorkerReady(action.number))
            elif isinstance(action, r.RetryLater):
                self.retries.append(action.seconds)
                pending += self.new.handle(r.RetryDue(action.number))
            elif isinstance(action, r.Finish):
                assert action.tell_predecessor
                assert kinds(self.old.handle(r.Rolled())) == [r.Complete()]
                self.finished = True


@pytest.mark.parametrize("workers", [2, 3, 4, 8])
def test_a_rollout_never_runs_more_than_n_plus_one_workers(workers):
    service = Service(workers, workers)
    service.run()
    assert service.finished
    assert service.new_ready == workers and not service.old_serving
    assert service.peak == workers + 1


def test_the_sequence_is_ready_then_retire_then_start_the_next():
    rollout = r.Rollout(3, RestartBackoff())
    assert kinds(rollout.begin()) == [r.RetireOld(1)]
    assert kinds(rollout.handle(r.OldRetired(11, 2))) == [r.StartWorker(2)]
    assert kinds(rollout.handle(r.NewWorkerReady(2))) == [r.RetireOld(2)]
    assert kinds(rollout.handle(r.OldRetired(12, 1))) == [r.StartWorker(3)]
    assert kinds(rollout.handle(r.NewWorkerReady(3))) == [r.RetireOld(3)]
    assert kinds(rollout.handle(r.OldRetired(13, 0))) == [r.Finish(tell_predecessor=True)]
    assert rollout.done and rollout.handle(r.NewWorkerReady(4)) == []


def test_a_new_worker_that_fails_is_retried_with_back_off_and_nothing_old_retires_meanwhile():
    service = Service(4, 4, fail={3: 3})
    service.run()
    assert service.finished and service.new_ready == 4
    assert service.retries == [0.5, 1.0, 2.0]  # the workers' restart back-off, doubling
    assert service.peak == 5


def test_events_out_of_turn_change_nothing():
    rollout = r.Rollout(2, RestartBackoff())
    rollout.begin()  # waiting for a retirement
    assert rollout.handle(r.NewWorkerReady(2)) == []
    assert rollout.handle(r.NewWorkerFailed(2, "x")) == []
    assert rollout.handle(r.RetryDue(2)) == []
    assert kinds(rollout.handle(r.OldRetired(5, 1))) == [r.StartWorker(2)]
    assert rollout.handle(r.OldRetired(6, 0)) == []  # not waiting for one now


def test_more_old_workers_than_new_ones_are_all_retired_before_the_end():
    service = Service(2, 4)
    service.run()
    assert service.finished and not service.old_serving and service.new_ready == 2
    assert service.peak == 5  # the old ones were there already: no new worker is added beyond N+1 of the old


def test_fewer_old_workers_than_new_ones_start_the_rest_without_retiring():
    service = Service(4, 2)
    service.run()
    assert service.finished and service.new_ready == 4 and service.peak == 4


def test_with_the_old_main_gone_the_remaining_workers_start_one_after_the_other():
    rollout = r.Rollout(3, RestartBackoff())
    rollout.begin()
    assert kinds(rollout.handle(r.PredecessorGone())) == [r.StartWorker(2)]
    assert kinds(rollout.handle(r.NewWorkerReady(2))) == [r.StartWorker(3)]
    assert kinds(rollout.handle(r.NewWorkerReady(3))) == [r.Finish(tell_predecessor=False)]


def test_the_old_main_retires_the_least_busy_worker_one_at_a_time():
    old = r.Retirement()
    assert kinds(old.handle(r.RetireRequested({10: 3, 11: 0, 12: 1}))) == [r.DrainWorker(11)]
    assert kinds(old.handle(r.RetireRequested({10: 3, 12: 1})))[:1] == []  # one at a time
    assert old.handle(r.WorkerExited(10, 2)) == []  # a crash, not the one retiring: the pool replaces it
    assert kinds(old.handle(r.WorkerExited(11, 2))) == [r.ReplyRetired(11, 2)]
    assert kinds(old.handle(r.RetireRequested({}))) == [r.ReplyRetired(0, 0)]


def test_the_old_main_restores_its_workers_if_the_new_main_dies_mid_rollout():
    old = r.Retirement()
    old.handle(r.RetireRequested({10: 0, 11: 0}))
    old.handle(r.WorkerExited(10, 1))
    actions = old.handle(r.SuccessorGone(4242))
    assert kinds(actions) == [r.Restore("new generation (pid 4242) exited during the rollout")]
    assert old.handle(r.Rolled()) == []  # over: nothing more happens


def test_rolled_completes_the_old_generation():
    old = r.Retirement()
    assert kinds(old.handle(r.Rolled())) == [r.Complete()]
    assert old.handle(r.SuccessorGone(1)) == []


def test_a_main_whose_workers_are_still_rolling_out_says_how_far_it_is_and_starts_a_reload_once_they_serve():
    from graceful_http.generation import (
        BecameMain,
        HandoffMachine,
        Phase,
        ReloadRequested,
        Reply,
        RolloutEnded,
        RolloutStarted,
        SpawnSuccessor,
    )

    machine = HandoffMachine(generation=2, pid=100, ready_timeout=5)
    machine.handle(BecameMain(handed_over=True))
    assert machine.handle(RolloutStarted(r.Rollout(4, RestartBackoff()))) == []
    replies = [a for a in machine.handle(ReloadRequested("SIGHUP", requester="me", canary=3.0)) if isinstance(a, Reply)]
    assert machine.phase is Phase.SERVING  # not started: one generation's workers roll out at a time
    assert replies[0].outcome.code == "started" and "waits until this generation's workers" in replies[0].outcome.detail
    machine.handle(ReloadRequested("POST /graceful", requester="you"))
    assert machine.phase is Phase.SERVING
    assert machine.serving_status(0, 7).endswith("7 requests · rolling out: 1 of 4 workers new")
    machine.rolling_out.begin()
    machine.rolling_out.handle(r.OldRetired(pid=41, left=3))
    machine.rolling_out.handle(r.NewWorkerReady(2))
    assert machine.serving_status(0, 7).endswith(" · rolling out: 2 of 4 workers new, 3 old left")
    actions = machine.handle(RolloutEnded())
    assert machine.serving_status(0, 7).endswith("7 requests")
    # One reload for both requests, with the canary asked for, and both requesters hear its outcome.
    assert [a for a in actions if isinstance(a, SpawnSuccessor)] == [SpawnSuccessor(attempt=1, generation=3, canary=3.0)]
    assert machine.phase is Phase.RELOADING and machine.state.requesters == ("me", "you")
    assert "SIGHUP and POST /graceful" in actions[0].message
    assert machine.handle(RolloutEnded()) == []  # nothing waits any more


def test_a_stop_during_a_rollout_tells_the_waiting_reload_requesters_it_failed():
    from graceful_http.generation import (
        BecameMain,
        HandoffMachine,
        ReloadRequested,
        Reply,
        RolloutEnded,
        RolloutStarted,
        StopRequested,
    )

    machine = HandoffMachine(generation=2, pid=100, ready_timeout=5)
    machine.handle(BecameMain(handed_over=True))
    assert machine.handle(RolloutStarted(r.Rollout(2, RestartBackoff()))) == []
    machine.handle(ReloadRequested("graceful-http reload", requester="me"))
    replies = [a for a in machine.handle(StopRequested("SIGTERM")) if isinstance(a, Reply)]
    assert [(a.requester, a.outcome.code, a.outcome.detail) for a in replies] == [
        ("me", "failed", "the service is stopping")]
    assert machine.handle(RolloutEnded()) == []
