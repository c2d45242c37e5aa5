"""Real reverse proxies in front of the service: Debian's nginx and HAProxy, each in a directory of its own.

One nginx configuration shape (proxy_pass over HTTP/1.1 with `Connection ""`, as nginx's documentation
sets up upstream keep-alive) and one HAProxy shape (its documentation's first example), shared by the
tests and the benchmark, so what is measured is what is tested.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

NGINX = "/usr/sbin/nginx"
HAPROXY = "/usr/sbin/haproxy"

_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{blocks}
}}
"""

_NGINX_SERVER = """\
    server {{
        listen {listen};
        location / {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {headers}
        }}
    }}
"""

_HAPROXY_GLOBAL = """\
global
    pidfile {dir}/haproxy.pid
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""


def nginx_upstream(name: str, server: str, keepalive: int) -> str:
    """An upstream block keeping up to `keepalive` idle connections to `server` (nginx's default: none)."""
    return f"    upstream {name} {{ server {server}; keepalive {keepalive}; }}\n"


def nginx_site(listen: str, upstream: str, headers: str = "") -> str:
    """A server block relaying everything to `upstream` (a URL: http://host:port, http://unix:/path:, …)."""
    return _NGINX_SERVER.format(listen=listen, upstream=upstream, headers=headers)


def haproxy_frontend(name: str, bind: str, backend: str, options: str = "") -> str:
    return f"frontend {name}\n    bind {bind}\n{options and f'    {options}' + chr(10)}    default_backend {backend}\n"


def haproxy_backend(name: str, *servers: str) -> str:
    lines = "".join(f"    server {name}{i} {server}\n" for i, server in enumerate(servers, 1))
    return f"backend {name}\n{lines}"


def require(*programs: str) -> None:
    """A proxy the tests need and the machine lacks is a loud failure, never a skip."""
    for program in programs:
        if not os.access(program, os.X_OK):
            raise AssertionError(f"{program} is missing: apt-get install nginx haproxy (tests/run installs them)")


@contextlib.contextmanager
def nginx(directory: Path, *blocks: str, wait_for: tuple[str, int] | None = None) -> Iterator[subprocess.Popen]:
    """nginx with these upstream/server blocks; started once `wait_for` (host, port) accepts connections."""
    require(NGINX)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "nginx.conf").write_text(_NGINX_CONF.format(dir=directory, blocks="".join(blocks)))
    with _running([NGINX, "-c", str(directory / "nginx.conf"), "-p", str(directory)], directory / "nginx.out",
                  wait_for) as process:
        yield process


@contextlib.contextmanager
def haproxy(directory: Path, *sections: str, wait_for: tuple[str, int] | None = None) -> Iterator[subprocess.Popen]:
    """HAProxy with these frontend/backend sections after the usual defaults."""
    require(HAPROXY)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "haproxy.cfg").write_text(_HAPROXY_GLOBAL.format(dir=directory) + "".join(sections))
    with _running([HAPROXY, "-db", "-f", str(directory / "haproxy.cfg")], directory / "haproxy.out",
                  wait_for) as process:
        yield process


@contextlib.contextmanager
def _running(argv: list[str], log: Path, wait_for: tuple[str, int] | None) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        if wait_for is not None:
            _wait_listening(process, wait_for, log)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_listening(process: subprocess.Popen, address: tuple[str, int], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{Path(process.args[0]).name} exited: {log.read_text(errors='replace')[-500:]}")
        try:
            socket.create_connection(address, timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"{Path(process.args[0]).name} is not listening on {address} after 20 s")
