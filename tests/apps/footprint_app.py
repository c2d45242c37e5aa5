"""An app with a memory footprint of its own in every process that loads it (as a big app's imports, models
and caches have): FOOTPRINT_MB ($FOOTPRINT_MB, default 40) of private memory, touched. Answers `pid:<pid> path:<path>`.

For failure tests: each start counts itself in the file $FOOTPRINT_STARTS_FILE (if set), and the starts
listed in $FOOTPRINT_FAIL_STARTS (e.g. "6,7"), or in the file `fail-starts` beside this one, fail at import,
as new code that cannot start in some process would. The starts listed in $FOOTPRINT_HOLD_STARTS wait at import
until someone writes to the FIFO $FOOTPRINT_RELEASE_FIFO (a slow start the test ends when it wants).
FAIL_PERCENT of requests (by a counter, so exactly that share) answer 500.
"""

import fcntl
import os

FOOTPRINT_MB = int(os.environ.get("FOOTPRINT_MB", "40"))
FAIL_PERCENT = 0


def _count_start() -> int:
    path = os.environ.get("FOOTPRINT_STARTS_FILE")
    if not path:
        return 0
    with open(path, "a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        number = len(file.read().split()) + 1
        file.write(f"{os.getpid()}\n")
    return number


def _failing_starts() -> set[str]:
    listed = os.environ.get("FOOTPRINT_FAIL_STARTS", "")
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fail-starts")) as file:
            listed += "," + file.read().strip()
    except OSError:
        pass
    return set(listed.split(",")) - {""}


_start = _count_start()
if str(_start) in _failing_starts():
    raise RuntimeError(f"start {_start} fails, as asked")

if str(_start) in os.environ.get("FOOTPRINT_HOLD_STARTS", "").split(","):
    with open(os.environ["FOOTPRINT_RELEASE_FIFO"]) as release:
        release.read()

_ballast = bytes(range(256)) * (FOOTPRINT_MB * 4096)  # FOOTPRINT_MB MiB, every page written
_served = 0


async def app(scope, receive, send):
    global _served
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    _served += 1
    failing = FAIL_PERCENT * _served // 100 != FAIL_PERCENT * (_served - 1) // 100  # evenly spread
    answer = f"pid:{os.getpid()} path:{scope['path']}".encode()
    await send({"type": "http.response.start", "status": 500 if failing else 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})
