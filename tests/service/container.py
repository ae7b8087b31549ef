"""A real systemd in a systemd-nspawn container, for the install.sh end-to-end test.

The Debian bookworm root is made once with debootstrap and kept outside the repository
(``~/.cache/edge-agent/nspawn/bookworm-base``); each test boots a copy of it. The container
shares the host's network (no --private-network), so the daemon inside reaches a broker
the test runs on the host's loopback. Commands run inside through ``nsenter`` into the
container's PID 1: this host's PID 1 is not systemd, so there is no machined for
``machinectl``/``systemd-run -M``.

Must not: touch the host's systemd, or leave a container running after ``stop()``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import requires
from pathlib import Path

from tests.support.capabilities import missing_reason

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EDGE_AGENT_CACHE", Path.home() / ".cache" / "edge-agent"))
NSPAWN_CACHE = CACHE / "nspawn"
SUITE = "bookworm"
# What the device needs beyond a minimal Debian: an init, D-Bus for systemctl, Python with
# venv, CA certificates for TLS, and libgomp for llama.cpp's OpenMP threads.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates",
            "libgomp1")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Mounts and namespaces (nspawn, nsenter), chroot and device nodes (debootstrap), file owners.
NSPAWN_CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_CHOWN",
                       "CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE")


def missing_requirements() -> str | None:
    """Why the container test cannot run here, or None."""
    lacking = missing_reason("systemd-nspawn and debootstrap", *NSPAWN_CAPABILITIES)
    if lacking:
        return lacking
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install systemd-container debootstrap)"
    return None


def debian_mirror() -> str:
    """The Debian mirror apt uses on this host, so debootstrap reaches what apt reaches."""
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in sources.read_text().split("\n\n"):
            if re.search(rf"^Suites:.*\b{SUITE}\b", stanza, re.M) and "debian-security" not in stanza:
                if match := re.search(r"^URIs:\s*(\S+)", stanza, re.M):
                    return match.group(1)
    lists = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]
    for sources in lists:
        if sources.exists():
            for match in re.finditer(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", sources.read_text(), re.M):
                if "security" not in match.group(1):
                    return match.group(1)
    return DEFAULT_MIRROR


def ensure_base_root() -> Path:
    """The cached debootstrap root; built (about a minute here) when missing or stale."""
    base = NSPAWN_CACHE / f"{SUITE}-base"
    marker = base / ".edge-agent-base"
    wanted = ",".join(PACKAGES)
    if marker.exists() and marker.read_text() == wanted:
        return base
    NSPAWN_CACHE.mkdir(parents=True, exist_ok=True)
    building = NSPAWN_CACHE / f"{SUITE}-base.tmp"
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={wanted}", SUITE, str(building),
         debian_mirror()],
        check=True, capture_output=True, timeout=1800,
    )
    (building / ".edge-agent-base").write_text(wanted)
    shutil.rmtree(base, ignore_errors=True)
    building.rename(base)
    return base


def ensure_wheelhouse() -> Path:
    """Wheels of every dependency except llama-cpp-python, so install.sh inside the
    container installs offline (PIP_NO_INDEX) instead of from PyPI on every run."""
    requirements = []
    # The installed metadata of both: the llama.cpp wheel itself comes from setup's cache.
    # The extras install.sh --fleet installs: the controller runs in the container too.
    wanted_extras = ('extra == "signing"', 'extra == "fleet"')
    for requirement in (requires("edge-agent") or []) + (requires("llama-cpp-python") or []):
        spec, _, marker = requirement.partition(";")
        if spec.startswith("llama-cpp-python") or (
                marker and not any(extra in marker for extra in wanted_extras)):
            continue
        requirements.append(spec.strip())
    requirements += ["pip", "setuptools>=68", "wheel"]  # setup upgrades pip; the build backend
    key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:16]
    wheelhouse = NSPAWN_CACHE / f"wheelhouse-{key}"
    if (wheelhouse / ".complete").exists():
        return wheelhouse
    building = wheelhouse.with_suffix(".tmp")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(building),
         *requirements],
        check=True, capture_output=True, timeout=900,
    )
    (building / ".complete").write_text("\n".join(requirements))
    shutil.rmtree(wheelhouse, ignore_errors=True)
    building.rename(wheelhouse)
    return wheelhouse


class Container:
    """One booted copy of the base root. ``run()`` executes inside it as root."""

    def __init__(self, root: Path, name: str, binds: dict[Path, str]) -> None:
        self.root = root
        self.name = name
        self.binds = binds
        self.process: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self.console_log = root.parent / f"{name}-console.log"

    @classmethod
    def from_base(cls, base: Path, workdir: Path, name: str, binds: dict[Path, str]) -> "Container":
        root = workdir / "root"
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True, timeout=600)
        return cls(root, name, binds)

    def boot(self, timeout_s: float = 120) -> "Container":
        args = ["systemd-nspawn", "-D", str(self.root), "--boot", "--machine", self.name,
                "--register=no", "--keep-unit", "--console=passive"]
        args += [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        with open(self.console_log, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while self.leader is None:
            self._check_alive()
            self.leader = self._child_named("systemd")
            if time.monotonic() > deadline:
                raise RuntimeError(f"container did not start:\n{self.console_log.read_text()}")
            time.sleep(0.2)
        # Until the container's systemd has its private socket up, systemctl cannot connect.
        while True:
            self._check_alive()
            left = deadline - time.monotonic()
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=max(left, 1))
            if state.stdout.strip() in ("running", "degraded"):
                return self
            if left <= 0:
                raise RuntimeError(f"container boot: {state.stdout}{state.stderr}")
            time.sleep(0.5)

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited:\n{self.console_log.read_text()}")

    def _child_named(self, comm: str) -> int | None:
        assert self.process is not None
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            except OSError:
                continue
            if fields.get("PPid", "").strip() == str(self.process.pid) and fields.get("Name", "").strip() == comm:
                return int(status.parent.name)
        return None

    def run(self, *command: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces), with a clean environment."""
        assert self.leader is not None, "boot() first"
        environment = {"PATH": CONTAINER_PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i",
             *(f"{k}={v}" for k, v in environment.items()), *command],
            capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def unit(self, name: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit, as a dict."""
        out = self.run("systemctl", "show", name, "--no-pager").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, lines: int = 80) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-n", str(lines), check=False).stdout

    def stop(self, timeout_s: float = 60) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGTERM makes systemd-nspawn ask the container's systemd for a clean poweroff.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
