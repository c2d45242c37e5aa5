"""The local control socket that `graceful-http reload` talks to.

Each main process listens on an abstract unix socket named after its pid
(`wire.control_address`). Only root and the service's own user may use it
(checked with SO_PEERCRED). The lines it speaks are in `wire`.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from graceful_http.wire import FINAL_CODES, RELOAD, Outcome, control_address, encode_outcome, peer_credentials


class ControlServer:
    """Serves `reload` requests; `start_reload(source, on_outcome)` is the supervisor's."""

    def __init__(self, start_reload: Callable[[str, Callable[[Outcome], None]], None]):
        self.start_reload = start_reload
        self.server: asyncio.AbstractServer | None = None

    async def start(self, pid: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(control_address(pid))
        self.server = await asyncio.start_unix_server(self._serve, sock=sock)

    def sockets(self) -> list:
        """Its listening socket(s), for a process forked from ours to close."""
        return list(self.server.sockets) if self.server is not None else []

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            uid = peer_credentials(sock)[1]
            if uid not in (0, os.getuid()):
                writer.write(encode_outcome(Outcome("refused", f"uid {uid} may not control this service")))
                return
            request = (await asyncio.wait_for(reader.readline(), 10)).decode(errors="replace").strip()
            word, _, option = request.partition(" ")
            canary = option.partition("=")[2] if option.startswith("canary=") else None
            if word != RELOAD or (option and not _is_seconds(canary)):
                writer.write(encode_outcome(Outcome("refused", f"unknown request {request[:40]!r}")))
                return
            finished = asyncio.get_running_loop().create_future()

            def on_outcome(outcome: Outcome) -> None:
                if not writer.is_closing():
                    writer.write(encode_outcome(outcome))
                if outcome.code in FINAL_CODES and not finished.done():
                    finished.set_result(None)

            if canary is None:
                self.start_reload("graceful-http reload", on_outcome)
            else:
                self.start_reload("graceful-http reload", on_outcome, canary=float(canary))
            await finished
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            try:
                await writer.drain()
            except OSError:
                pass
            writer.close()


def _is_seconds(text: str | None) -> bool:
    try:
        return text is not None and 0 <= float(text) < 1e6
    except ValueError:
        return False
