"""The line protocols between graceful-http's processes, and the reload `Outcome` they carry.

Three channels, one framing: a line is a word and an optional detail,
`word detail\\n`, the detail put on one line whatever it held.

- handoff channel, a new generation → the main it replaces: `ready` (`ready adopts`
  if it takes over the old generation's connections), `failed <reason>`; back: `main`
  (systemd has been told), then → `serving`. A worker-by-worker rollout (see `rollout`): `ready adopts
  rollout`, `main rollout` if the old main agrees; then, after `serving`, → `retire <k>` (new worker k is
  ready), back: `retired <pid> <old workers left>` once that old worker exited; → `rolled` at the end.
  A canary (see `canary`): after `ready`, back: `canary`; then → `counts <requests> <failed>` a few times a
  second until `main`, or `rejected <why>` (then the new generation drains and exits).
- worker channel, a worker → its main: `ready`, `failed <reason>`,
  `stats <in flight> <total> <adopted> <failed>`, `reload <source>`,
  `drained <answered> <cut> <handed over> <fell back>`; back: `outcome <code> <pid> <detail>`,
  `drain <pid>` (hand the connections over to that generation's main, and drain), `ping` (answered with
  `pong` by the worker's event loop: it runs).
- control socket, `graceful-http reload` → a main: `reload`; back: lines
  `<code> <pid> <detail>`, `started` ones, then one of FINAL_CODES.

Standard library only, no asyncio: `graceful-http reload` imports it, and its
start-up time is part of every `systemctl reload`.
"""

from __future__ import annotations

import _socket  # not `socket`: see the docstring's last paragraph
import os
import struct
from collections import namedtuple

READY, FAILED, MAIN, SERVING = "ready", "failed", "main", "serving"
STATS, RELOAD, DRAINED, OUTCOME = "stats", "reload", "drained", "outcome"
ADOPTS = "adopts"  # after `ready`: the new generation takes over the old one's keep-alive connections
ROLLOUT, RETIRE, RETIRED, ROLLED = "rollout", "retire", "retired", "rolled"  # worker-by-worker handoff
CANARY, COUNTS, REJECTED = "canary", "counts", "rejected"  # the old main judges the new generation's first worker
DRAIN = "drain"  # main → worker: hand your connections over to the generation whose main is <pid>, and drain
PING, PONG = "ping", "pong"  # main → worker, and its event loop's answer (see `heartbeat`)
FINAL_CODES = ("done", "failed", "refused")


class Outcome(namedtuple("Outcome", "code detail pid", defaults=(None,))):
    """What a reload requester is told. `code`: started, done, failed or refused; `pid`: int or None.

    A named tuple, not a dataclass: `dataclasses` imports `inspect`, 9 ms of every `systemctl reload`."""

    __slots__ = ()


def encode(word: str, detail: str = "") -> bytes:
    detail = " ".join(detail.split())  # one line, whatever the exception said
    return (f"{word} {detail}".rstrip() + "\n").encode()


def decode(line: bytes | str) -> tuple[str, str]:
    """(word, detail) of one line."""
    if isinstance(line, bytes):
        line = line.decode(errors="replace")
    word, _, detail = line.strip().partition(" ")
    return word, detail


def outcome_text(outcome: Outcome) -> str:
    return f"{outcome.code} {outcome.pid or 0} {outcome.detail}"


def parse_outcome(text: str) -> Outcome:
    """The inverse of `outcome_text` (a pid that is not a number reads as None)."""
    code, _, rest = text.strip().partition(" ")
    pid_text, _, detail = rest.partition(" ")
    return Outcome(code, detail, int(pid_text) if pid_text.isascii() and pid_text.isdigit() else None)


def encode_outcome(outcome: Outcome) -> bytes:
    """A control socket's answer line."""
    return encode(outcome.code, outcome_text(outcome).partition(" ")[2])


def control_address(pid: int) -> bytes:
    """The abstract unix socket a main listens on for `graceful-http reload`, named after its pid (and pid
    namespace), so ExecReload= finds it from $MAINPID alone, with nothing on disk to clean up."""
    namespace = os.stat("/proc/self/ns/pid").st_ino
    return f"\0graceful-http/{namespace}/{pid}".encode()


def peer_credentials(sock: _socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)
