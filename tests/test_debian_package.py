"""The Debian package, as an admin meets it, on a fresh Debian 12 and a fresh Debian 13.

Builds the .deb from a copy of this checkout (`dpkg-buildpackage -us -uc -b`),
lints it, then for each suite boots a fresh debootstrapped root with systemd
in a container and does what an admin does: `apt-get install ./…deb`, use the
service, `systemctl reload` it under load, install a newer version over it
under load (a zero-downtime reload, not a restart), install a broken version
over that (the old generation keeps serving and the upgrade says so), and
purge it.

Bookworm runs python 3.11, uvicorn 0.17.6 and systemd 252; trixie python
3.13, uvicorn 0.32 and systemd 257. The roots are cached under
$GRACEFUL_HTTP_TEST_CACHE (default /var/cache/graceful-http-tests), one
directory per suite made once by debootstrap (about a minute each); every run
boots a copy. Delete the cache to start from a newer Debian.

The package's socket listens on port 9999 and the container shares the
host's network: the port must be free on the host, and these tests must not
run in parallel with anything else that uses it.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.container import SystemdContainer, require_container_support, wait_until
from support.load import Load, get, pid_of

REPO = Path(__file__).resolve().parents[1]
UNITS_DIR = REPO / "packaging" / "systemd"
CONFIG = REPO / "packaging" / "config.toml"  # installed as /etc/graceful-http/config.toml
CACHE = Path(os.environ.get("GRACEFUL_HTTP_TEST_CACHE", "/var/cache/graceful-http-tests"))
SUITES = ["bookworm", "trixie"]
PACKAGE = "graceful-http"
SERVICE = "graceful-http.service"
PORT = 9999  # where the shipped graceful-http.socket listens
DEBOOTSTRAP_INCLUDE = "systemd,systemd-sysv,dbus,curl,ca-certificates"

# pyenv's shims come first in PATH on these machines and make pybuild pick the
# wrong python3: build with Debian's tools only, as the README says.
BUILD_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": os.environ.get("HOME", "/root"),
}

# The second version says which version it is in every demo page, so that a
# response proves which code the process that sent it runs.
DEMO_HELLO = 'f"Hello, pid:{os.getpid()}, '
BROKEN_DEMO = '\nraise RuntimeError("broken on purpose by the package test")\n'


# -- tools --------------------------------------------------------------------


def require_package_tools() -> None:
    """Raise RuntimeError naming every missing tool. These tests never skip."""
    require_container_support()
    wanted = {
        "dpkg-buildpackage": "dpkg-dev",
        "dpkg-source": "dpkg-dev",
        "dpkg-checkbuilddeps": "dpkg-dev",
        "dh": "debhelper",
        "pybuild": "dh-python",
        "lintian": "lintian",
        "debootstrap": "debootstrap",
        "git": "git",
    }
    missing = sorted({f"{tool} (apt-get install {package})" for tool, package in wanted.items()
                      if shutil.which(tool, path=BUILD_ENV["PATH"]) is None})
    if missing:
        raise RuntimeError("cannot build and test the Debian package; missing: " + "; ".join(missing))


def run(argv: list[str], cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a host command with Debian's PATH; fail with its output if it fails."""
    result = subprocess.run(argv, cwd=cwd, env=BUILD_ENV, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed with exit code {result.returncode} (in {cwd})\n"
            f"--- stdout (tail) ---\n{result.stdout[-6000:]}\n--- stderr (tail) ---\n{result.stderr[-6000:]}"
        )
    return result


# -- building -----------------------------------------------------------------


def changelog_version(changelog: str) -> str:
    match = re.match(r"graceful-http \(([^)]+)\)", changelog)
    assert match, f"debian/changelog does not start with a graceful-http entry: {changelog[:80]!r}"
    return match.group(1)


def copy_checkout(dest: Path) -> None:
    """The checkout's files as git sees them (tracked and new, not ignored), into dest."""
    listed = run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # skip files deleted from the work tree but still tracked
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def bump_changelog(src: Path, version: str, note: str) -> None:
    path = src / "debian" / "changelog"
    old = path.read_text()
    maintainer = re.search(r"^ -- (.+?)  ", old, re.MULTILINE).group(1)
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    path.write_text(f"{PACKAGE} ({version}) unstable; urgency=medium\n\n  * {note}\n\n -- {maintainer}  {date}\n\n{old}")


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"cannot patch {path}: expected {old!r} once, found it {text.count(old)} times"
    path.write_text(text.replace(old, new))


@dataclass
class Build:
    version: str
    deb: Path
    changes: Path
    seconds: float


def build_package(work: Path, version: str | None = None, note: str = "", patch=None) -> Build:
    """Copy the checkout to work/src, optionally bump and patch it, and build the .deb there."""
    src = work / "src"
    copy_checkout(src)
    if version is not None:
        bump_changelog(src, version, note)
    if patch is not None:
        patch(src)
    version = changelog_version((src / "debian" / "changelog").read_text())
    started = time.monotonic()
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src)
    build = Build(version, work / f"{PACKAGE}_{version}_all.deb",
                  next(work.glob(f"{PACKAGE}_{version}_*.changes")), time.monotonic() - started)
    assert build.deb.is_file(), f"dpkg-buildpackage made no {build.deb.name}: {sorted(os.listdir(work))}"
    return build


def mark_version(version: str):
    """A patch: the code says `version` in --version and in every demo page."""
    def patch(src: Path) -> None:
        init = src / "service" / "graceful_http" / "__init__.py"
        text, count = re.subn(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text())
        assert count == 1, f"cannot patch {init}: no single __version__ = \"…\" line"
        init.write_text(text)
        replace_once(src / "service" / "graceful_http" / "demo.py", DEMO_HELLO, f'{DEMO_HELLO}version:{version}, ')
    return patch


def break_demo(src: Path) -> None:
    demo = src / "service" / "graceful_http" / "demo.py"
    demo.write_text(demo.read_text() + BROKEN_DEMO)


@dataclass
class Packages:
    first: Build
    second: Build
    broken: Build
    lintian: str
    seconds: float


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> Packages:
    """Three builds from copies of the checkout: as it is, a newer version, a broken newer one."""
    require_package_tools()
    started = time.monotonic()
    base = changelog_version((REPO / "debian" / "changelog").read_text())

    # The source package, from a clean copy, so lintian checks debian/ itself too.
    source = tmp_path_factory.mktemp("source")
    copy_checkout(source / "src")
    run(["dpkg-source", "--build", "src"], cwd=source)
    dsc = source / f"{PACKAGE}_{base}.dsc"

    first = build_package(tmp_path_factory.mktemp("first"))
    assert first.version == base
    second_version = f"{base}+upgrade1"
    second = build_package(tmp_path_factory.mktemp("second"), second_version,
                           "Test build: a newer version, installed over the first.", mark_version(second_version))
    broken = build_package(tmp_path_factory.mktemp("broken"), f"{base}+upgrade2",
                           "Test build: a newer version whose code cannot start.", break_demo)

    lint = subprocess.run(["lintian", "--display-info", str(first.changes), str(dsc)],
                          env=BUILD_ENV, capture_output=True, text=True, timeout=300)
    output = lint.stdout + lint.stderr
    assert lint.returncode in (0, 1, 2), f"lintian did not run (exit code {lint.returncode}):\n{output}"
    return Packages(first, second, broken, output, time.monotonic() - started)


# -- tests without systemd ---------------------------------------------------------


def options_in_help(argv: list[str]) -> set[str]:
    env = {**BUILD_ENV, "PYTHONPATH": str(REPO / "service")}
    out = subprocess.run([sys.executable, "-m", "graceful_http", *argv, "--help"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", out))


def test_manual_page_names_every_command_and_option():
    """debian/manpage.py renders graceful-http(1) from the CLI's parser: every option --help lists is in it."""
    env = {**BUILD_ENV, "PYTHONPATH": str(REPO / "service")}
    page = subprocess.run([sys.executable, str(REPO / "debian" / "manpage.py"), "--version", "0.0",
                           "--units", str(UNITS_DIR), "--file", f"/etc/graceful-http/config.toml={CONFIG}"],
                          env=env, capture_output=True, text=True, check=True).stdout
    text = page.replace("\\-", "-")
    top = subprocess.run([sys.executable, "-m", "graceful_http", "--help"], env=env,
                         capture_output=True, text=True, check=True).stdout
    commands = re.findall(r"^    (\w+)\s", top, re.MULTILINE)
    assert {"serve", "reload"} <= set(commands), top
    missing = []
    for command in [None, *commands]:
        argv = [command] if command else []
        if command and f"graceful-http {command}" not in text:
            missing.append(f"command {command}")
        missing += [f"{command or 'graceful-http'} {option}" for option in sorted(options_in_help(argv))
                    if option not in text]
    assert missing == [], f"not in graceful-http(1): {missing}"
    for unit in sorted(os.listdir(UNITS_DIR)):
        assert f"/lib/systemd/system/{unit}" in text
    assert "/etc/graceful-http/config.toml" in text
    # groff (groff-base, which lintian needs anyway) renders it without warnings.
    render = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=page, capture_output=True, text=True)
    assert render.returncode == 0 and render.stderr == "", render.stderr


def test_changelog_version_is_the_code_version():
    """A native package: debian/changelog, pyproject.toml and graceful_http.__version__ agree."""
    version = changelog_version((REPO / "debian" / "changelog").read_text())
    pyproject = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    code = re.search(r'__version__ = "([^"]+)"', (REPO / "service" / "graceful_http" / "__init__.py").read_text())
    assert version == pyproject == code.group(1)


# -- Debian roots -----------------------------------------------------------------


def cached_root(suite: str) -> Path:
    """A fresh debootstrapped `suite`, made once and kept under CACHE/suite."""
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / suite
    with open(CACHE / f".{suite}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if root.is_dir():  # only the rename below makes it, so it is complete
            return root
        partial = CACHE / f"{suite}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        argv = ["debootstrap", "--variant=minbase", f"--include={DEBOOTSTRAP_INCLUDE}", suite, str(partial)]
        result = subprocess.run(argv, env=BUILD_ENV, capture_output=True, text=True, timeout=1200)
        if result.returncode != 0:
            log = (partial / "debootstrap" / "debootstrap.log")
            details = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{details}")
        partial.rename(root)
    return root


def assert_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("::", port))
        except OSError as exc:
            raise AssertionError(f"port {port} is busy on the host ({exc}); the package's socket listens there and "
                                 f"the container shares the host's network: stop whatever uses it") from None


def port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


class Admin:
    """An admin's shell in the booted root, with the package files at hand."""

    def __init__(self, container: SystemdContainer, root: Path):
        self.c = container
        self.root = root

    def sh(self, command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.c.run(command, timeout=timeout, check=check)

    def apt_install(self, build: Build) -> str:
        """`apt-get install -y ./graceful-http_….deb`; its whole output (the maintainer scripts' lines are printed)."""
        shutil.copy2(build.deb, self.root / "root" / build.deb.name)
        result = self.sh(f"cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y ./{build.deb.name} 2>&1",
                         timeout=600)
        print(f"\n$ apt-get install -y ./{build.deb.name}\n" + "\n".join(
            line for line in result.stdout.splitlines() if line.startswith(("graceful-http:", "Setting up graceful"))))
        return result.stdout

    def state(self, unit: str = SERVICE) -> dict[str, str]:
        return self.c.show(unit, "MainPID", "ActiveState", "SubState", "NRestarts", "InvocationID", "StatusText")

    def main_pid(self) -> int:
        return int(self.c.show(SERVICE, "MainPID")["MainPID"])

    def installed_version(self) -> str:
        return self.sh(f"dpkg-query --show --showformat='${{Version}}' {PACKAGE}").stdout

    def package_files(self) -> list[str]:
        return self.sh(f"dpkg-query --listfiles {PACKAGE}").stdout.split()


def sockets_shipped() -> list[str]:
    return sorted(name for name in os.listdir(UNITS_DIR) if name.endswith(".socket"))


# -- the admin's story ----------------------------------------------------------------


@pytest.mark.systemd
@pytest.mark.parametrize("suite", SUITES)
def test_install_reload_upgrade_and_purge(suite, packages, tmp_path):
    require_package_tools()
    lines = packages.lintian.splitlines()
    assert [line for line in lines if line.startswith(("E:", "W:"))] == [], packages.lintian
    fields = run(["dpkg-deb", "--field", str(packages.first.deb), "Architecture", "Depends", "Recommends"]).stdout
    relations = dict(line.split(": ", 1) for line in fields.splitlines())
    assert relations["Architecture"] == "all"
    depends = {name.split()[0] for name in relations["Depends"].split(", ")}
    assert {"python3-systemd", "python3-uvicorn"} <= depends and not {"python3-uvloop", "python3-httptools"} & depends
    assert {"python3-uvloop", "python3-httptools"} <= {name.split()[0] for name in relations["Recommends"].split(", ")}
    timings = {"builds and lintian (once)": packages.seconds}

    started = time.monotonic()
    root = tmp_path / "root"
    run(["cp", "-a", str(cached_root(suite)), str(root)], timeout=600)
    timings["root (debootstrap or cached) and copy"] = time.monotonic() - started
    assert_port_free(PORT)
    try:
        with SystemdContainer(f"gh-deb-{suite}-{os.getpid()}", directory=str(root)) as container:
            admin = Admin(container, root)
            try:
                story(admin, packages, timings)
            except BaseException:
                # pytest shows this with the failure: what the units and the service said.
                print(container.run("systemctl --no-pager status 'graceful-http*'; journalctl --no-pager -n 150",
                                    check=False).stdout)
                raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{suite}: " + "; ".join(f"{what} {seconds:.1f}s" for what, seconds in timings.items()))
    print("lintian:", packages.lintian.strip() or "(nothing to say)")


def story(admin: Admin, packages: Packages, timings: dict[str, float]) -> None:
    c = admin.c
    first, second, broken = packages.first, packages.second, packages.broken

    # 1. Install, as an admin does, with dependencies from the Debian mirror.
    t = time.monotonic()
    sources = admin.sh("cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources"
                       " 2>/dev/null | grep -E '^(deb |URIs:)' || true").stdout
    assert sources.strip(), "the container's root has no apt sources"
    admin.sh("apt-get update -q", timeout=300)
    output = admin.apt_install(first)
    timings["apt-get install"] = time.monotonic() - t
    assert admin.installed_version() == first.version

    # Every shipped socket is enabled and listening; the service waits for its first connection.
    for unit in sockets_shipped():
        assert admin.sh(f"systemctl is-enabled {unit}").stdout.strip() == "enabled", output
        assert c.show(unit, "ActiveState", "SubState") == {"ActiveState": "active", "SubState": "listening"}, output
    assert c.show("graceful-http.socket", "Listen")["Listen"] == f"[::]:{PORT} (Stream)"
    assert admin.sh(f"systemctl is-enabled {SERVICE}", check=False).stdout.strip() == "disabled"
    assert c.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    files = admin.package_files()
    for path in ["/usr/bin/graceful-http", "/usr/share/man/man1/graceful-http.1.gz", "/etc/graceful-http/config.toml",
                 "/usr/share/doc/graceful-http/copyright", "/usr/share/doc/graceful-http/changelog.gz",
                 *(f"/lib/systemd/system/{unit}" for unit in os.listdir(UNITS_DIR))]:
        assert path in files, f"{path} not in the package: {files}"
    assert any(path.startswith("/usr/lib/python3/dist-packages/graceful_http/") for path in files)
    man = gzip.decompress((admin.root / "usr/share/man/man1/graceful-http.1.gz").read_bytes()).decode()
    assert man.startswith(".TH GRACEFUL\\-HTTP 1") and "reload" in man
    assert admin.sh("graceful-http --version").stdout.strip() == f"graceful-http {first.version}"

    # 2. The demo page, from the host: the first connection starts the service.
    status, body, _ = get("127.0.0.1", PORT)
    assert status == 200 and body.startswith(b"Hello, pid:"), body
    served_by = pid_of(body)
    assert served_by == admin.main_pid()
    before = admin.state()
    assert (before["ActiveState"], before["SubState"], before["NRestarts"]) == ("active", "running", "0"), before
    socket_since = c.show("graceful-http.socket", "ActiveEnterTimestampMonotonic")

    with Load("127.0.0.1", PORT, clients=8, pause=0.005) as load:
        load.wait_for_requests(200)

        # 3. systemctl reload under load.
        t = time.monotonic()
        admin.sh(f"systemctl reload {SERVICE}")
        timings["systemctl reload"] = time.monotonic() - t
        reloaded = admin.main_pid()
        assert reloaded != served_by
        wait_until(lambda: load.result.pids[reloaded] > 0, timeout=10, what=f"a response from pid {reloaded}")
        load.wait_for_requests(200)
        assert load.result.failures == [], load.result.summary()

        # 4. Upgrade under load: the new version takes over through a reload.
        t = time.monotonic()
        output = admin.apt_install(second)
        timings["upgrade (apt-get install)"] = time.monotonic() - t
        upgraded = admin.main_pid()
        assert upgraded != reloaded, output
        assert f"reloaded: version {second.version} serves as pid {upgraded} (handed over" in output, output
        assert "FAILED" not in output, output
        assert admin.installed_version() == second.version
        wait_until(lambda: load.result.pids[upgraded] > 0, timeout=10, what=f"a response from pid {upgraded}")
        status, body, _ = get("127.0.0.1", PORT)
        assert status == 200 and pid_of(body) == upgraded and f"version:{second.version},".encode() in body, body
        assert admin.sh("graceful-http --version").stdout.strip() == f"graceful-http {second.version}"
        after = admin.state()
        # A reload, not a restart: the same invocation of the unit, never restarted.
        assert (after["ActiveState"], after["SubState"], after["NRestarts"]) == ("active", "running", "0"), after
        assert after["InvocationID"] == before["InvocationID"], (before, after)
        assert c.show("graceful-http.socket", "ActiveEnterTimestampMonotonic") == socket_since
        load.wait_for_requests(200)
        assert load.result.failures == [], load.result.summary()

        # 5. An upgrade whose code cannot start: the old generation keeps serving and the upgrade says so.
        t = time.monotonic()
        output = admin.apt_install(broken)
        timings["broken upgrade (apt-get install)"] = time.monotonic() - t
        assert admin.installed_version() == broken.version
        assert "the reload into version " + broken.version + " FAILED" in output, output
        assert "reload failed: importing 'graceful_http.demo' raised RuntimeError: broken on purpose" in output, output
        assert f"graceful-http.service is active, pid {upgraded}" in output, output
        kept = admin.state()
        assert (kept["MainPID"], kept["ActiveState"], kept["SubState"], kept["NRestarts"]) == \
               (str(upgraded), "active", "running", "0"), kept
        assert kept["InvocationID"] == before["InvocationID"]
        status, body, _ = get("127.0.0.1", PORT)
        assert status == 200 and pid_of(body) == upgraded and f"version:{second.version},".encode() in body, body
        load.wait_for_requests(200)
    result = load.result
    assert result.failures == [], result.summary()
    assert set(result.pids) == {served_by, reloaded, upgraded}, result.summary()
    journal = c.journal(SERVICE)
    assert "reload failed: importing 'graceful_http.demo' raised RuntimeError" in journal
    whole = admin.sh("journalctl --no-pager -o cat").stdout
    assert "reception only permitted for main PID" not in whole
    assert "which is not our child" not in whole

    # 6. Purge: nothing of the package is left, and nothing listens.
    t = time.monotonic()
    for build in (first, second, broken):
        (admin.root / "root" / build.deb.name).unlink()
    admin.sh(f"DEBIAN_FRONTEND=noninteractive apt-get purge -y {PACKAGE}", timeout=300)
    timings["purge"] = time.monotonic() - t
    assert admin.sh(f"dpkg-query --show --showformat='${{Status}}' {PACKAGE} 2>&1", check=False).stdout \
        in ("", f"dpkg-query: no packages found matching {PACKAGE}\n")
    for unit in [SERVICE, *sockets_shipped()]:
        assert c.show(unit, "LoadState", "ActiveState") == {"LoadState": "not-found", "ActiveState": "inactive"}
    # Removal stopped the service gracefully: it drained and exited by itself, nothing was killed.
    stopped = admin.sh("journalctl --no-pager -o cat").stdout
    assert f"exited: generation 3 (pid {upgraded})" in stopped, stopped[-3000:]
    assert f"{SERVICE}: Deactivated successfully" in stopped, stopped[-3000:]
    assert "SIGKILL" not in stopped and "Killing process" not in stopped, stopped[-3000:]
    leftovers = admin.sh("find / -xdev \\( -name '*graceful-http*' -o -name '*graceful_http*' \\) -print;"
                         " find /run -name '*graceful-http*' -print").stdout.split()
    assert leftovers == [], f"left after purge: {leftovers}"
    assert port_refuses(PORT)
