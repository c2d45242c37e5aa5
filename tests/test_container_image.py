"""The Containerfile, for real: Debian's podman builds it and runs it, and graceful-http is the container's PID 1.

The base is a local Debian 12 root made with debootstrap (the one the package
tests cache), imported with `podman import`: no registry pull. Inside, the
image runs Debian's python3-uvicorn 0.17.6 (the "debian" engine); the
container's network is podman's own, with its port 9999 published on a free
loopback port here.

How podman runs here, and why (this machine is itself a container):
- storage `vfs` (no overlay mounts in a container), in its own directory
  under the test cache, so layers are reused from one run to the next;
- `--cgroup-manager cgroupfs` (no systemd as PID 1 here) and the `runc`
  runtime: crun refuses this machine's mixed cgroup v1/v2 setup ("cgroups in
  hybrid mode not supported");
- `--isolation chroot` for the build's RUN steps, which then share the
  machine's network (to reach the Debian mirror);
- explicit `--ulimit`s at or below the current ones: podman would raise the
  open-files limit, which needs CAP_SYS_RESOURCE, missing here.
"""

from __future__ import annotations

import http.client
import json
import resource
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from test_debian_package import CACHE, cached_root  # the package tests' debootstrapped Debian 12

from support.load import Load, get, pid_of
from support.serve_process import HOST, free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/graceful-http-test-base:bookworm"
IMAGE = "localhost/graceful-http:test"
PID_FILE = "/tmp/graceful-http.pid"  # the image's CMD keeps the main pid there
RELOADS = 4


def podman(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    argv = ["podman", "--root", str(CACHE / "podman" / "storage"), "--runroot", "/run/graceful-http-tests/podman",
            "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
            "--runtime", "runc", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def image() -> str:
    for tool in ("podman", "runc"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            pytest.fail(f"{tool} is not installed (tests/run installs it)")
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        root = cached_root("bookworm")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        podman("import", "-", BASE_IMAGE, stdin=tar.stdout, timeout=600)
        assert tar.wait() == 0
    # --format docker: the OCI image format has no HEALTHCHECK.
    podman("build", "--format", "docker", "--isolation", "chroot", "--build-arg", f"BASE={BASE_IMAGE}",
           "-t", IMAGE, "-f", str(REPO / "Containerfile"), str(REPO), timeout=1200)
    podman("image", "prune", "-f")  # the previous build's layers: vfs keeps a full copy of the root in each
    return IMAGE


class Container:
    """One `podman run -d` of the image, its port 9999 published on a free loopback port."""

    def __init__(self, image: str):
        self.name = f"gh-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        podman("run", "-d", "--name", self.name, "-p", f"{HOST}:{self.port}:9999",
               "--ulimit", f"nofile={nofile[0]}:{nofile[1]}", "--ulimit", "nproc=4096:4096", image)

    def exec(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *command, timeout=timeout, check=False)

    def state(self) -> dict:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return "--- container log ---\n" + "\n".join((result.stdout + result.stderr).splitlines()[-40:])

    def main_pid(self) -> int | None:
        text = self.exec("cat", PID_FILE).stdout.strip()
        return int(text) if text.isdigit() else None

    def processes(self) -> dict[int, str]:
        """{pid: state letter} of every process in the container but the `sh` that lists them."""
        listing = self.exec("sh", "-c", 'for f in /proc/[0-9]*/stat; do cat "$f"; echo; done 2>/dev/null').stdout
        found = {}
        for line in filter(None, map(str.strip, listing.splitlines())):
            pid, rest = line.split(" ", 1)
            name, _, fields = rest.rpartition(")")
            if name != "(sh":
                found[int(pid)] = fields.split()[0]
        return found

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


@pytest.fixture
def container(image):
    instance = Container(image)
    try:
        yield instance
    finally:
        instance.remove()


def wait_serving(container: Container) -> int:
    """Until GET / answers and the pid file names the pid that answered; that pid (the container's view)."""
    def serving():
        if not container.state()["Running"]:
            raise AssertionError(f"the container stopped\n{container.logs()}")
        try:
            status, body, _ = get(HOST, container.port, "/", timeout=5)
        except OSError:
            return None
        return pid_of(body) if status == 200 and pid_of(body) == container.main_pid() else None
    return wait_until(serving, 60, "the container to serve", container.logs)


def test_the_image_runs_graceful_http_as_pid_1_not_as_root_and_is_healthy(container):
    main = wait_serving(container)
    inspected = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    assert inspected["Config"]["User"] == "graceful-http"
    assert any("/healthz" in part for part in inspected["Healthcheck"]["Test"]), inspected.get("Healthcheck")
    status = container.exec("cat", "/proc/1/status").stdout
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["10001"] * 4, uid_line
    assert container.exec("cat", "/proc/1/cmdline").stdout.split("\0")[:4] == ["python3", "-m", "graceful_http",
                                                                                 "serve"]
    assert main != 1, "PID 1 is the holder; a generation serves"
    check = podman("healthcheck", "run", container.name, check=False)
    assert check.returncode == 0, (check.stdout, check.stderr, container.logs())


def test_reloads_under_load_keep_pid_1_then_podman_stop_drains_and_exits_0(container):
    mains = [wait_serving(container)]
    pid1_here = container.state()["Pid"]
    with Load(HOST, container.port, clients=8) as load:
        load.wait_for_requests(100)
        for index in range(RELOADS):
            old = mains[-1]
            if index % 2 == 0:
                podman("kill", "--signal", "HUP", container.name)
            else:
                result = container.exec("python3", "-m", "graceful_http", "reload", "--pid-file", PID_FILE)
                assert result.returncode == 0, (result.stdout, result.stderr)
            new = wait_until(lambda: (p := container.main_pid()) not in (None, old) and p, 60,
                             f"the pid file to name a successor of {old}", container.logs)
            mains.append(new)
            wait_until(lambda: load.result.pids[new] > 0, 20, f"the load to be answered by {new}",
                       lambda: load.result.summary())
            wait_until(lambda: old not in container.processes(), 30, f"old main {old} to exit and be reaped",
                       container.logs)
            load.wait_for_requests(50)
    assert load.result.failures == [], load.result.summary()
    assert set(load.result.pids) == set(mains), load.result.summary()
    assert container.state()["Pid"] == pid1_here, "the container's PID 1 changed"
    standby = [int(pid) for pid in container.exec("cat", f"/proc/{mains[-1]}/task/{mains[-1]}/children").stdout.split()]
    assert len(standby) == 1, f"a one-process main has one child, its standby: {standby}"
    wait_until(lambda: sorted(container.processes()) == sorted([1, mains[-1], *standby]), 20,
               "only PID 1, the current main and its standby to be left", container.logs)
    assert "Z" not in container.processes().values()

    # podman stop (SIGTERM to PID 1) while a request is in flight: it is answered, the container exits 0.
    connection = http.client.HTTPConnection(HOST, container.port, timeout=30)
    try:
        connection.request("GET", "/")
        assert pid_of(connection.getresponse().read()) == mains[-1]
        connection.request("GET", "/sleep?seconds=2")
        stop = {}
        stopper = threading.Thread(target=lambda: stop.update(result=podman("stop", "-t", "30", container.name,
                                                                            check=False)))
        stopper.start()
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    stopper.join(timeout=60)
    assert stop["result"].returncode == 0, stop["result"].stderr
    assert response.status == 200
    assert body.startswith(f"Hello, graceful pid:{mains[-1]},".encode()), body
    state = container.state()
    assert not state["Running"] and state["ExitCode"] == 0, (state, container.logs())
    log = podman("logs", container.name).stderr + podman("logs", container.name).stdout
    assert "SIGTERM received: stopping" in log
    assert "drained: 1 request(s) answered while draining, 0 cut" in log, log[-3000:]
