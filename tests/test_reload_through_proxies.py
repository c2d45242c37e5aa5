"""Nobody outside can trigger a reload through a same-host reverse proxy; local admins still can.

The outside is real: the client runs in its own network namespace, joined to
this host by a veth pair, so the proxies (Debian's nginx and HAProxy) see it
at a non-loopback address, and graceful-http sees every proxied request come
from 127.0.0.1 (or over a unix socket), as on a real host. graceful-http runs
as a user starts it (`serve`, no token, no --control-allow), with 1 and 2
workers, on both engines.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
from pathlib import Path

import pytest

from harness import proxies
from harness.processes import free_port
from support.load import pid_of
from support.serve_process import ENGINES, HOST, ServeProcess, installed_engine, wait_until

CURL = "/usr/bin/curl"
TOKEN = "proxied-token-for-the-tests-0123456789"

# The headers a client may send itself to pass for a local one.
SPOOFS = {
    "no header": [],
    "X-Forwarded-For: 127.0.0.1": ["X-Forwarded-For: 127.0.0.1"],
    "X-Real-IP: 127.0.0.1": ["X-Real-IP: 127.0.0.1"],
    "Forwarded: for=127.0.0.1": ["Forwarded: for=127.0.0.1"],
    "all of them": ["X-Forwarded-For: 127.0.0.1", "X-Real-IP: 127.0.0.1", "Forwarded: for=127.0.0.1"],
}

# nginx as people set it up: proxy_pass alone, and with each of the usual forwarding headers.
NGINX_SITES = {
    "nginx proxy_pass": "",
    "nginx X-Forwarded-For": "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    "nginx X-Real-IP": "proxy_set_header X-Real-IP $remote_addr;",
    "nginx Forwarded": 'proxy_set_header Forwarded "for=$remote_addr";',
}

class Outside:
    """A network namespace with one address, `client`, that reaches this host at `host` over a veth pair."""

    def __init__(self):
        tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
        self.namespace = f"ghttp-outside-{tag}"
        self.veth = f"ghv{tag}"
        subnet = random.randrange(1, 250)
        self.host, self.client = f"10.231.{subnet}.1", f"10.231.{subnet}.2"

    def __enter__(self) -> "Outside":
        ns, veth = self.namespace, self.veth
        for command in (["netns", "add", ns],
                        ["link", "add", f"{veth}h", "type", "veth", "peer", "name", f"{veth}n"],
                        ["link", "set", f"{veth}n", "netns", ns],
                        ["addr", "add", f"{self.host}/30", "dev", f"{veth}h"],
                        ["link", "set", f"{veth}h", "up"],
                        ["-n", ns, "addr", "add", f"{self.client}/30", "dev", f"{veth}n"],
                        ["-n", ns, "link", "set", f"{veth}n", "up"],
                        ["-n", ns, "link", "set", "lo", "up"]):
            result = subprocess.run(["ip", *command], capture_output=True, text=True)
            if result.returncode != 0:
                self.__exit__()
                pytest.fail(f"cannot make the outside network (`ip {' '.join(command)}`): {result.stderr.strip()}")
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "link", "del", f"{self.veth}h"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)

    def curl(self, url: str, *headers: str, method: str = "POST") -> tuple[int, str]:
        """A request from the outside client with curl: (status, body); (0, curl's error) when it got no answer
        (e.g. a proxy not listening yet)."""
        command = ["ip", "netns", "exec", self.namespace, CURL, "-sS", "-m", "10", "-X", method,
                   "-o", "-", "-w", "\n%{http_code}", url]
        for header in headers:
            command += ["-H", header]
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
        if result.returncode != 0:
            return 0, f"{' '.join(command)}: {result.stderr.strip()}"
        body, _, status = result.stdout.rpartition("\n")
        return int(status), body


@pytest.fixture(scope="module")
def outside():
    for program in (proxies.NGINX, proxies.HAPROXY, CURL):
        if not os.access(program, os.X_OK):
            pytest.fail(f"{program} is missing: tests/run installs it")
    with Outside() as network:
        yield network


@contextlib.contextmanager
def proxies_in_front(directory: Path, outside: Outside, upstream_port: int, upstream_unix: Path):
    """nginx and HAProxy on the outside-facing address; yields {configuration name: URL of /graceful}."""
    urls, servers = {}, []
    for name, headers in NGINX_SITES.items():
        port = free_port(outside.host)
        servers.append(proxies.nginx_site(f"{outside.host}:{port}", f"http://{HOST}:{upstream_port}", headers))
        urls[name] = f"http://{outside.host}:{port}/graceful"
    port = free_port(outside.host)
    servers.append(proxies.nginx_site(f"{outside.host}:{port}", f"http://unix:{upstream_unix}:",
                                      NGINX_SITES["nginx X-Forwarded-For"]))
    urls["nginx to a unix socket"] = f"http://{outside.host}:{port}/graceful"
    plain, forwardfor = free_port(outside.host), free_port(outside.host)
    urls["haproxy"] = f"http://{outside.host}:{plain}/graceful"
    urls["haproxy option forwardfor"] = f"http://{outside.host}:{forwardfor}/graceful"

    haproxy_sections = (proxies.haproxy_frontend("plain", f"{outside.host}:{plain}", "app"),
                        proxies.haproxy_frontend("forwardfor", f"{outside.host}:{forwardfor}", "app",
                                                 options="option forwardfor"),
                        proxies.haproxy_backend("app", f"127.0.0.1:{upstream_port}"))
    with proxies.nginx(directory / "nginx", *servers), proxies.haproxy(directory / "haproxy", *haproxy_sections):
        for name, url in urls.items():  # every proxy relays, to graceful-http
            wait_until(lambda url=url: outside.curl(url.replace("/graceful", "/"), method="GET")[0] == 200, 20,
                       f"{name} to relay GET /")
        yield urls


def children_of(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return {int(child) for child in file.read().split()}


@pytest.fixture(params=list(ENGINES))
def engine(request) -> str:
    installed_engine(request.param)
    return request.param


@pytest.mark.parametrize("workers", [1, 2])
def test_no_proxy_configuration_lets_an_outside_client_reload(engine, workers, outside, tmp_path):
    port = free_port()
    unix_path = tmp_path / "app.sock"
    with ServeProcess(ENGINES[engine], tmp_path, "--workers", str(workers), "--bind", f"{HOST}:{port}",
                      "--bind", f"unix:{unix_path}", port=port, bind=False, pid_file=True) as server, \
            proxies_in_front(tmp_path, outside, port, unix_path) as urls:
        server.wait_serving(timeout=30)
        first = server.main_pid()
        for proxy, url in urls.items():
            for spoof, headers in SPOOFS.items():
                status, body = outside.curl(url, *headers)
                assert status == 403, (proxy, spoof, status, body)
                assert "needs the control token" in body, (proxy, spoof, body)
        assert server.main_pid() == first  # nothing above reloaded
        log = server.log()
        assert len(re.findall(r"refused POST /graceful from", log)) == len(urls) * len(SPOOFS), log[-3000:]
        # The chain the proxy forwarded is in the log line, and the client it names is the one the app sees:
        # nginx on loopback is a trusted proxy (--proxy-headers, the default), so the outside client's real
        # address, the rightmost one in X-Forwarded-For that is not a trusted proxy.
        assert re.search(rf"refused POST /graceful from {re.escape(outside.client)} \(forwarded: x-forwarded-for: "
                         rf"127\.0\.0\.1, {re.escape(outside.client)}\)", log), log[-3000:]

        # A local admin still reloads: SIGHUP, and `graceful-http reload`.
        os.kill(first, signal.SIGHUP)
        second = server.wait_new_main(first, timeout=30)
        result = server.reload_cli()
        assert result.returncode == 0, result.stderr
        third = server.wait_new_main(second, timeout=30)
        status, body = outside.curl(urls["nginx proxy_pass"].replace("/graceful", "/"), method="GET")
        assert status == 200 and pid_of(body.encode()) in ({third} if workers == 1 else children_of(third))


def test_the_control_token_reloads_through_every_proxy(engine, outside, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    unix_path = tmp_path / "app.sock"
    with ServeProcess(ENGINES[engine], tmp_path, "--control-token-file", str(token_file), "--bind", f"{HOST}:{port}",
                      "--bind", f"unix:{unix_path}", port=port, bind=False, pid_file=True) as server, \
            proxies_in_front(tmp_path, outside, port, unix_path) as urls:
        server.wait_serving(timeout=30)
        main = server.main_pid()
        for proxy, url in urls.items():
            status, body = outside.curl(url, *SPOOFS["all of them"])
            assert status == 403 and "needs the control token" in body, (proxy, status, body)
            status, body = outside.curl(url, f"Authorization: Bearer {TOKEN}")
            assert status == 202, (proxy, status, body)
            main = server.wait_new_main(main, timeout=30)
