"""A new generation starts at the lowest CPU priority and gets the old one's back once it is ready.

A new generation's start (an interpreter, the imports of uvicorn and the app,
with workers a fork) costs a few hundred ms of CPU, all of it while the old
generation serves: on a machine whose CPUs the traffic keeps busy, the two
compete and the requests of that second wait. At nice 19 the start takes what
the serving processes leave, and once the new generation says it is ready the
old main gives the whole of it (its process group: every thread of its main
and workers) the old main's own nice value back; a start that is starved for
`RESTORE_AFTER` gets it back then, so a saturated machine delays a reload
instead of failing it on the ready timeout.

Raising a priority again needs CAP_SYS_NICE or an RLIMIT_NICE that allows it
(systemd's `LimitNICE=`), and a sandbox may forbid `setpriority` altogether
(the shipped unit's `SystemCallFilter=~@resources`): where the old main could
not give the priority back, it does not lower it, and the new generation
starts at the same priority as before.
"""

from __future__ import annotations

import functools
import logging
import os
import resource

log = logging.getLogger("graceful_http")

START_NICE = 0  # off: see `--start-nice` in the README for why
RESTORE_AFTER = 5.0  # seconds
CAP_SYS_NICE = 23  # bit in /proc/<pid>/status CapEff


def may_raise_to(nice: int, effective_caps: int, rlimit_nice: int) -> bool:
    """May a process with these capabilities and RLIMIT_NICE (soft) lower a nice value to `nice`?

    The kernel allows it with CAP_SYS_NICE, or when 20 - nice ≤ RLIMIT_NICE.
    """
    if effective_caps >> CAP_SYS_NICE & 1:
        return True
    return rlimit_nice == resource.RLIM_INFINITY or 20 - nice <= rlimit_nice


def start_nice(wanted: int = START_NICE) -> tuple[int, int] | None:
    """(nice to start a new generation at, nice to give it back once ready), or None: start it as we run."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current >= wanted or not may_raise_to(current, _effective_caps(), resource.getrlimit(resource.RLIMIT_NICE)[0]):
        return None
    try:
        os.setpriority(os.PRIO_PROCESS, 0, current)  # a system-call filter answers this one too
    except OSError:
        return None
    return wanted, current


def lower(nice: int) -> None:  # pragma: no cover - runs in the forked child, before exec
    """In the new generation's process, before exec: start at `nice` (what it forks and starts inherits it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        pass  # it starts at our priority: slower requests meanwhile, nothing worse


def restore(group: int, nice: int) -> None:
    """Give every process (and thread) of the new generation, which leads process group `group`, `nice` back."""
    try:
        os.setpriority(os.PRIO_PGRP, group, nice)
    except ProcessLookupError:
        pass  # it is gone (failed, killed): nothing to restore
    except OSError as exc:
        log.warning("cannot give the new generation (pid %d) its CPU priority back (nice %d): %s", group, nice, exc)


def _effective_caps() -> int:
    try:
        return int(_status_field("CapEff") or "0", 16)
    except ValueError:
        return 0


def _status_field(name: str) -> str | None:
    """A field of /proc/self/status ("CapEff", "Seccomp"), None if it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key == name:
                    return value.strip()
    except OSError:
        pass
    return None


# -- An idle start: SCHED_IDLE until ready (on by default, where the new generation can leave it again)
#
# What a reload costs the serving processes on busy CPUs is less the new generation's CPU time (about 10 ms
# with a standby) than where the scheduler puts things meanwhile: a CPU busy with the start looks taken, so the
# next wake-up of whatever ran there (a client on the same machine, a worker) lands on a serving process's CPU,
# and the two then preempt each other every few microseconds until the start is over (a scheduler trace of a
# reload under load showed the serving main run in 10 µs slices for 30 ms). A nice value does not change that
# (and weighs nothing between sessions, each its own autogroup); SCHED_IDLE does: a CPU running only idle-class
# work counts as free for wake-ups, and any other task preempts it at once. So the standby, the forks that
# start a generation (their page-table copies and the intermediate process's exit: about 3 ms of CPU each, which
# matter: an idle new generation alone did not help) and the new generation's start run SCHED_IDLE; its
# processes each take SCHED_OTHER back (every thread) just before they say they are ready, and anything exec'd
# instead (other code) gets it back before exec. Between sessions (autogroups) an idle task still gets its
# group's share; within one CPU cgroup (a container, a unit with CPUWeight=) busy CPUs leave it next to
# nothing: after RESTORE_AFTER the old main takes the whole start out of SCHED_IDLE (slower, never failed).


_started_idle = False  # set where start_idle took effect; inherited by what this process forks


@functools.cache
def idle_start_allowed() -> bool:
    """May a new generation start at SCHED_IDLE here? Only where it can take SCHED_OTHER back once ready: the
    kernel treats that as raising nice to ours (CAP_SYS_NICE, or an RLIMIT_NICE that allows it: systemd's
    `LimitNICE=`), a system-call filter lets sched_setscheduler through, and we run SCHED_OTHER (a policy the
    admin chose, such as SCHED_BATCH, is left alone). Asked once per process, before the standby is forked."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    if not may_raise_to(os.getpriority(os.PRIO_PROCESS, 0), _effective_caps(),
                        resource.getrlimit(resource.RLIMIT_NICE)[0]):
        return False
    return _policy_calls_pass()


def _policy_calls_pass() -> bool:
    """Do sched_getscheduler and sched_setscheduler pass, and do we run SCHED_OTHER? Under a system-call filter,
    tried in a child: a unit that filters them without `SystemCallErrorNumber=` answers with SIGSYS, which
    must not be ours."""
    if _status_field("Seccomp") == "0":
        return _policy_calls_pass_here()
    try:
        pid = os.fork()
    except OSError:
        return False
    if pid == 0:  # pragma: no cover - the probe
        code = 1
        try:
            code = 0 if _policy_calls_pass_here() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _policy_calls_pass_here() -> bool:
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return False
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # changes nothing
    except OSError:
        return False
    return True


def start_idle() -> None:  # pragma: no cover - runs in a forked child (the standby, a generation's first fork)
    """Run SCHED_IDLE from now on, as will everything this process forks (where idle_start_allowed())."""
    global _started_idle
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        return  # it starts at our priority, as before
    _started_idle = True


def leave_idle_start() -> bool:
    """Take SCHED_OTHER back for every thread of this process that runs SCHED_IDLE (a thread's policy is its
    own, and threads started meanwhile inherited it); True if this process started idle. Called where a
    process of a new generation is about to serve; in any other, no system call at all."""
    global _started_idle
    if not _started_idle:
        return False
    _started_idle = False  # what this process forks from now on starts at SCHED_OTHER
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            _leave_idle(tid)
        except OSError as exc:
            log.warning("serving at idle CPU priority: cannot leave SCHED_IDLE (thread %d): %s", tid, exc)
    return True


def _leave_idle(tid: int) -> bool:
    """SCHED_OTHER for thread `tid` if it runs SCHED_IDLE: True if it did. A thread that ended meanwhile is
    none; OSError if the kernel refuses."""
    try:
        if os.sched_getscheduler(tid) != os.SCHED_IDLE:
            return False
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    except ProcessLookupError:
        return False
    return True


def leave_idle_start_of(group: int | None, ancestor: int) -> None:
    """The old main's side, for a new generation still starting after RESTORE_AFTER (busy CPUs leave SCHED_IDLE
    next to nothing): SCHED_OTHER for every idle thread of every process of process group `group` (the new
    generation leads one: its main, workers, standby) or descended from `ancestor` (us: the standby, the
    intermediate process of the double fork, the new generation until its parent is gone). Allowed as for
    the process itself: same user, and the kernel's nice rule."""
    processes: dict[int, tuple[int, int]] = {}  # pid: (parent, process group)
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
                processes[int(name)] = (int(fields[1]), int(fields[2]))
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    chosen = {pid for pid, (_, pgrp) in processes.items() if pgrp == group}
    parents = {ancestor}
    while parents:
        parents = {pid for pid, (parent, _) in processes.items() if parent in parents and pid not in chosen}
        chosen |= parents
    moved = 0
    for pid in chosen:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                moved += _leave_idle(int(tid))
            except OSError as exc:
                log.warning("cannot take the new generation's start out of SCHED_IDLE (pid %d): %s", pid, exc)
                return
    if moved:
        log.info("the new generation was still starting after %gs at idle CPU priority: it goes on at ours",
                 RESTORE_AFTER)
