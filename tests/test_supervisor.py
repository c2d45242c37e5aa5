"""The supervisor's handoff paths, in-process: the real state machine and supervisor, fake ports.

Each test drives one reload the way the world would (a request, the
successor's messages, its exit) and checks what the supervisor did to the
world: what systemd was told, who heard which outcome, the pid file, whether
the servers stopped accepting, what was killed.
"""

from __future__ import annotations

import asyncio

from graceful_http import generation as g
from graceful_http.serving import Servers
from graceful_http.supervisor import Ports, Supervisor

PID = 100
SUCCESSOR_PID = 200


class FakeNotifier:
    enabled = True

    def __init__(self):
        self.sent: list[dict] = []

    def send(self, **fields):
        self.sent.append(fields)
        return True

    async def barrier(self, timeout: float = 5.0) -> bool:
        return True


class FakeControlServer:
    def __init__(self, start_reload):
        self.start_reload = start_reload
        self.started_for: int | None = None
        self.closed = False

    async def start(self, pid: int) -> None:
        self.started_for = pid

    def close(self) -> None:
        self.closed = True


class FakePidFile:
    def __init__(self):
        self.pid: int | None = None
        self.writes: list[int] = []

    def write(self, pid: int) -> None:
        self.pid = pid
        self.writes.append(pid)

    def remove(self, pid: int) -> None:
        if self.pid == pid:
            self.pid = None


class FakeServer:
    def __init__(self):
        self.accepting = True
        self.total_requests = 3
        self.shut_down = False

    def describe(self) -> str:
        return "a fake"

    def in_flight(self) -> int:
        return 0

    def stop_accepting(self, replaced: bool = False, moving_to: int | None = None) -> None:
        self.accepting = False

    async def drain(self, deadline: float, websocket_code: int | None = None) -> tuple[int, int]:
        return (1, 0)

    async def shutdown_app(self) -> None:
        self.shut_down = True


class FakeSuccessor:
    """A new generation whose fate the test decides: `ready`/`serving` are futures the test resolves."""

    def __init__(self, attempt: int, pid: int):
        loop = asyncio.get_running_loop()
        self.attempt = attempt
        self.pid = pid
        self.ready: asyncio.Future = loop.create_future()
        self.serving: asyncio.Future = loop.create_future()
        self.living = True
        self.told_main = False
        self.killed = False
        self.adopts = False  # a successor that does not take connections over: the lame-duck drain
        self.rolls = False  # nor asks for a worker-by-worker rollout
        self.closed = False

    async def until_ready(self):
        return await self.ready

    async def says_ready(self) -> None:
        """The new generation reports ready; the supervisor acts on it."""
        self.ready.set_result(g.ChildReady(self.attempt, self.pid))
        await settle()

    def alive(self) -> bool:
        return self.living

    def tell_main(self, rollout: bool = False) -> None:
        self.told_main = True

    async def until_serving(self) -> bool:
        return await self.serving

    def kill(self) -> None:
        self.killed = True
        self.living = False

    def close(self) -> None:
        self.closed = True


class World:
    """A supervisor wired to fakes, plus what it did to them."""

    def __init__(self, ready_timeout: float = 30.0):
        self.notifier = FakeNotifier()
        self.pid_file = FakePidFile()
        self.successors: list[FakeSuccessor] = []
        self.reaped: list[int] = []
        self.timers: list[tuple[float, object, tuple]] = []
        self.outcomes: list[g.Outcome] = []
        ports = Ports(start_successor=self.start_successor, notifier=self.notifier,
                      control_server=FakeControlServer, wait_until_reaped=self.wait_until_reaped,
                      call_later=lambda seconds, callback, *args: self.timers.append((seconds, callback, args)),
                      pid_file=self.pid_file)
        self.server = FakeServer()
        self.supervisor = Supervisor(g.HandoffMachine(1, PID, ready_timeout), ports, graceful_timeout=5.0)
        self.supervisor.servers = Servers([self.server])

    async def start_successor(self, attempt: int, generation: int) -> FakeSuccessor:
        successor = FakeSuccessor(attempt, SUCCESSOR_PID + len(self.successors))
        self.successors.append(successor)
        return successor

    def wait_until_reaped(self, pid: int) -> bool:
        self.reaped.append(pid)
        return True

    def reload(self) -> None:
        self.supervisor.start_reload("test", self.outcomes.append)

    @property
    def final(self) -> g.Outcome | None:
        finals = [o for o in self.outcomes if o.code != "started"]
        return finals[-1] if finals else None


async def settle() -> None:
    """Let every task the supervisor started run as far as it can."""
    for _ in range(10):
        await asyncio.sleep(0)


async def serving_world() -> World:
    world = World()
    assert await world.supervisor.become_main(handed_over=False)
    assert world.pid_file.pid == PID
    return world


async def reloading_world() -> tuple[World, FakeSuccessor]:
    """A serving world asked to reload, with the one new generation it started."""
    world = await serving_world()
    world.reload()
    await settle()
    [successor] = world.successors
    return world, successor


def test_successor_ready_then_serving_is_a_handover():
    async def scenario():
        world, successor = await reloading_world()
        assert world.outcomes == [g.Outcome("started", f"reloading: starting pid {successor.pid}", successor.pid)]
        await successor.says_ready()
        assert {"MAINPID": successor.pid, "READY": 1}.items() <= world.notifier.sent[-1].items()
        assert successor.told_main
        assert world.pid_file.pid == PID, "PIDFile= names the old main until the successor confirms"
        assert world.server.accepting
        successor.serving.set_result(True)
        await asyncio.wait_for(world.supervisor.finished.wait(), 5)
        assert world.pid_file.pid == successor.pid
        assert world.final == g.Outcome("done", f"generation 2 (pid {successor.pid}) is serving", successor.pid)
        assert not world.server.accepting and world.server.shut_down
        assert successor.closed and not successor.killed
        assert world.supervisor.machine.phase is g.Phase.DRAINING

    asyncio.run(scenario())


def test_successor_dying_before_mainpid_leaves_the_old_main_serving():
    async def scenario():
        world, successor = await reloading_world()
        successor.ready.set_result(g.ChildFailed(successor.attempt, "importing 'app' raised RuntimeError: boom"))
        await settle()
        assert world.final == g.Outcome("failed", "importing 'app' raised RuntimeError: boom", PID)
        assert successor.killed and successor.closed
        assert not any("MAINPID" in fields for fields in world.notifier.sent)
        assert world.notifier.sent[-1]["READY"] == 1
        assert world.notifier.sent[-1]["STATUS"].startswith("reload failed: importing 'app' raised")
        assert world.pid_file.pid == PID and world.reaped == []
        assert world.server.accepting and world.supervisor.machine.phase is g.Phase.SERVING
        world.reload()  # and the next reload may start at once
        await settle()
        assert len(world.successors) == 2

    asyncio.run(scenario())


def test_successor_dying_after_mainpid_is_reaped_then_the_old_main_reclaims():
    async def scenario():
        world, successor = await reloading_world()
        successor.living = False  # dies between saying ready and being told it is main
        await successor.says_ready()
        assert world.notifier.sent[-2]["MAINPID"] == successor.pid
        assert world.reaped == [successor.pid], "systemd must have reaped it before we reclaim MAINPID"
        assert world.notifier.sent[-1]["MAINPID"] == PID and world.notifier.sent[-1]["READY"] == 1
        assert world.final == g.Outcome("failed", f"new generation (pid {successor.pid}) exited during the"
                                                  " handover", PID)
        assert not successor.told_main and successor.closed
        assert world.pid_file.writes == [PID]
        assert world.server.accepting and world.supervisor.machine.phase is g.Phase.SERVING

    asyncio.run(scenario())


def test_successor_exiting_before_it_confirms_serving_fails_the_handover():
    async def scenario():
        world, successor = await reloading_world()
        await successor.says_ready()
        assert successor.told_main
        successor.serving.set_result(False)  # its channel closed and it exited
        await settle()
        assert world.reaped == [successor.pid]
        assert world.final.code == "failed"
        assert world.pid_file.writes == [PID]
        assert world.server.accepting and not world.supervisor.finished.is_set()

    asyncio.run(scenario())


def test_reload_refused_while_starting_and_while_reloading():
    async def scenario():
        world = World()
        world.reload()
        assert world.final == g.Outcome("refused", f"this generation (pid {PID}) is still starting")
        assert world.successors == []
        assert await world.supervisor.become_main(handed_over=False)
        world.reload()
        await settle()  # started: the refusal names it
        world.reload()
        await settle()
        assert len(world.successors) == 1
        assert world.final == g.Outcome("refused", "reload already in progress", world.successors[0].pid)

    asyncio.run(scenario())


def test_ready_timeout_kills_the_successor():
    async def scenario():
        world, successor = await reloading_world()
        [(seconds, fire, args)] = world.timers
        assert seconds == 30.0
        fire(*args)
        assert successor.killed
        assert world.final == g.Outcome("failed", "new generation not ready within 30s (ready timeout)", PID)

    asyncio.run(scenario())


def test_stop_during_a_handover_kills_the_successor_and_removes_our_pid_file():
    async def scenario():
        world, successor = await reloading_world()
        await successor.says_ready()
        world.supervisor.dispatch(g.StopRequested("SIGTERM"))
        await asyncio.wait_for(world.supervisor.finished.wait(), 5)
        assert successor.killed
        assert world.final == g.Outcome("failed", "the service is stopping", PID)
        assert world.pid_file.pid is None

    asyncio.run(scenario())


def test_spawn_failure_is_a_failed_reload():
    async def scenario():
        world = await serving_world()

        async def cannot_fork(attempt, generation):
            raise OSError("Resource temporarily unavailable")

        world.supervisor.ports.start_successor = cannot_fork
        world.reload()
        await settle()
        assert world.final == g.Outcome("failed", "cannot start the new generation: Resource temporarily"
                                                  " unavailable", PID)
        assert world.supervisor.machine.phase is g.Phase.SERVING

    asyncio.run(scenario())


def test_status_adds_what_the_worker_upkeep_reports():
    class Upkeep:
        def status_note(self) -> str:
            return "2 workers recycled (1 max-requests, 1 worker-timeout)"

    async def scenario():
        world = await serving_world()
        assert world.supervisor._serving_status() == f"gen 1 · pid {PID} · serving · 0 in flight · 3 requests"
        world.server.upkeep = Upkeep()
        assert world.supervisor._serving_status() == (f"gen 1 · pid {PID} · serving · 0 in flight · 3 requests"
                                                      " · 2 workers recycled (1 max-requests, 1 worker-timeout)")

    asyncio.run(scenario())
