"""The listening sockets: inherited (systemd or a previous generation) or bound here."""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass

from graceful_http.fdstore import is_connection_name
from graceful_http.listenfds import LISTEN_FDS_START, LISTEN_VARIABLES, passed_fd_count
from graceful_http.settings import BindAddress

OWN_SOCKET_NAME = "http"
CONTROL_SOCKET_NAME = "control"  # a passed socket by this name serves only the control endpoints


class ListenerError(OSError):
    """A socket we were given or asked to bind cannot be used; the message says which."""


@dataclass
class Listener:
    sock: socket.socket
    name: str
    inherited: bool

    def describe(self) -> str:
        address = self.sock.getsockname()
        if self.sock.family == socket.AF_UNIX:
            text = f"unix:{address.decode() if isinstance(address, bytes) else address}"
        elif self.sock.family == socket.AF_INET6:
            text = f"[{address[0]}]:{address[1]}"
        else:
            text = f"{address[0]}:{address[1]}"
        return f"{text} ({self.name}, {'inherited' if self.inherited else 'bound here'})"


class Acquired(list):
    """The listeners, and the connections systemd's fd store handed back with them (see `fdstore`)."""

    def __init__(self, listeners=(), restored: list[tuple[str, socket.socket | None]] | None = None):
        super().__init__(listeners)
        self.restored = restored or []


def acquire(binds: tuple[BindAddress, ...], environ=os.environ, backlog: int = 2048) -> Acquired:
    """Sockets passed with LISTEN_FDS if any (the bind addresses are then unused), else bound."""
    if passed_fd_count(environ, os.getpid()):
        return inherited(environ)
    return Acquired(bind(address, backlog) for address in binds)


def inherited(environ) -> Acquired:
    from systemd import daemon

    expected = passed_fd_count(environ, os.getpid())
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + expected):
        try:
            os.fstat(fd)
        except OSError:  # systemd-python would raise a bare EBADF
            raise ListenerError(f"LISTEN_FDS={expected} but fd {fd} is not open") from None
    passed = daemon.listen_fds_with_names(unset_environment=True)
    for variable in LISTEN_VARIABLES:
        environ.pop(variable, None)  # a new generation gets them fresh
    listeners = Acquired()
    for fd, name in sorted(passed.items()):
        if is_connection_name(name):  # a keep-alive connection we stored before a restart: adopted, not listened on
            os.set_inheritable(fd, False)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)  # not what we store: it goes, and its entry with it
                listeners.restored.append((name, None))
                continue
            listeners.restored.append((name, socket.socket(fileno=fd)))
            continue
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ListenerError(f"fd {fd} ({name}) passed in LISTEN_FDS is not a socket")
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            raise ListenerError(f"fd {fd} ({name}) is not a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenerError(f"fd {fd} ({name}) is not a listening socket")
        os.set_inheritable(fd, False)
        listeners.append(Listener(sock, name or OWN_SOCKET_NAME, inherited=True))
    return listeners


def bind(address: BindAddress, backlog: int = 2048) -> Listener:
    try:
        if address.is_unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if os.path.exists(address.path) and stat.S_ISSOCK(os.stat(address.path).st_mode):
                os.unlink(address.path)  # a stale socket from an earlier run
            sock.bind(address.path)
        else:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            family, kind, proto, _, sockaddr = infos[0]
            # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose
            # protocol is TCP, and without it every response waits for a delayed ACK.
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        raise ListenerError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return Listener(sock, OWN_SOCKET_NAME, inherited=False)
