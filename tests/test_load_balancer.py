"""examples/haproxy.cfg for real: Debian's HAProxy in front of two graceful-http instances standing in for two hosts.

The shipped example, with only its addresses replaced (two loopback ports
for the hosts, a free port for the frontend, a runtime API socket in the
test's directory). A rolling deploy (a reload of each instance in turn) and
taking an instance out the way the example says (drain it in HAProxy, then
stop it), under a real HTTP load through HAProxy, must fail no request. Once
per engine; each instance runs as on a host outside systemd, with its
stable-pid holder, and is signalled at the pid it was started as.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from support.load import Load, get
from support.serve_process import ENGINES, HOST, ServeProcess, free_port, installed_engine, wait_until

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
HAPROXY = "/usr/sbin/haproxy"
NGINX = "/usr/sbin/nginx"


def haproxy_config(frontend: int, hosts: list[int], admin_socket: Path) -> str:
    """The shipped example with its frontend on `frontend`, its two servers on the loopback ports `hosts`."""
    text = (EXAMPLES / "haproxy.cfg").read_text()
    text, bound = re.subn(r"^(\s*bind )\*:80$", rf"\g<1>{HOST}:{frontend}", text, flags=re.MULTILINE)
    servers = iter(hosts)
    text, replaced = re.subn(r"^(\s*server host\d )\S+:9999$", lambda m: f"{m.group(1)}{HOST}:{next(servers)}",
                             text, flags=re.MULTILINE)
    text, api = re.subn(r"^(\s*stats socket )/run/haproxy/admin.sock", rf"\g<1>{admin_socket}", text,
                        flags=re.MULTILINE)
    assert (bound, replaced, api) == (1, 2, 1), "the example changed shape: update this test"
    return text


def haproxy_command(admin_socket: Path, command: str) -> str:
    """One command on HAProxy's runtime API (what `socat stdio admin.sock` does)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as api:
        api.connect(str(admin_socket))
        api.sendall(command.encode() + b"\n")
        answer = b""
        while chunk := api.recv(4096):
            answer += chunk
    return answer.decode()


def test_the_examples_are_valid_configurations(tmp_path):
    result = subprocess.run([HAPROXY, "-c", "-f", str(EXAMPLES / "haproxy.cfg")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    wrapper = tmp_path / "nginx.conf"
    wrapper.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
                       f"http {{\n    include {EXAMPLES / 'nginx.conf'};\n}}\n")
    result = subprocess.run([NGINX, "-t", "-c", str(wrapper), "-p", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(params=list(ENGINES))
def python(request) -> str:
    return installed_engine(request.param)


def _answers(port: int) -> bool:
    try:
        return get(HOST, port, "/", timeout=2)[0] == 200
    except OSError:
        return False


def test_rolling_reload_and_taking_a_host_out_behind_haproxy_fail_nothing(python, tmp_path):
    hosts = [ServeProcess(python, tmp_path, pid_file=True, stable_pid=True) for _ in range(2)]
    frontend = free_port()
    admin = tmp_path / "admin.sock"
    (tmp_path / "haproxy.cfg").write_text(haproxy_config(frontend, [host.port for host in hosts], admin))
    haproxy = None
    try:
        mains = []
        for host in hosts:
            host.start()
            mains.append(wait_until(host.main_pid, 20, "the pid file", host.log_tail))
        haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: _answers(frontend), 20, "HAProxy to relay")
        with Load(HOST, frontend, clients=8) as load:
            wait_until(lambda: all(load.result.pids[pid] > 0 for pid in mains), 20, "both hosts to answer",
                       lambda: load.result.summary())
            # A rolling deploy: reload one host, then the other (SIGHUP to the pid each was started as).
            for index, host in enumerate(hosts):
                os.kill(host.pid, signal.SIGHUP)
                new = host.wait_new_main(mains[index])
                wait_until(lambda: load.result.pids[new] > 0, 20, f"the load to reach {new}",
                           lambda: load.result.summary())
                mains[index] = new
            load.wait_for_requests(200)
            assert load.result.failures == [], load.result.summary()

            # Taking host2 out as the example says: drain it in HAProxy, wait until it gets nothing, stop it.
            assert haproxy_command(admin, "set server graceful_http/host2 state drain").strip() == ""
            load.wait_for_requests(100)  # requests HAProxy had already sent it finish meanwhile
            last = load.result.pids[mains[1]]
            load.wait_for_requests(200)
            assert load.result.pids[mains[1]] == last, "HAProxy still sends requests to a drained server"
            hosts[1].popen.send_signal(signal.SIGTERM)
            assert hosts[1].popen.wait(timeout=30) == 0, hosts[1].log_tail()
            wait_until(lambda: _operational_state(admin) == 0, 20, "HAProxy's check to take host2 out")
            load.wait_for_requests(300)
        assert load.result.failures == [], load.result.summary()
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(timeout=10)
        for host in hosts:
            host.kill_all()


def _operational_state(admin: Path) -> int | None:
    """host2's srv_op_state in `show servers state` (0: stopped, as its health checks failed)."""
    for line in haproxy_command(admin, "show servers state graceful_http").splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[3] == "host2":
            return int(fields[5])
    return None
