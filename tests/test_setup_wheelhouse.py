"""scripts/setup and the controller's wheelhouse, end to end: a real controller serves the real
llama-cpp-python wheel scripts/setup built here, and setup installs it into a throwaway venv
without compiling; a wheel or index that is not what the controller signed is refused, and
the venv it would have changed keeps working. setup --publish-to fills a wheelhouse.

Offline but for loopback: pip takes every other dependency from the cached wheelhouse the
container test uses (PIP_NO_INDEX), so nothing could be compiled or downloaded even if setup
tried: a wheel that did not come from the controller would fail the install.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agent.catalog.signing import generate_keypair
from agent.fleet.client import FleetClient
from tests.fleet.conftest import Credentials, make_config
from tests.service.container import ensure_wheelhouse
from tests.support.broker import free_port
from tests.support.engine_wheel import built_engine_wheel

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGE_AGENT_CACHE", Path.home() / ".cache" / "edge-agent"))
SETUP_TIMEOUT_S = 900


class Machine:
    """A device about to run setup: its own source copy, venv and (empty) wheel cache."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.source = root / "edge-agent"
        shutil.copytree(REPO, self.source, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.egg-info", "build", ".hypothesis", "artifacts"))
        self.venv = root / "venv"
        self.wheelhouse = ensure_wheelhouse()

    def env(self, cache: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "VIRTUAL_ENV")}
        return {**env, "PYTHON": sys.executable, "EDGE_AGENT_VENV": str(self.venv),
                "EDGE_AGENT_CACHE": str(cache), "EXTRAS": "signing", "EDGE_AGENT_EDITABLE": "0",
                "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(self.wheelhouse),
                "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}

    def setup(self, *args: str, cache: Path, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.source / "scripts/setup"), *args],
                              env=self.env(cache, **extra), capture_output=True, text=True,
                              timeout=SETUP_TIMEOUT_S)

    def python(self, code: str) -> str:
        return subprocess.run([str(self.venv / "bin/python"), "-c", code], capture_output=True,
                              text=True, check=True, timeout=120).stdout.strip()


class Controller:
    """A real controller (uvicorn, its own signing key) and an API client of it."""

    def __init__(self, service) -> None:
        self.service = service
        self.url = service.url
        self.config = service.config
        self.client = FleetClient(service.url, Credentials.token)
        with urllib.request.urlopen(f"{service.url}/api/signing-key", timeout=10) as answer:
            self.public_key = json.loads(answer.read())["public_key"]


@pytest.fixture(scope="module")
def controller(tmp_path_factory, module_broker):
    from agent.fleet.service import FleetService

    service = FleetService(make_config(tmp_path_factory.mktemp("controller"), module_broker))
    service.start()
    yield Controller(service)
    service.stop()


@pytest.fixture(scope="module")
def machine(tmp_path_factory) -> Machine:
    return Machine(tmp_path_factory.mktemp("device"))


@pytest.fixture(scope="module")
def hosted(controller, tmp_path_factory):
    """The wheel setup built on this machine, added to the wheelhouse under this machine's key."""
    wheel, described = built_engine_wheel(tmp_path_factory.mktemp("key-cache"))
    key = described["key"]
    entry = controller.client.add_wheel(wheel, described)
    return {"wheel": wheel, "key": key, "entry": entry,
            "stored": Path(controller.config.wheel_dir) / entry["path"]}


@pytest.fixture(scope="module")
def installed(controller, machine: Machine, hosted, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    started = time.monotonic()
    done = machine.setup("--wheels-from", controller.url, "--signing-key", controller.public_key,
                         cache=cache)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    print(f"\nsetup with the wheelhouse's wheel: {elapsed:.1f} s (fresh venv, offline deps)")
    return {"log": done.stderr, "cache": cache, "stamp": (machine.venv / ".edge-agent-setup")
            .read_text()}


def test_setup_installs_the_hosted_wheel_without_compiling(installed, machine, hosted) -> None:
    assert "wheelhouse: fetched" in installed["log"]
    assert "building llama-cpp-python" not in installed["log"]
    fetched = list(installed["cache"].glob("wheels/llama-cpp-python-*/llama_cpp_python-*.whl"))
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in fetched] == [
        hosted["entry"]["sha256"]]
    version = machine.python("import llama_cpp; print(llama_cpp.__version__)")
    assert version == hosted["entry"]["version"]
    # What the agent in that venv reports as its build (agent.buildinfo, in meta).
    build = json.loads(machine.python(
        "import json, msgspec; from agent.buildinfo import build_info; "
        "print(json.dumps(msgspec.to_builtins(build_info())))"))
    assert build["engine_key"] == hosted["key"]
    assert build["llama_cpp_python"] == version
    assert build["cmake_args"] == hosted["entry"]["cmake_args"]
    assert build["origin"].startswith("wheelhouse ")


def refused(done: subprocess.CompletedProcess, code: str) -> None:
    assert done.returncode == 3, done.stderr
    assert "refused" in done.stderr and code in done.stderr, done.stderr
    assert "building llama-cpp-python" not in done.stderr


def still_working(machine: Machine, installed, cache: Path) -> None:
    """The venv setup would have changed runs what it ran, and no wheel was kept."""
    assert (machine.venv / ".edge-agent-setup").read_text() == installed["stamp"]
    assert machine.python("import llama_cpp; print(llama_cpp.__version__)")
    assert not list(cache.glob("wheels/*/*.whl"))


def test_a_tampered_wheel_is_refused(controller, machine, hosted, installed,
                                     tmp_path: Path) -> None:
    stored: Path = hosted["stored"]
    original = stored.read_bytes()
    middle = len(original) // 2
    stored.write_bytes(original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1:])
    try:
        done = machine.setup("--wheels-from", controller.url, "--signing-key",
                             controller.public_key, cache=tmp_path)
    finally:
        stored.write_bytes(original)
    refused(done, "checksum_mismatch")
    still_working(machine, installed, tmp_path)


def test_a_tampered_unsigned_or_foreign_index_is_refused(controller, machine, installed,
                                                         range_server, tmp_path: Path) -> None:
    """A mirror (or anyone on the path) serving the controller's index changed, without its
    signature, or signed by another key."""
    import httpx

    index = httpx.get(f"{controller.url}/files/wheels/index.json").content
    signature = httpx.get(f"{controller.url}/files/wheels/index.json.sig").content
    mirror = range_server.root / "files" / "wheels"
    mirror.mkdir(parents=True)
    (mirror / "index.json").write_bytes(index.replace(b"-DGGML_NATIVE=", b"-DGGML_NATIVE =", 1))
    (mirror / "index.json.sig").write_bytes(signature)
    refused(machine.setup("--wheels-from", range_server.url, "--signing-key",
                          controller.public_key, cache=tmp_path), "bad_signature")

    (mirror / "index.json").write_bytes(index)
    (mirror / "index.json.sig").unlink()
    refused(machine.setup("--wheels-from", range_server.url, "--signing-key",
                          controller.public_key, cache=tmp_path), "bad_signature")

    refused(machine.setup("--wheels-from", controller.url, "--signing-key",
                          generate_keypair()[1], cache=tmp_path), "bad_signature")
    still_working(machine, installed, tmp_path)


def test_no_wheel_for_the_key_or_no_controller_means_compiling(controller, machine, installed,
                                                               tmp_path: Path) -> None:
    """Nothing suspicious, so setup says why and compiles (--fetch-only stops before that)."""
    other_hardware = machine.setup("--wheels-from", controller.url, "--signing-key",
                                   controller.public_key, "--fetch-only", cache=tmp_path,
                                   CMAKE_ARGS="-DGGML_VULKAN=ON")
    assert other_hardware.returncode == 0, other_hardware.stderr
    assert "no_wheel" in other_hardware.stderr and "compiling here" in other_hardware.stderr
    gone = machine.setup("--wheels-from", f"http://127.0.0.1:{free_port()}", "--signing-key",
                         controller.public_key, "--fetch-only", cache=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert "fetch_failed" in gone.stderr and "compiling here" in gone.stderr
    assert not list(tmp_path.glob("wheels/*/*.whl"))


def test_publish_to_uploads_this_machines_wheel(module_broker, machine, hosted, installed,
                                                tmp_path: Path) -> None:
    """An up-to-date venv (nothing to install) still publishes: build once, upload anywhere."""
    from agent.fleet.service import FleetService

    service = FleetService(make_config(tmp_path, module_broker)).start()
    try:
        other = Controller(service)
        done = machine.setup("--publish-to", other.url, cache=installed["cache"],
                             EDGE_AGENT_FLEET_TOKEN=Credentials.token)
        assert done.returncode == 0, done.stderr
        assert "up to date" in done.stderr and "published" in done.stderr
        engine = other.client.wheels()["engine"]
    finally:
        service.stop()
    assert [(e["key"], e["sha256"]) for e in engine] == [(hosted["key"],
                                                           hosted["entry"]["sha256"])]
