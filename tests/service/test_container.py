"""scripts/install.sh under a real systemd: a Debian bookworm container (systemd-nspawn
--boot) installs edge-agent from this checkout, and the unit runs the real daemon against
a real mosquitto on the host's loopback, with the SmolLM2 ladder's Q2_K.

Steps share one booted container (booting and installing is the expensive part), so they
are ordered tests over a module fixture; a failed step skips nothing silently, the later
ones fail with the journal in their message.

What makes it fast after the first run: the debootstrap root is cached in
~/.cache/edge-agent/nspawn; the llama.cpp wheel that scripts/setup built on the host comes
from a controller's wheelhouse on the host (install.sh --wheels-from: same Debian, same
CPython 3.11 ABI, so setup inside computes the same build key, and the container has no
compiler); every other dependency comes from a cached wheelhouse with PIP_NO_INDEX, so
nothing is built or downloaded.
"""

from __future__ import annotations

import json
import queue
import secrets
import shutil
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import __version__
from agent.errors import EdgeAgentError
from agent.fleet.auth import hash_secret
from agent.fleet.client import FleetClient
from tests.fleet.conftest import Credentials, make_config
from tests.service.container import (
    CACHE,
    REPO,
    Container,
    ensure_base_root,
    ensure_wheelhouse,
    missing_requirements,
)
from tests.support.agent_wheels import build_agent_wheel
from tests.support.broker import Broker, free_port
from tests.support.engine_wheel import built_engine_wheel
from tests.support.signing import TEST_PRIVATE_KEY, TEST_PUBLIC_KEY, sign_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

DEVICE = "nspawn-dev"
UNIT = "edge-agent.service"
FLEET_UNIT = "edge-fleet.service"
# Where the admin checked the source out: their own user, a umask of 002 (group-writable
# files), as on a desktop. install.sh must not carry either into the tree root runs.
CHECKOUT = "/home/dev/edge-agent"
DEVICE_CACHE = "/var/tmp/edge-agent-cache"  # setup's engine cache on the device, empty at first
PREFIX = f"edge/v1/{DEVICE}"
RELEASES = "/opt/edge-agent/releases"
START_TIMEOUT_S = 300  # model copy + load + canary on two shared cores
FLEET_TOKEN = secrets.token_urlsafe(32)  # the in-container controller's API token (hashed in fleet.yaml)
NEW_VERSION = f"{__version__}.post1"
BROKEN_VERSION = f"{__version__}.post2"  # its `edge-agent run` exits at once


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

    def wait_for_all(self, predicates: dict, timeout_s: float) -> dict[str, dict]:
        """The first record matching each named predicate, whatever order they arrive in."""
        found: dict[str, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(found) < len(predicates):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"within {timeout_s} s only {sorted(found)} of {sorted(predicates)}")
            try:
                topic, payload, _ = self.messages.get(timeout=left)
                record = json.loads(payload)
            except (queue.Empty, ValueError):
                continue
            for name, predicate in predicates.items():
                if name not in found and predicate(topic, record):
                    found[name] = record
        return found

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
    sign_file(ladder / "manifest.json")
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
        {source: "/mnt/edge-agent", wheelhouse: "/mnt/wheelhouse",
         ladder: "/mnt/ladder"},
    )
    try:
        ct.boot()
        print(f"\ncontainer: base+wheelhouse {prepared - started:.0f} s, "
              f"copy+boot {time.monotonic() - prepared:.0f} s")
        yield ct
    finally:
        ct.stop()


@pytest.fixture(scope="module")
def engine_wheelhouse(tmp_path_factory: pytest.TempPathFactory):
    """A controller on the host (the container shares its network) whose wheelhouse holds the
    llama.cpp wheel setup built here, its index signed with the key the device pins. On a
    broker of its own: on the device's, it would take half the events of the shared
    subscription from the container's controller, which drives the rollouts below."""
    from agent.fleet.service import FleetService

    root = tmp_path_factory.mktemp("wheelhouse-controller")
    key = root / "signing.key"  # beside db_path: the controller's manifest key
    key.write_text(TEST_PRIVATE_KEY + "\n")
    key.chmod(0o600)
    own_broker = Broker(root / "broker").start()
    service = FleetService(make_config(root, own_broker)).start()
    try:
        wheel, described = built_engine_wheel(tmp_path_factory.mktemp("key-cache"))
        FleetClient(service.url, Credentials.token).add_wheel(wheel, described)
        yield service.url
    finally:
        service.stop()
        own_broker.stop()


def install(ct: Container, *args: str) -> str:
    result = ct.run(
        f"{CHECKOUT}/scripts/install.sh", *args,
        # An empty engine cache: the first install takes llama.cpp from --wheels-from.
        env={"EDGE_AGENT_CACHE": DEVICE_CACHE, "PIP_NO_INDEX": "1",
             "PIP_FIND_LINKS": "/mnt/wheelhouse", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        timeout=900,
    )
    return result.stderr


def wait_active(ct: Container, *, not_pid: str | None = None, timeout_s: float = START_TIMEOUT_S,
                unit: str = UNIT) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        props = ct.unit(unit)
        if props["ActiveState"] == "active" and props["MainPID"] not in ("0", not_pid):
            return props
        time.sleep(1)
    raise AssertionError(f"{unit} not active within {timeout_s} s: {ct.unit(unit)['ActiveState']}\n"
                         f"{ct.journal(unit)}")


def user_of(ct: Container, pid: str) -> str:
    status = ct.run("cat", f"/proc/{pid}/status").stdout
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    return ct.run("getent", "passwd", uid).stdout.split(":")[0]


def as_user(ct: Container, user: str, script: str):
    """``sh -c script`` as ``user`` (uid, gid and supplementary groups), as a daemon of it would."""
    return ct.run("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                  "sh", "-c", script, check=False)


@pytest.fixture(scope="module")
def installed(container: Container, broker: Broker, observer: Observer,
              engine_wheelhouse: str) -> dict:
    # How an admin pins a variant without touching agent.yaml: a drop-in, made before install.
    container.run("mkdir", "-p", f"/etc/systemd/system/{UNIT}.d")
    container.run("sh", "-c", f"printf '[Service]\\nEnvironment=EDGE_AGENT_MODEL__PIN=Q2_K\\n"
                  f"Environment=EDGE_AGENT_TELEMETRY__INTERVAL_S=2\\n' > /etc/systemd/system/{UNIT}.d/test.conf")
    container.run("useradd", "--create-home", "dev")
    container.run("cp", "-r", "/mnt/edge-agent", CHECKOUT)
    container.run("chown", "-R", "dev:dev", CHECKOUT)
    container.run("chmod", "-R", "g+w", CHECKOUT)
    # The controller on the same host, with its own config (an admin writes it first).
    container.run("mkdir", "-p", "/etc/edge-agent")
    http_port = free_port()
    # A quoted delimiter: the token hash holds '$', and nothing in here is for the shell.
    container.run("sh", "-c", f"""cat > /etc/edge-agent/fleet.yaml <<'EOF'
mqtt: {{host: {broker.host}, port: {broker.port}}}
http_port: {http_port}
db_path: /var/lib/edge-fleet/fleet.db
model_dir: /var/cache/edge-fleet/models
wheel_dir: /var/lib/edge-fleet/wheels
auth: {{api_token_hashes: ["{hash_secret(FLEET_TOKEN, method='sha256')}"]}}
EOF""")
    started = time.monotonic()
    log = install(container, "--fleet", "--device-id", DEVICE, "--broker-host", broker.host,
                  "--broker-port", str(broker.port), "--manifest", "/mnt/ladder/manifest.json",
                  "--signing-key", TEST_PUBLIC_KEY,  # the ladder is signed with the test key
                  "--wheels-from", engine_wheelhouse)
    installed_at = time.monotonic()
    props = wait_active(container)
    print(f"install.sh {installed_at - started:.0f} s, unit active after "
          f"{time.monotonic() - installed_at:.0f} s more")
    return {"props": props, "log": log, "controller": f"http://127.0.0.1:{http_port}"}


def test_the_engine_came_from_the_wheelhouse_with_no_compiler_here(container: Container,
                                                                    installed: dict) -> None:
    assert "wheelhouse: fetched llama_cpp_python-" in installed["log"], installed["log"][-2000:]
    assert "nothing to compile" in installed["log"] and "building llama-cpp-python" not in \
        installed["log"]
    toolchain = container.run("sh", "-c", "command -v cc gcc g++ c++ cmake make", check=False)
    assert toolchain.stdout.strip() == "", toolchain.stdout


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


def test_the_installed_tree_is_roots_however_the_checkout_was_owned(container: Container,
                                                                  installed: dict) -> None:
    # releases/ alone is the agent's (the versions `upgrade` installs); root runs nothing there.
    not_releases = ("-path", f"{RELEASES}", "-prune", "-o")
    foreign = container.run("find", "/opt/edge-agent", *not_releases, "(", "!", "-user", "root",
                            "-o", "!", "-group", "root", ")", "-print").stdout.splitlines()
    assert foreign == [], f"{len(foreign)} paths not root:root, e.g. {foreign[:5]}"
    writable = container.run("find", "/opt/edge-agent", *not_releases, "!", "-type", "l", "-perm",
                             "/022", "-print").stdout.splitlines()
    assert writable == [], f"{len(writable)} group/world-writable paths, e.g. {writable[:5]}"
    # The user who owns the checkout cannot change what root runs.
    refused = as_user(container, "dev", "echo x >> /opt/edge-agent/src/agent/__init__.py")
    assert refused.returncode != 0
    assert container.run("stat", "-c", "%a %U", RELEASES).stdout.split() == ["755", "edge-agent"]
    assert container.run("readlink", f"{RELEASES}/current").stdout.strip() == "/opt/edge-agent/venv"


def test_the_controller_runs_as_its_own_user_out_of_the_agents_reach(container: Container,
                                                                     installed: dict) -> None:
    fleet = wait_active(container, unit=FLEET_UNIT, timeout_s=60)
    deadline = time.monotonic() + 60
    while container.run("test", "-s", "/var/lib/edge-fleet/fleet.db", check=False).returncode:
        assert time.monotonic() < deadline, f"no fleet.db:\n{container.journal(FLEET_UNIT)}"
        time.sleep(1)
    agent_pid = container.unit(UNIT)["MainPID"]
    assert user_of(container, agent_pid) == "edge-agent"
    assert user_of(container, fleet["MainPID"]) == "edge-fleet"
    # What a compromised agent daemon could try, with the agent's uid and groups.
    read = as_user(container, "edge-agent", "cat /var/lib/edge-fleet/fleet.db > /dev/null")
    assert read.returncode != 0 and "Permission denied" in read.stderr
    signal = as_user(container, "edge-agent", f"kill -0 {fleet['MainPID']}")
    assert signal.returncode != 0, "the agent's user may signal the controller"
    assert container.run("stat", "-c", "%a %U", "/var/lib/edge-fleet").stdout.split() == [
        "700", "edge-fleet"]


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
    log = install(container, "--fleet", "--device-id", "someone-else")
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


# -- agent upgrades (agent/upgrade.py, rollouts of kind upgrade) ------------------------------
# Each upgrade is a start of the unit (a rolled-back one two): with the starts above, these
# tests stay within the unit's StartLimitBurst=5 per StartLimitIntervalSec=10min.

@pytest.fixture(scope="module")
def fleet(container: Container, installed: dict) -> FleetClient:
    """The controller in the container (edge-fleet.service), through its HTTP API. It signs
    with the test key, the one the device pinned (install.sh --signing-key), so the device
    takes the wheelhouse's signed index as it takes the ladder's signed manifest."""
    key = "/var/lib/edge-fleet/signing.key"
    container.run("sh", "-c", f"umask 077 && echo '{TEST_PRIVATE_KEY}' > {key} && "
                  f"chown edge-fleet:edge-fleet {key}")
    container.run("systemctl", "restart", FLEET_UNIT)
    client = FleetClient(installed["controller"], FLEET_TOKEN)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.devices()
            return client
        except EdgeAgentError:
            assert time.monotonic() < deadline, "the controller's API did not answer"
            time.sleep(1)


@pytest.fixture(scope="module")
def hosted_wheels(fleet: FleetClient, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two locally built versions in the controller's wheelhouse: one good, one that exits
    at start. Returns each one's ``upgrade`` args, as the controller serves it."""
    out = tmp_path_factory.mktemp("agent-wheels")
    for version in (NEW_VERSION, BROKEN_VERSION):
        fleet.add_wheel(build_agent_wheel(out, version, find_links=ensure_wheelhouse(),
                                          fail_at_start=version == BROKEN_VERSION), {})
    base = f"{fleet.url}/files/wheels/"
    return {w["version"]: {"version": w["version"], "url": base + w["path"], "sha256": w["sha256"],
                           "size": w["size"]} for w in fleet.wheels()["agent"]}


def result_of(command_id: str):
    return lambda t, r: t == f"{PREFIX}/cmd/result" and r.get("id") == command_id


def event(name: str):
    return lambda t, r: t == f"{PREFIX}/events" and r.get("event") == name


def ready_as(version: str):
    return lambda t, r: t == f"{PREFIX}/status" and r.get("state") == "ready" and r.get("version") == version


def releases(ct: Container) -> dict:
    return json.loads(ct.run("/opt/edge-agent/venv/bin/edge-agent", "releases", "show").stdout)


def rollout_to(fleet: FleetClient, version: str) -> dict:
    """An upgrade rollout of this one device, followed until it is over."""
    rollout = fleet.start_rollout({"kind": "upgrade", "version": version, "devices": [DEVICE],
                                   "soak_s": 2})
    deadline = time.monotonic() + START_TIMEOUT_S
    while (rollout := fleet.rollout(rollout["id"]))["state"] in ("running", "aborting",
                                                                  "rolling_back"):
        assert time.monotonic() < deadline, f"rollout still {rollout['state']}: {rollout}"
        time.sleep(1)
    return rollout


def refused_upgrade(observer: Observer, command_id: str, args: dict) -> str:
    """Send an upgrade that must be refused; the error code of its result (and event)."""
    observer.publish(f"{PREFIX}/cmd", {"id": command_id, "op": "upgrade", "args": args})
    seen = observer.wait_for_all({"result": result_of(command_id),
                                  "event": event("agent_upgrade_refused")}, 120)
    assert seen["result"]["ok"] is False, seen
    assert seen["result"]["error"]["code"] == seen["event"]["error"]["code"]
    return seen["result"]["error"]["code"]


def test_a_tampered_agent_wheel_is_refused_and_the_device_keeps_running(
        container: Container, installed: dict, observer: Observer, hosted_wheels: dict) -> None:
    before = container.unit(UNIT)
    # A sha256 the controller's signed index does not vouch for: refused before any download.
    tampered = {**hosted_wheels[BROKEN_VERSION], "sha256": "0" * 64}
    assert refused_upgrade(observer, "upgrade-unsigned", tampered) == "bad_signature"
    # The controller's stored wheel altered (same size): the signed sha256 catches the bytes.
    stored = "/var/lib/edge-fleet/wheels/" + hosted_wheels[BROKEN_VERSION]["url"].split(
        "/files/wheels/", 1)[1]
    flip = f"p='{stored}'; b=bytearray(open(p,'rb').read()); b[-100]^=1; open(p,'wb').write(b)"
    container.run("python3", "-c", flip)
    try:
        code = refused_upgrade(observer, "upgrade-tampered", hosted_wheels[BROKEN_VERSION])
    finally:
        container.run("python3", "-c", flip)  # flipped back: the next test installs it
    assert code == "checksum_mismatch"
    after = container.unit(UNIT)
    assert after["MainPID"] == before["MainPID"] and after["ActiveState"] == "active"
    state = releases(container)
    assert state["current"] == "/opt/edge-agent/venv" and state["versions"] == []


def test_a_rollout_of_kind_upgrade_moves_the_device_to_the_new_version(
        container: Container, installed: dict, observer: Observer, fleet: FleetClient,
        hosted_wheels: dict) -> None:
    before = container.unit(UNIT)
    rollout = rollout_to(fleet, NEW_VERSION)
    assert rollout["state"] == "completed", rollout
    assert [s["outcome"] for s in rollout["devices"]] == ["succeeded"], rollout["devices"]
    seen = observer.wait_for_all({"upgraded": event("agent_upgraded"),
                                  "ready": ready_as(NEW_VERSION)}, START_TIMEOUT_S)
    assert seen["upgraded"]["version"] == seen["upgraded"]["running"] == NEW_VERSION
    assert seen["upgraded"]["previous_version"] == __version__
    assert fleet.device(DEVICE)["row"]["version"] == NEW_VERSION
    after = wait_active(container, not_pid=before["MainPID"])
    # The exit for the upgrade is no failure: systemd restarted it as one of its own.
    assert after["Result"] == "success"
    state = releases(container)
    assert state["current"] == f"{RELEASES}/{NEW_VERSION}" and state["trial"] is None
    assert state["previous"] == "/opt/edge-agent/venv"
    assert user_of(container, after["MainPID"]) == "edge-agent"


def test_a_rollout_to_a_version_that_fails_at_start_is_rolled_back_by_the_device(
        container: Container, installed: dict, observer: Observer, fleet: FleetClient,
        hosted_wheels: dict) -> None:
    # Nobody acts on the device: systemd starts the broken version, it exits, the guard
    # before the next start puts the previous version back, and that one reports it.
    rollout = rollout_to(fleet, BROKEN_VERSION)
    assert rollout["state"] == "aborted", rollout
    [step] = rollout["devices"]
    assert step["outcome"] == "failed" and "agent_rolled_back" in step["error"], step
    assert step["state"] == "rolled_back", step
    seen = observer.wait_for_all({"rolled_back": event("agent_rolled_back"),
                                  "ready": ready_as(NEW_VERSION)}, START_TIMEOUT_S)
    assert seen["rolled_back"]["version"] == BROKEN_VERSION
    assert seen["rolled_back"]["running"] == NEW_VERSION
    assert fleet.device(DEVICE)["row"]["version"] == NEW_VERSION
    journal = container.journal(UNIT, lines=400)
    assert "a test build made to fail at start" in journal, journal
    state = releases(container)
    assert state["current"] == f"{RELEASES}/{NEW_VERSION}" and state["trial"] is None
    assert wait_active(container)["ActiveState"] == "active"


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
    for user in ("edge-agent", "edge-fleet"):
        assert container.run("getent", "passwd", user, check=False).returncode == 2
