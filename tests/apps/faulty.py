"""The demo app, with a fault acted out on demand: for tests of failed and slow reloads.

The fault is read at import from the file `fault` next to this module (so a
test picks the fault of the next generation by rewriting that file, then
reloads). Its first word is the fault, an optional second word a number of
seconds:

    ok                      the demo app, nothing wrong
    import-error            raise at import (a broken deploy)
    startup-raises          lifespan startup raises an exception
    startup-failed          lifespan startup reports lifespan.startup.failed (as Starlette does)
    startup-exit            the process exits during lifespan startup (os._exit(3))
    startup-hang            lifespan startup never finishes
    slow-start S            lifespan startup takes S seconds, then all is well
    exit-after-ready S      startup succeeds; the process exits (os._exit(1)) S seconds later
    exit-after-reporting-ready S
                            the new generation tells the old one it is ready, then exits
                            (os._exit(1)) S seconds later, whether or not it has been made main
    successor-dies-during-handover
                            acted out by the generation that hands over: as soon as systemd has
                            processed MAINPID=<new generation>, the new generation is SIGKILLed
                            (checked at the handover, so rewriting the file turns it off)

GET /environ answers `pid:<pid>` and the serving process's environment (`os.environ`, which for a
generation forked rather than exec'd is not what /proc/<pid>/environ shows), NUL-separated.

If the file `fault-invocation` exists, the fault applies only to processes
with that INVOCATION_ID: once systemd restarts the service, it is healthy.
"""

import asyncio
import os
import signal
import time

from graceful_http.demo import app as demo

FAULT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault")
INVOCATION_FILE = FAULT_FILE + "-invocation"


def _read_fault() -> tuple[str, float]:
    try:
        with open(INVOCATION_FILE, encoding="utf-8") as file:
            invocation = file.read().strip()
        if invocation and invocation != os.environ.get("INVOCATION_ID"):
            return "ok", 0.0  # systemd restarted the service since the fault was set: the fault is over
    except FileNotFoundError:
        pass
    try:
        with open(FAULT_FILE, encoding="utf-8") as file:
            words = file.read().split()
    except FileNotFoundError:
        return "ok", 0.0
    if not words:
        return "ok", 0.0
    return words[0], float(words[1]) if len(words) > 1 else 0.0


FAULT, SECONDS = _read_fault()

if FAULT == "import-error":
    raise RuntimeError("deploy went wrong at import")

if FAULT == "exit-after-reporting-ready":
    from graceful_http import handoff

    async def _report_ready_then_exit(self) -> bool:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        await loop.sock_sendall(self.sock, handoff.encode(handoff.READY))
        if SECONDS:
            await asyncio.sleep(SECONDS)
        os._exit(1)

    handoff.SuccessorEnd.report_ready_and_wait_until_main = _report_ready_then_exit

if FAULT == "successor-dies-during-handover":
    from graceful_http import sdnotify

    _send = sdnotify.Notifier.send

    def _send_then_kill_successor(self, **fields):
        sent = _send(self, **fields)
        successor = int(fields.get("MAINPID", 0))
        if successor and successor != os.getpid() and _read_fault()[0] == "successor-dies-during-handover":
            self.barrier()  # systemd has processed MAINPID=<successor>
            os.kill(successor, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _running(successor):
                time.sleep(0.001)
        return sent

    sdnotify.Notifier.send = _send_then_kill_successor


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as file:
            return file.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


async def _startup() -> str | None:
    """Act out the fault; return a failure message to report, or None when startup succeeds."""
    if FAULT == "startup-raises":
        raise RuntimeError("startup went wrong: database unreachable")
    if FAULT == "startup-failed":
        return "startup failed: database unreachable"
    if FAULT == "startup-exit":
        os._exit(3)
    if FAULT == "startup-hang":
        await asyncio.sleep(3600)
    if FAULT == "slow-start":
        await asyncio.sleep(SECONDS)
    if FAULT == "exit-after-ready":
        asyncio.get_running_loop().call_later(SECONDS, os._exit, 1)
    return None


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                failure = await _startup()
                if failure is not None:
                    await send({"type": "lifespan.startup.failed", "message": failure})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http" and scope["path"] == "/environ":  # the serving process's environment, as it is
        body = "\0".join([f"pid:{os.getpid()}", *(f"{name}={value}" for name, value in sorted(os.environ.items()))]).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    await demo(scope, receive, send)
