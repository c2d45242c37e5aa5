"""Instructions per request: plain uvicorn's HTTP protocol beside graceful-http's, counted by valgrind.

CPU time per request moves with whatever else the machine runs; the instructions one request costs do not.
Each stack runs in a process of its own under `valgrind --tool=callgrind`, built the way its server builds it
(plain uvicorn: `uvicorn.Config` and `Server.startup` with the options `bench/run` starts it with;
graceful-http: `cli.serve_settings` from `bench/run`'s command line, `serving.build_engines`, `Engine.start`),
with the same app (bench/app.py), httptools and uvloop, the access log off. One connection made by the
server's own protocol factory receives wrk's request, one chunk at a time, over a stand-in transport that
only counts what is written (so the kernel's reads and writes, the same for both, are left out), and the
event loop runs each request's task to its end. After a warm-up, callgrind counts exactly `requests` requests
(between two calls of a marker function, `getppid`, where it dumps its counters): their instructions ÷
`requests`, everything the process ran for them, the driver's few hundred instructions per request included.
The servers' periodic tasks (uvicorn's tick, graceful-http's once-a-second sweep and descriptor watch) cost per
second, not per request: they are left out (counted, they made graceful-http's figure vary by up to 200 from run
to run with how long valgrind took, i.e. with the machine's load).

    python -m bench.instructions [--requests N] [--warmup N] [--annotate] [--keep DIR]
    (or `bench/run --only instructions --no-systemd`, which writes its table row and target)
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.servers import APP, REPO, SERVICE_DIR, BenchError
from harness.processes import free_port

STACKS = ("uvicorn", "graceful-http")
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"  # what wrk sends
MARKER = "getppid"  # the libc function callgrind dumps its counters before (os.getppid): nothing else calls it


class StandInTransport(asyncio.Transport):
    """A connected TCP transport from 127.0.0.1 that counts what is written instead of sending it."""

    def __init__(self):
        super().__init__()
        self.protocol = None
        self.written = 0
        self.writes = 0
        self.closing = False
        self.extra = {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}

    def get_extra_info(self, name, default=None):
        return self.extra.get(name, default)

    def write(self, data):
        self.written += len(data)
        self.writes += 1

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True

    def abort(self):
        self.closing = True

    def get_protocol(self):
        return self.protocol

    def set_protocol(self, protocol):
        self.protocol = protocol

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_reading(self):
        return True

    def get_write_buffer_size(self):
        return 0


async def uvicorn_server():
    """What `uvicorn bench.app:app --http httptools --loop uvloop --no-access-log --log-level warning` serves with."""
    import socket

    import uvicorn

    config = uvicorn.Config(APP, http="httptools", loop="uvloop", access_log=False, log_level="warning")
    server = uvicorn.Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[socket.create_server(("127.0.0.1", 0))])
    await server.on_tick(0)  # the first tick sets the Date and Server headers
    return server


async def graceful_http_server():
    """What `graceful-http serve bench.app:app --no-access-log --bind 127.0.0.1:PORT` serves with (workers=1)."""
    from graceful_http import cli, logs
    from graceful_http.control import ControlState
    from graceful_http.listeners import acquire
    from graceful_http.serving import build_engines

    settings = cli.serve_settings(cli.build_parser().parse_args(
        ["serve", APP, "--no-access-log", "--bind", f"127.0.0.1:{free_port()}", "--workers", "1"]))
    logs.setup(1, settings.log_level)
    listeners = acquire(settings.binds, backlog=settings.backlog)
    engine = build_engines(settings, listeners, ControlState(request_reload=lambda who: None))[0]
    await engine.start()
    await asyncio.sleep(0)  # its ticker's first turn sets the Date and Server headers, then waits a second
    engine._ticker.cancel()  # per second, not per request: left out (see above)
    engine.descriptors.stop()  # its descriptor watch wakes once a second too
    return engine.server


def connect(server) -> tuple[asyncio.Protocol, StandInTransport]:
    """A connection as the server's protocol factory makes it (`Server.startup`'s `create_protocol`)."""
    config = server.config
    arguments = {"config": config, "server_state": server.server_state}
    uvicorns = next(k for k in config.http_protocol_class.__mro__ if k.__module__.startswith("uvicorn.protocols"))
    if "app_state" in inspect.signature(uvicorns.__init__).parameters:  # newer uvicorn
        arguments["app_state"] = server.lifespan.state
    protocol = config.http_protocol_class(**arguments)
    transport = StandInTransport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    return protocol, transport


async def serve(protocol, count: int) -> None:
    for _ in range(count):
        protocol.data_received(REQUEST)
        await asyncio.sleep(0)  # the request's task runs to its end (the app never waits)


async def run_stack(stack: str, requests: int, warmup: int) -> None:
    server = await (uvicorn_server() if stack == "uvicorn" else graceful_http_server())
    protocol, transport = connect(server)
    await serve(protocol, warmup)
    per_response = transport.written / warmup
    os.getppid()  # callgrind: dump (startup and warm-up)
    await serve(protocol, requests)
    os.getppid()  # callgrind: dump (the measured requests)
    served = server.server_state.total_requests
    await server.lifespan.shutdown()
    if served != warmup + requests or transport.written != per_response * served or transport.closing:
        raise SystemExit(f"{stack}: {served} responses of {warmup + requests} requests, {transport.written} bytes"
                         f" written (a response is {per_response:g}), closed: {transport.closing}")
    print(f"{stack}: {served} requests served, {per_response:g} bytes per response")


def count(stack: str, requests: int, warmup: int, workdir: Path, python: str = sys.executable) -> dict:
    """Run one stack under callgrind: its instructions per request over `requests` after `warmup`."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise BenchError("valgrind is not installed (bench/run installs it: apt-get install valgrind)")
    out = workdir / f"callgrind.{stack}"
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join([str(SERVICE_DIR), str(REPO)])}
    result = subprocess.run([valgrind, "--tool=callgrind", f"--dump-before={MARKER}", f"--callgrind-out-file={out}",
                             python, "-m", "bench.instructions", "--serve", stack, "--requests", str(requests),
                             "--warmup", str(warmup)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise BenchError(f"callgrind run of {stack} exited {result.returncode}: {result.stderr[-2000:]}")
    measured = out.with_name(out.name + ".2")  # .1: startup and warm-up; .2: the requests; then the exit's
    match = re.search(r"^totals: (\d+)", measured.read_text(), re.MULTILINE) if measured.exists() else None
    if match is None:
        raise BenchError(f"callgrind wrote no counts for {stack}'s requests ({measured}): {result.stderr[-2000:]}")
    return {"instructions": int(match.group(1)), "per_request": round(int(match.group(1)) / requests),
            "profile": str(measured)}


def instructions_section(requests: int, warmup: int, raw: Path, say) -> dict:
    """Both stacks, counted at once (one valgrind each): instructions per request and their ratio."""
    workdir = raw / "callgrind"
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"instructions: uvicorn and graceful-http under callgrind, {requests} requests after {warmup}")
    with ThreadPoolExecutor(len(STACKS)) as pool:
        counted = dict(zip(STACKS, pool.map(lambda stack: count(stack, requests, warmup, workdir), STACKS)))
    ours, theirs = counted["graceful-http"]["per_request"], counted["uvicorn"]["per_request"]
    row = {"requests": requests, "warmup": warmup, "uvicorn": theirs, "graceful-http": ours,
           "ratio": round(ours / theirs, 4), "profiles": {stack: c["profile"] for stack, c in counted.items()}}
    say(f"instructions: uvicorn {theirs:,} per request, graceful-http {ours:,} ({row['ratio']:.3f}×)")
    return row


def annotate(profile: str, lines: int = 60) -> list[str]:
    """callgrind_annotate's costliest functions of a stack (C functions: Python code shows as the interpreter's)."""
    return subprocess.run(["callgrind_annotate", "--threshold=99", profile], capture_output=True, text=True,
                          check=True).stdout.splitlines()[:lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests counted (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="requests before counting (default 200)")
    parser.add_argument("--annotate", action="store_true", help="print each stack's costliest functions too")
    parser.add_argument("--keep", help="keep the callgrind profiles in this directory (for callgrind_annotate)")
    parser.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)  # the process callgrind watches
    args = parser.parse_args(argv)
    if args.serve:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(run_stack(args.serve, args.requests, args.warmup))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        row = instructions_section(args.requests, args.warmup, Path(args.keep or tmp),
                                   lambda m: print(m, file=sys.stderr))
        if args.annotate:
            for stack in STACKS:
                print(f"--- {stack} ---", *annotate(row["profiles"][stack]), sep="\n")
    print(f"uvicorn {row['uvicorn']:,} instructions per request, graceful-http {row['graceful-http']:,}: "
          f"{row['ratio']:.3f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
