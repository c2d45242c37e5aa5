"""The server options users bring from uvicorn and gunicorn, by their effect on a real server.

Each test runs a real `python -m graceful_http serve` once per engine ("pypi":
the newest uvicorn with httptools and uvloop; "debian": Debian 12's uvicorn
0.17.6 with h11 and asyncio) and looks at what a real client gets: the
client address and scheme the app sees through proxy headers, the root path,
503 beyond the concurrency limit, the keep-alive timeout, response headers,
the listen backlog, lifespan modes, the request head limit, TLS (a
self-signed certificate made here with the openssl command, a renewal applied
by a reload under load), and an env file applied by a reload.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from graceful_http import cli
from graceful_http.envfile import ORIGINAL_VARIABLE, apply_env_file, parse_env_file
from graceful_http.settings import SettingsError
from harness import proxies
from harness.processes import alive, free_port
from harness.systemd_service import REPO, SERVICE, InstalledService
from support.appfiles import APPS
from support.load import Load
from support.serve_process import ENGINES, HOST, ServeProcess, installed_engine, run_cli, wait_until

OPENSSL = "/usr/bin/openssl"


@pytest.fixture(params=list(ENGINES))
def engine(request) -> str:
    installed_engine(request.param)
    return request.param


def options_server(engine: str, directory: Path, *args: str, environ: dict[str, str] | None = None,
                   app: str = "options_app:app", pid_file: bool = True, **kwargs) -> ServeProcess:
    """A server of tests/apps/options_app.py (or `app`), with ARGS (and ServeProcess's `kwargs`)."""
    return ServeProcess(ENGINES[engine], directory, app, "--app-dir", str(APPS), *args, pid_file=pid_file,
                        environ={"HOLD_DIR": str(directory), **(environ or {})}, **kwargs)


def seen(port: int, path: str = "/", headers: dict[str, str] | None = None, method: str = "GET") -> dict:
    """What the app saw of a request (its JSON answer)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        return json.loads(body)
    finally:
        connection.close()


def request(port: int, path: str = "/", headers: dict[str, str] | None = None,
            method: str = "GET") -> tuple[int, bytes, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), response
    finally:
        connection.close()


# ---- the pure parts: the env file, the documentation -------------------------------------------------

ENV_FILE = """# the app's settings
export SHOP_COLOUR=red
SHOP_NAME = 'Tea & Co #1'
SHOP_GREETING="Hello,\\n\\"world\\"" # a comment
SHOP_EMPTY=
SHOP_URL=https://example.org/#top
SHOP_NOTE=two words   # a comment
SHOP_LETTER="Dear customer,
thank you."
SHOP_DOLLARS=$HOME ${HOME}
"""


def test_env_file_format():
    assert parse_env_file(ENV_FILE, "app.env") == {
        "SHOP_COLOUR": "red",
        "SHOP_NAME": "Tea & Co #1",
        "SHOP_GREETING": 'Hello,\n"world"',
        "SHOP_EMPTY": "",
        "SHOP_URL": "https://example.org/#top",
        "SHOP_NOTE": "two words",
        "SHOP_LETTER": "Dear customer,\nthank you.",
        "SHOP_DOLLARS": "$HOME ${HOME}",  # taken as written: no expansion
    }


@pytest.mark.parametrize("text, error", [
    ("A=1\njust words\n", "app.env:2: expected NAME=VALUE, got 'just words'"),
    ("A=1\n\n1A=2\n", "app.env:3: expected NAME=VALUE, got '1A=2'"),
    ("A='open\n", "app.env:1: A: unterminated single-quoted value"),
    ('A=1\nB="open\nstill open\n', "app.env:2: B: unterminated double-quoted value"),
    ("A='x' y\n", "app.env:1: A: unexpected text after the quoted value: 'y'"),
    ("export\n", "app.env:1: expected NAME=VALUE, got 'export'"),
    ("A=1\nPYTHONPATH=/srv/app\n", "app.env:2: PYTHONPATH: the interpreter reads it before the env file: set it with"
                                    " Environment= in the unit"),
    ("NOTIFY_SOCKET=/tmp/x\n", "app.env:1: NOTIFY_SOCKET: set by systemd or graceful-http itself, not by an env file"),
    ("LISTEN_FDS=3\n", "app.env:1: LISTEN_FDS: set by systemd or graceful-http itself, not by an env file"),
])
def test_env_file_errors_name_the_line(text, error):
    with pytest.raises(SettingsError) as raised:
        parse_env_file(text, "app.env")
    assert str(raised.value) == error


def test_applying_an_env_file_undoes_the_previous_one():
    environ = {"PATH": "/usr/bin", "SHOP_COLOUR": "from-the-unit"}
    apply_env_file({"SHOP_COLOUR": "red", "SHOP_NAME": "Tea"}, environ)
    assert (environ["SHOP_COLOUR"], environ["SHOP_NAME"]) == ("red", "Tea")
    # The next generation inherits `environ` and applies the file as it is now.
    apply_env_file({"SHOP_NAME": "Coffee"}, environ)
    assert (environ["SHOP_COLOUR"], environ["SHOP_NAME"]) == ("from-the-unit", "Coffee")
    apply_env_file(None, environ)  # no env file any more
    assert environ == {"PATH": "/usr/bin", "SHOP_COLOUR": "from-the-unit"}
    assert ORIGINAL_VARIABLE not in environ


def test_readme_lists_every_serve_option():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Command line"):readme.index("## Endpoints")]
    serve = cli.build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {action.option_strings[0] for action in serve._actions if action.option_strings} - {"-h"}
    missing = sorted(flag for flag in flags if flag not in section)
    assert missing == [], f"README's command-line section does not mention {missing}"


# ---- proxies: who the client is ----------------------------------------------------------------

FORWARDED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}


def test_a_trusted_proxy_names_the_client_and_scheme_and_an_untrusted_one_does_not(engine, tmp_path):
    # The default: proxy headers on, loopback trusted (we connect from 127.0.0.1, as a local nginx would).
    # Loopback may reload without a token here (--control-allow), but only when the request is not proxied.
    with options_server(engine, tmp_path, "--control-allow", "127.0.0.0/8") as server:
        server.wait_serving()
        app_saw = seen(server.port, headers=FORWARDED)
        assert (app_saw["client"][0], app_saw["scheme"]) == ("203.0.113.7", "https")
        assert seen(server.port)["client"][0] == HOST  # no header: the peer itself
        # The control layer sees the client the app sees, and a proxied request never reloads without the
        # token, even one that a trusted proxy says comes from loopback.
        status, body, _ = request(server.port, "/graceful", headers=FORWARDED, method="POST")
        assert status == 403, body
        forged = {"X-Forwarded-For": "127.0.0.1"}
        assert seen(server.port, headers=forged)["client"][0] == "127.0.0.1"
        status, body, _ = request(server.port, "/graceful", headers=forged, method="POST")
        assert (status, b"proxied" in body) == (403, True), body
        assert server.main_pid() == server.pid
        # Not proxied, from loopback: allowed (so the refusals above were for being proxied).
        status, body, _ = request(server.port, "/graceful", method="POST")
        assert status == 202, body
        server.wait_new_main(server.pid)
    # Only 192.0.2.1 is trusted ($FORWARDED_ALLOW_IPS, as uvicorn reads it): our headers are ignored.
    with options_server(engine, tmp_path, environ={"FORWARDED_ALLOW_IPS": "192.0.2.1"}) as server:
        server.wait_serving()
        app_saw = seen(server.port, headers=FORWARDED)
        assert (app_saw["client"][0], app_saw["scheme"]) == (HOST, "http")
    # The option wins over the variable.
    with options_server(engine, tmp_path, "--forwarded-allow-ips", "127.0.0.1",
                        environ={"FORWARDED_ALLOW_IPS": "192.0.2.1"}) as server:
        server.wait_serving()
        assert seen(server.port, headers=FORWARDED)["client"][0] == "203.0.113.7"
    # --no-proxy-headers: the peer, whatever the headers say.
    with options_server(engine, tmp_path, "--no-proxy-headers") as server:
        server.wait_serving()
        app_saw = seen(server.port, headers=FORWARDED)
        assert (app_saw["client"][0], app_saw["scheme"]) == (HOST, "http")


def test_trusted_proxy_networks_on_uvicorn_that_has_them_and_a_one_line_error_on_017(engine, tmp_path):
    args = ("--forwarded-allow-ips", "127.0.0.0/8")
    if engine == "debian":  # uvicorn 0.17.6 compares addresses as strings: a network would trust no one
        result = run_cli(ENGINES[engine], "check", "options_app:app", "--app-dir", str(APPS), *args, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip() == ("graceful-http: invalid --forwarded-allow-ips '127.0.0.0/8': uvicorn 0.17.6"
                                         " trusts single addresses only, not networks such as 127.0.0.0/8"
                                         " (newer uvicorn does)")
        return
    with options_server(engine, tmp_path, *args) as server:
        server.wait_serving()
        assert seen(server.port, headers=FORWARDED)["client"][0] == "203.0.113.7"


# ---- root path, headers, backlog, lifespan ---------------------------------------------------------


def test_root_path_reaches_the_app(engine, tmp_path):
    with options_server(engine, tmp_path, "--root-path", "/shop") as server:
        server.wait_serving()
        app_saw = seen(server.port, "/items")
        assert app_saw["root_path"] == "/shop"
        # uvicorn 0.17.6 leaves the path as received; newer uvicorn prefixes it, as the ASGI spec says.
        assert app_saw["path"] in ("/items", "/shop/items")
    with options_server(engine, tmp_path) as server:
        server.wait_serving()
        assert seen(server.port, "/items")["root_path"] == ""


def test_response_headers(engine, tmp_path):
    with options_server(engine, tmp_path) as server:  # the defaults: Server and Date, as uvicorn sends them
        server.wait_serving()
        status, _, response = request(server.port)
        assert status == 200
        assert response.getheader("server") == "uvicorn"
        date = response.getheader("date")
        assert date and abs(time.mktime(time.strptime(date, "%a, %d %b %Y %H:%M:%S GMT")) - time.mktime(
            time.gmtime())) < 60, date
    with options_server(engine, tmp_path, "--header", "X-Frame-Options:DENY", "--header", "X-Shop: two words",
                        "--no-server-header", "--no-date-header") as server:
        server.wait_serving()
        for path in ("/", "/healthz"):  # the app's responses and the control layer's
            status, _, response = request(server.port, path)
            assert status == 200
            assert response.getheader("x-frame-options") == "DENY"
            assert response.getheader("x-shop") == "two words"
            assert response.getheader("server") is None and response.getheader("date") is None


def listen_backlog(port: int) -> int:
    """The listen queue length of the socket listening on `port` (ss shows it as Send-Q)."""
    output = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    return int(lines[0].split()[2])


def test_backlog_of_bound_sockets(engine, tmp_path):
    with options_server(engine, tmp_path, "--backlog", "17") as server:
        server.wait_serving()
        assert listen_backlog(server.port) == 17
    with options_server(engine, tmp_path) as server:
        server.wait_serving()
        assert listen_backlog(server.port) == 2048


def test_backlog_of_sockets_passed_by_systemd(engine, tmp_path):
    """asyncio listens again on every socket it serves, with uvicorn's backlog: --backlog applies here too."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as passed:
        passed.bind((HOST, 0))
        passed.listen(5)
        port = passed.getsockname()[1]
        with options_server(engine, tmp_path, "--backlog", "33", port=port, bind=False, pass_fds=[passed.fileno()],
                            environ={"LISTEN_FDS": "1", "LISTEN_PID": "self"}) as server:
            server.wait_serving()
            assert listen_backlog(port) == 33


def test_lifespan_modes(engine, tmp_path):
    with options_server(engine, tmp_path, "--lifespan", "off") as server:
        server.wait_serving()
        assert seen(server.port)["lifespan"] is False
    for mode in ("auto", "on"):
        with options_server(engine, tmp_path, "--lifespan", mode) as server:
            server.wait_serving()
            assert seen(server.port)["lifespan"] is True
    # An app that rejects the lifespan scope: served with auto (uvicorn's meaning), refused with on.
    with options_server(engine, tmp_path, app="options_app:no_lifespan") as server:
        server.wait_serving()
        assert seen(server.port)["lifespan"] is False
    result = run_cli(ENGINES[engine], "serve", "options_app:no_lifespan", "--app-dir", str(APPS), "--lifespan", "on",
                     "--bind", f"{HOST}:{free_port()}", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot start: the app's lifespan startup" in result.stderr, result.stderr


# ---- limits: concurrency, keep-alive, request heads ------------------------------------------------


def test_limit_concurrency_answers_503_beyond_it(engine, tmp_path):
    # uvicorn counts the connection asking too: with a limit of 3, two requests held are all it takes.
    with options_server(engine, tmp_path, "--limit-concurrency", "3") as server:
        server.wait_serving()
        answers = {}
        holders = [threading.Thread(target=lambda n=n: answers.__setitem__(n, request(server.port, f"/hold?name={n}")))
                   for n in ("a", "b")]
        for holder in holders:
            holder.start()
        wait_until(lambda: all((tmp_path / f"{n}.held").exists() for n in ("a", "b")), 10, "two requests held",
                   server.log_tail)
        status, body, _ = request(server.port)
        assert status == 503, body
        assert b"Service Unavailable" in body
        (tmp_path / "release").touch()
        for holder in holders:
            holder.join(timeout=10)
        assert [answers[n][0] for n in ("a", "b")] == [200, 200]
        assert request(server.port)[0] == 200  # below the limit again


def idle_until_closed(port: int, limit: float) -> tuple[float, bytes]:
    """One request on a keep-alive connection, then idle: seconds until the server closed it (or `limit`)."""
    sock = socket.create_connection((HOST, port), timeout=limit)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            data += sock.recv(65536)
        answered = time.monotonic()
        try:
            rest = sock.recv(65536)
        except TimeoutError:
            return limit, data
        assert rest == b"", rest
        return time.monotonic() - answered, data
    finally:
        sock.close()


def test_keep_alive_timeout(engine, tmp_path):
    with options_server(engine, tmp_path, "--timeout-keep-alive", "1") as server:
        server.wait_serving()
        idle, data = idle_until_closed(server.port, limit=30)
        assert data.startswith(b"HTTP/1.1 200")
        assert 0.9 <= idle < 4, f"closed after {idle:.2f}s idle; the keep-alive timeout is 1s"


def test_by_default_idle_connections_outlast_nginx_upstream_keepalive(engine, tmp_path):
    """Behind nginx keeping upstream connections alive, one left idle longer than uvicorn's default (5 s) and
    than a request head may take (10 s) is still the server's, and nginx reuses it: an idle connection is
    closed by the proxy (nginx: 60 s), never by the server (75 s), so no request can cross the server's
    close on the wire (README "Behind a proxy")."""
    nginx_port = free_port()
    with options_server(engine, tmp_path) as server:
        server.wait_serving()
        blocks = (proxies.nginx_upstream("app", f"{HOST}:{server.port}", keepalive=4),
                  proxies.nginx_site(f"{HOST}:{nginx_port}", "http://app"))
        with proxies.nginx(tmp_path / "nginx", *blocks, wait_for=(HOST, nginx_port)):
            first = seen(nginx_port)["client"]
            time.sleep(11)  # the idleness under test
            assert seen(nginx_port)["client"] == first, "nginx had to open a new upstream connection"


def partial_head(port: int, size: int) -> bytes:
    """Send a request head of `size` bytes without its end; what the server answered (b"" if it waits)."""
    sock = socket.create_connection((HOST, port), timeout=10)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size)
        sock.settimeout(2)
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            sock.settimeout(10)
            sock.sendall(b"\r\n\r\n")  # the head's end: now it must be served
            data = b""
            while not data.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data[:100]
            return b""
        return answer
    finally:
        sock.close()


def test_request_head_limit(engine, tmp_path):
    # The defaults (h11: 16 KiB, httptools: 64 KiB) refuse an unfinished 80 KB head...
    with options_server(engine, tmp_path) as server:
        server.wait_serving()
        assert re.match(rb"HTTP/1.1 4(00|31) ", partial_head(server.port, 80_000))
    # ...which a limit of 100000 bytes accepts, on both engines, and refuses beyond.
    with options_server(engine, tmp_path, "--h11-max-incomplete-event-size", "100000") as server:
        server.wait_serving()
        assert partial_head(server.port, 80_000) == b""
        assert re.match(rb"HTTP/1.1 4(00|31) ", partial_head(server.port, 120_000))
        assert seen(server.port)["path"] == "/"


# ---- TLS ----------------------------------------------------------------------------------------


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and its key), made with the openssl command."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def tls_client(*trusted: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for cert in trusted:
        context.load_verify_locations(cert)
    return context


def served_certificate(port: int, context: ssl.SSLContext) -> tuple[bytes, bytes]:
    """The certificate the server presents (DER) and the app's answer, over a verified TLS connection."""
    connection = http.client.HTTPSConnection(HOST, port, timeout=10, context=context)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, body
        return connection.sock.getpeercert(binary_form=True), body
    finally:
        connection.close()


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def install(source: tuple[Path, Path], live: tuple[Path, Path]) -> None:
    """Put a certificate in place the way certbot does: write aside, rename over."""
    for src, dst in zip(source, live):
        tmp = dst.with_suffix(".new")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)


def test_tls_handshake_and_the_scheme_the_app_sees(engine, tmp_path):
    cert, key = make_certificate(tmp_path, "first")
    with options_server(engine, tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)) as server:
        wait_until(lambda: server.wait_for_log("ready: generation 1"), 20, "ready", server.log_tail)
        presented, body = served_certificate(server.port, tls_client(cert))
        assert presented == der(cert)
        assert json.loads(body)["scheme"] == "https"
        # Plain HTTP on a TLS port gets no answer an HTTP client would take.
        with pytest.raises((http.client.HTTPException, OSError)):
            request(server.port)
        # A client that does not trust the certificate fails its handshake.
        with pytest.raises(ssl.SSLCertVerificationError):
            served_certificate(server.port, tls_client(make_certificate(tmp_path, "other")[0]))


def test_tls_key_with_a_password_file(engine, tmp_path):
    cert, key = make_certificate(tmp_path, "locked")
    encrypted = tmp_path / "locked-encrypted.key"
    subprocess.run([OPENSSL, "pkey", "-in", str(key), "-aes256", "-passout", "pass:open sesame", "-out",
                    str(encrypted)], check=True, capture_output=True)
    password = tmp_path / "password"
    password.write_text("open sesame\n")
    python = ENGINES[engine]
    result = run_cli(python, "check", "--ssl-certfile", str(cert), "--ssl-keyfile", str(encrypted), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"graceful-http: cannot load the TLS certificate {cert} with key {encrypted}:"
                                     " the key is encrypted and no password was given (--ssl-keyfile-password-file)")
    with options_server(engine, tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(encrypted),
                        "--ssl-keyfile-password-file", str(password)) as server:
        wait_until(lambda: server.wait_for_log("ready: generation 1"), 20, "ready", server.log_tail)
        assert served_certificate(server.port, tls_client(cert))[0] == der(cert)


def test_tls_settings_that_cannot_be_used_are_one_line(tmp_path):
    """`check` (and so a start or a reload) names the file and the reason, in words."""
    cert, key = make_certificate(tmp_path, "good")
    other_cert, other_key = make_certificate(tmp_path, "other")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run([OPENSSL, "pkey", "-in", str(key), "-aes256", "-passout", "pass:right", "-out", str(encrypted)],
                   check=True, capture_output=True)
    (tmp_path / "wrong").write_text("wrong\n")
    cases = {
        "missing": (["--ssl-certfile", str(tmp_path / "nope.pem")],
                    f"cannot load the TLS certificate {tmp_path / 'nope.pem'}: No such file or directory"),
        "swapped": (["--ssl-certfile", str(key), "--ssl-keyfile", str(cert)],
                    f"cannot load the TLS certificate {key} with key {cert}: not a PEM certificate and key"
                    " (or they are swapped)"),
        "mismatch": (["--ssl-certfile", str(cert), "--ssl-keyfile", str(other_key)],
                     f"cannot load the TLS certificate {cert} with key {other_key}: the private key does not match"
                     " the certificate"),
        "wrong password": (["--ssl-certfile", str(cert), "--ssl-keyfile", str(encrypted),
                            "--ssl-keyfile-password-file", str(tmp_path / "wrong")],
                           f"cannot load the TLS certificate {cert} with key {encrypted}: the key password is wrong,"
                           " or not a PEM certificate and key (or they are swapped)"),
        "no cipher": (["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ciphers", "NO-SUCH-CIPHER"],
                      "invalid --ssl-ciphers 'NO-SUCH-CIPHER': OpenSSL selects no cipher from it"),
        "key alone": (["--ssl-keyfile", str(key)], "--ssl-keyfile needs --ssl-certfile"),
        "client certs without CAs": (["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-cert-reqs",
                                      "required"],
                                     "--ssl-cert-reqs required needs --ssl-ca-certs (the CAs that sign client"
                                     " certificates)"),
        "CAs not PEM": (["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certs", str(key)],
                        f"cannot load the CA certificates {key}: "),
    }
    for case, (args, error) in cases.items():
        result = run_cli(ENGINES["pypi"], "check", *args, cwd=tmp_path)
        assert result.returncode == 1, (case, result.stdout, result.stderr)
        assert result.stderr.startswith(f"graceful-http: {error}") and result.stderr.count("\n") == 1, \
            (case, result.stderr)
    assert other_cert.exists()


def test_client_certificates_when_required(engine, tmp_path):
    cert, key = make_certificate(tmp_path, "server")
    client_cert, client_key = make_certificate(tmp_path, "client")
    with options_server(engine, tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                        "--ssl-ca-certs", str(client_cert), "--ssl-cert-reqs", "required") as server:
        wait_until(lambda: server.wait_for_log("ready: generation 1"), 20, "ready", server.log_tail)
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            served_certificate(server.port, tls_client(cert))  # no client certificate: refused
        with_certificate = tls_client(cert)
        with_certificate.load_cert_chain(client_cert, client_key)
        assert served_certificate(server.port, with_certificate)[0] == der(cert)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_renewed_certificate_takes_effect_with_a_reload_under_load(engine, workers, tmp_path):
    first, renewed = make_certificate(tmp_path, "first"), make_certificate(tmp_path, "renewed")
    live = (tmp_path / "fullchain.pem", tmp_path / "privkey.pem")
    install(first, live)
    trusting_both = tls_client(first[0], renewed[0])
    with ServeProcess(ENGINES[engine], tmp_path, "--ssl-certfile", str(live[0]), "--ssl-keyfile", str(live[1]),
                      "--workers", str(workers), pid_file=True) as server:
        wait_until(lambda: server.main_pid() == server.pid and server.wait_for_log("ready: generation 1"), 20,
                   "ready", server.log_tail)
        assert served_certificate(server.port, trusting_both)[0] == der(first[0])
        connect = lambda: http.client.HTTPSConnection(HOST, server.port, timeout=30, context=trusting_both)  # noqa: E731
        with Load(HOST, server.port, clients=6, connect=connect) as load:
            load.wait_for_requests(50)
            # A certificate that cannot be loaded: the reload fails, the old generation keeps serving.
            live[0].write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
            failed = server.reload_cli()
            assert failed.returncode == 1, (failed.stdout, failed.stderr)
            assert f"cannot load the TLS certificate {live[0]} with key {live[1]}" in failed.stderr
            assert server.main_pid() == server.pid
            load.wait_for_requests(50)
            # The renewed certificate: the reload succeeds and new connections get it.
            install(renewed, live)
            done = server.reload_cli()
            assert done.returncode == 0, (done.stdout, done.stderr)
            new_main = int(done.stdout.strip())
            server.wait_new_main(server.pid)
            load.wait_for_requests(50)
            result = load.stop()
        assert result.failures == [], result.summary()
        assert served_certificate(server.port, trusting_both)[0] == der(renewed[0])
        if workers == 1:  # (with workers, the workers answer)
            assert set(result.pids) >= {server.pid, new_main}, result.summary()
        assert alive(new_main)


# ---- env file --------------------------------------------------------------------------------------


def test_env_file_is_applied_by_every_reload(engine, tmp_path):
    env_file = tmp_path / "app.env"
    env_file.write_text("# the app's settings\nexport SHOP_COLOUR=red\nSHOP_NAME='Tea & Co'\n")
    with options_server(engine, tmp_path, "--env-file", str(env_file)) as server:
        server.wait_serving()
        assert seen(server.port, "/?env=SHOP_COLOUR")["env"] == "red"
        assert seen(server.port, "/?env=SHOP_NAME")["env"] == "Tea & Co"
        # A changed value and a variable no longer set: both take effect with a reload.
        env_file.write_text('SHOP_COLOUR="blue\\tgreen"\n')
        done = server.reload_cli()
        assert done.returncode == 0, done.stderr
        second = server.wait_new_main(server.pid)
        app_saw = seen(server.port, "/?env=SHOP_COLOUR")
        assert (app_saw["env"], app_saw["pid"]) == ("blue\tgreen", second)
        assert seen(server.port, "/?env=SHOP_NAME")["env"] is None
        # A line that cannot be read: the reload fails naming it, the running generation keeps its values.
        env_file.write_text("SHOP_COLOUR=yellow\nthis is not a setting\n")
        failed = server.reload_cli()
        assert failed.returncode == 1
        assert f"{env_file}:2: expected NAME=VALUE, got 'this is not a setting'" in failed.stderr
        assert server.main_pid() == second
        assert seen(server.port, "/?env=SHOP_COLOUR")["env"] == "blue\tgreen"
        checked = run_cli(ENGINES[engine], "check", "--env-file", str(env_file), cwd=tmp_path)
        assert checked.returncode == 2
        assert checked.stderr.strip() == f"graceful-http: {env_file}:2: expected NAME=VALUE, got 'this is not a setting'"


# ---- under systemd: the README's certbot deploy hook --------------------------------------------------


def readme_deploy_hook() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"```sh\n(#!/bin/sh\n# certbot renewed a certificate.*?)```", readme, re.DOTALL)
    assert match, "README has no certbot deploy hook"
    return match.group(1)


@pytest.mark.systemd
def test_the_readme_deploy_hook_renews_the_certificate_under_systemd_with_no_failed_request(tmp_path):
    live = "/etc/letsencrypt/live/example.org"
    hook = "/etc/letsencrypt/renewal-hooks/deploy/graceful-http"
    first, renewed = make_certificate(tmp_path, "first"), make_certificate(tmp_path, "renewed")
    trusting_both = tls_client(first[0], renewed[0])
    args = "--ssl-certfile /etc/graceful-http/tls/fullchain.pem --ssl-keyfile /etc/graceful-http/tls/privkey.pem"
    with InstalledService(f"gh-opt-tls-{os.getpid()}", "pypi", serve_args=args,
                          service_extra="SupplementaryGroups=ssl-cert\n") as service:
        c = service.container
        c.run("getent group ssl-cert || groupadd --system ssl-cert")  # Debian's ssl-cert package makes it

        def certbot_renews(cert: Path, key: Path):
            c.write_file(f"{live}/fullchain.pem", cert.read_text(), mode=0o600)
            c.write_file(f"{live}/privkey.pem", key.read_text(), mode=0o600)
            return c.run(hook, check=False)

        c.write_file(hook, readme_deploy_hook(), mode=0o755)
        assert certbot_renews(*first).returncode == 0  # not running yet: installs the files only
        assert c.run("stat -c '%a %G' /etc/graceful-http/tls/privkey.pem").stdout.split() == ["640", "ssl-cert"]
        c.systemctl("start", SERVICE)
        serving = service.main_pid()
        assert served_certificate(service.port, trusting_both)[0] == der(first[0])
        connect = lambda: http.client.HTTPSConnection(HOST, service.port, timeout=30, context=trusting_both)  # noqa: E731
        with Load(HOST, service.port, clients=6, connect=connect) as load:
            load.wait_for_requests(50)
            renewal = certbot_renews(*renewed)
            assert renewal.returncode == 0, (renewal.stdout, renewal.stderr)
            assert service.main_pid() != serving
            load.wait_for_requests(50)
            # A renewal that left a broken certificate: the hook (the reload) fails, the service serves on.
            broken = tmp_path / "broken.pem"
            broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
            renewed_main = service.main_pid()
            failed = certbot_renews(broken, renewed[1])
            assert failed.returncode != 0
            assert service.main_pid() == renewed_main
            status_text = c.show(SERVICE, "StatusText")["StatusText"]
            assert status_text.startswith("reload failed: cannot load the TLS certificate"
                                          " /etc/graceful-http/tls/fullchain.pem with key"), status_text
            load.wait_for_requests(50)
        assert load.result.failures == [], load.result.summary()
        assert served_certificate(service.port, trusting_both)[0] == der(renewed[0])
        state = service.state()
        assert (state["ActiveState"], state["NRestarts"]) == ("active", "0")
