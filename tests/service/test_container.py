"""scripts/install.sh under a real systemd: a Debian bookworm container (systemd-nspawn
--boot) installs edge-agent from this checkout, and the unit runs the real daemon against
a real mosquitto on the host's loopback, with the SmolLM2 ladder's Q2_K.

Steps share one booted container (booting and installing is the expensive part), so they
are ordered tests over a module fixture; a failed step skips nothing silently, the later
ones fail with the journal in their message.

What makes it fast after the first run: the debootstrap root is cached in
~/.cache/edge-agent/nspawn, the llama.cpp wheel that scripts/setup built on the host is
bind-mounted (same Debian, same CPython 3.11 ABI, and the wheel is py3-none-linux_x86_64,
so setup inside computes the same build key and finds it), and every other dependency
comes from a cached wheelhouse with PIP_NO_INDEX, so nothing is built or downloaded.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.service.container import (
    CACHE,
    REPO,
    Container,
    ensure_base_root,
    ensure_wheelhouse,
    missing_requirements,
)
from tests.support.broker import Broker

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

DEVICE = "nspawn-dev"
UNIT = "edge-agent.service"
PREFIX = f"edge/v1/{DEVICE}"
START_TIMEOUT_S = 300  # model copy + load + canary on two shared cores


class Observer:
    """A host-side MQTT client watching everything the device publishes."""

    def __init__(self, broker: Broker) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="nspawn-observer")
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(f"{PREFIX}/#", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload, m.retain))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def wait_for(self, predicate, timeout_s: float, what: str) -> tuple[str, dict]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                topic, payload, _ = self.messages.get(timeout=left)
            except queue.Empty:
                break
            try:
                record = json.loads(payload)
            except ValueError:
                continue
            if predicate(topic, record):
                return topic, record
        raise AssertionError(f"no {what} within {timeout_s} s")

    def publish(self, topic: str, record: dict) -> None:
        self.client.publish(topic, json.dumps(record), qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    b = Broker(tmp_path_factory.mktemp("nspawn-broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def observer(broker: Broker):
    watcher = Observer(broker)
    yield watcher
    watcher.close()


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory):
    ladder = Path(CACHE / "ladder")
    if not (ladder / "manifest.json").exists():
        pytest.fail(f"no model ladder at {ladder}: run scripts/make-test-models")
    wheels = CACHE / "wheels"
    if not list(wheels.glob("llama-cpp-python-*/llama_cpp_python-*.whl")):
        pytest.fail(f"no llama-cpp-python wheel under {wheels}: run scripts/setup first")
    started = time.monotonic()
    # A snapshot of the checkout: the shared tree changes under a running test, and a
    # changed source is an upgrade to install.sh (it would rightly reinstall and restart).
    source = tmp_path_factory.mktemp("source") / "edge-agent"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", ".hypothesis", "artifacts"))
    base = ensure_base_root()
    wheelhouse = ensure_wheelhouse()
    prepared = time.monotonic()
    ct = Container.from_base(
        base, tmp_path_factory.mktemp("nspawn"), "edge-agent-test",
        {source: "/mnt/edge-agent", wheels: "/mnt/cache/wheels", wheelhouse: "/mnt/wheelhouse",
         ladder: "/mnt/ladder"},
    )
    try:
        ct.boot()
        print(f"\ncontainer: base+wheelhouse {prepared - started:.0f} s, "
              f"copy+boot {time.monotonic() - prepared:.0f} s")
        yield ct
    finally:
        ct.stop()


def install(ct: Container, *args: str) -> str:
    result = ct.run(
        "/mnt/edge-agent/scripts/install.sh", *args,
        env={"EDGE_AGENT_CACHE": "/mnt/cache", "PIP_NO_INDEX": "1",
             "PIP_FIND_LINKS": "/mnt/wheelhouse", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        timeout=900,
    )
    return result.stderr


def wait_active(ct: Container, *, not_pid: str | None = None, timeout_s: float = START_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        props = ct.unit(UNIT)
        if props["ActiveState"] == "active" and props["MainPID"] not in ("0", not_pid):
            return props
        time.sleep(1)
    raise AssertionError(f"{UNIT} not active within {timeout_s} s: {ct.unit(UNIT)['ActiveState']}\n"
                         f"{ct.journal(UNIT)}")


@pytest.fixture(scope="module")
def installed(container: Container, broker: Broker, observer: Observer) -> dict:
    # How an admin pins a variant without touching agent.yaml: a drop-in, made before install.
    container.run("mkdir", "-p", f"/etc/systemd/system/{UNIT}.d")
    container.run("sh", "-c", f"printf '[Service]\\nEnvironment=EDGE_AGENT_MODEL__PIN=Q2_K\\n"
                  f"Environment=EDGE_AGENT_TELEMETRY__INTERVAL_S=2\\n' > /etc/systemd/system/{UNIT}.d/test.conf")
    started = time.monotonic()
    log = install(container, "--device-id", DEVICE, "--broker-host", broker.host,
                  "--broker-port", str(broker.port), "--manifest", "/mnt/ladder/manifest.json")
    installed_at = time.monotonic()
    props = wait_active(container)
    print(f"install.sh {installed_at - started:.0f} s, unit active after "
          f"{time.monotonic() - installed_at:.0f} s more")
    return {"props": props, "log": log}


def test_unit_reaches_active_with_a_readable_status(container: Container, installed: dict) -> None:
    props = installed["props"]
    assert props["Type"] == "notify" and props["SubState"] == "running"
    assert props["StatusText"], "the daemon sent no STATUS= line"
    # The daemon runs as the dedicated user, with the paths the unit gives it.
    status = container.run("cat", f"/proc/{props['MainPID']}/status").stdout
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert container.run("getent", "passwd", uid).stdout.startswith("edge-agent:")
    config = container.run("cat", "/etc/edge-agent/agent.yaml").stdout
    assert f"device_id: {DEVICE}" in config and '"/mnt/ladder/manifest.json"' in config
    modes = container.run("stat", "-c", "%n %a %U %G", "/etc/edge-agent/agent.yaml",
                          "/etc/edge-agent/mqtt-password").stdout.splitlines()
    assert modes == ["/etc/edge-agent/agent.yaml 640 root edge-agent",
                     "/etc/edge-agent/mqtt-password 600 root root"]
    models = container.run("find", "/var/cache/edge-agent/models", "-name", "*.gguf").stdout
    assert "Q2_K" in models, models


def test_prompt_from_the_host_is_answered(installed: dict, observer: Observer) -> None:
    observer.wait_for(lambda t, r: t == f"{PREFIX}/status" and r.get("state") == "ready", 60,
                      "retained status ready")
    observer.publish(f"{PREFIX}/prompt", {"id": "nspawn-1", "prompt": "The capital of France is",
                                          "max_tokens": 8, "temperature": 0})
    topic, final = observer.wait_for(
        lambda t, r: r.get("id") == "nspawn-1" and r.get("done") is True, 120, "final reply"
    )
    assert topic == f"{PREFIX}/reply/nspawn-1"
    assert "error" not in final, final
    assert final["text"] and final["usage"]["completion_tokens"] > 0


def test_install_again_changes_nothing(container: Container, installed: dict) -> None:
    before = container.unit(UNIT)
    container.run("sh", "-c", "echo '# edited by the admin' >> /etc/edge-agent/agent.yaml")
    log = install(container, "--device-id", "someone-else")
    assert "up to date" in log and "left as it is" in log, log
    after = container.unit(UNIT)
    assert after["MainPID"] == before["MainPID"] and after["ActiveState"] == "active"
    config = container.run("cat", "/etc/edge-agent/agent.yaml").stdout
    assert config.endswith("# edited by the admin\n") and "someone-else" not in config


def test_sigkill_of_the_main_process_is_followed_by_a_restart(container: Container, installed: dict,
                                                              observer: Observer) -> None:
    before = container.unit(UNIT)
    # SIGKILL of the main process only (the worker child then loses its parent and exits).
    container.run("systemctl", "kill", "--signal=SIGKILL", "--kill-whom=main", UNIT)
    after = wait_active(container, not_pid=before["MainPID"])
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    observer.wait_for(lambda t, r: t == f"{PREFIX}/status" and r.get("state") == "ready",
                      START_TIMEOUT_S, "status ready after the restart")


def test_systemctl_stop_publishes_stopped_and_exits_cleanly(container: Container, installed: dict,
                                                            observer: Observer) -> None:
    container.run("systemctl", "stop", UNIT, timeout=90)
    observer.wait_for(lambda t, r: t == f"{PREFIX}/status" and r.get("state") == "stopped", 30,
                      "status stopped")
    props = container.unit(UNIT)
    assert props["ActiveState"] == "inactive"
    assert props["Result"] == "success" and props["ExecMainStatus"] == "0", props["Result"]


def test_uninstall_keeps_config_and_models_and_purge_removes_them(container: Container,
                                                                  installed: dict) -> None:
    install(container, "--uninstall")

    def exists(path: str) -> bool:
        return container.run("test", "-e", path, check=False).returncode == 0

    assert not exists("/opt/edge-agent") and not exists(f"/etc/systemd/system/{UNIT}")
    assert not exists("/var/lib/edge-agent")
    assert exists("/etc/edge-agent/agent.yaml")
    assert "Q2_K" in container.run("find", "/var/cache/edge-agent/models", "-name", "*.gguf").stdout
    assert container.unit(UNIT)["LoadState"] == "not-found"

    install(container, "--uninstall", "--purge")
    assert not exists("/etc/edge-agent") and not exists("/var/cache/edge-agent")
    assert container.run("getent", "passwd", "edge-agent", check=False).returncode == 2
