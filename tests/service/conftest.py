"""Fixtures for the service tests: mosquitto running the shipped broker example (TLS,
passwords, ACL) with a throwaway CA, and a small MQTT 5 client that reports the broker's
per-packet reason codes so a refusal is visible, not just a silence."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.broker import free_port, mosquitto_binary

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "systemd" / "mosquitto"
# `all` and `pool` are accounts an operator should never create; the ACL must hold if one does.
PASSWORDS = {"dev-a": "secret-a", "dev-b": "secret-b", "controller": "secret-ctl",
             "all": "secret-all", "pool": "secret-pool", "app-1": "secret-app"}


def make_ca_and_broker_cert(directory: Path) -> None:
    """A CA and a broker certificate for localhost/127.0.0.1, as an operator would make them."""
    directory.mkdir(parents=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=edge-agent test CA")
    openssl("req", *ec, "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost")
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "broker.crt", "-days", "2", "-extfile", "san.ext")


def replace_once(text: str, old: str, new: str) -> str:
    # The test runs the shipped example; if its shape changes, fail here, loudly.
    assert text.count(old) == 1, f"expected exactly one {old!r} in the example config"
    return text.replace(old, new)


@dataclass
class AclBroker:
    workdir: Path
    tls_port: int
    plain_port: int
    ca_file: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        return (self.workdir / "mosquitto.log").read_text(errors="replace")


@pytest.fixture
def acl_text() -> str:
    """The ACL the broker runs: the shipped example; a test module overrides this fixture."""
    return (EXAMPLE_DIR / "edge-agent.acl").read_text()


@pytest.fixture
def acl_broker(tmp_path: Path, acl_text: str):
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("openssl and mosquitto_passwd are needed to run the broker example")
    work = tmp_path / "mosquitto"
    make_ca_and_broker_cert(work / "certs")
    passwd = work / "edge-agent.passwd"
    for index, (user, password) in enumerate(PASSWORDS.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run(["mosquitto_passwd", *create, "-b", str(passwd), user, password],
                       check=True, capture_output=True, timeout=30)
    (work / "edge-agent.acl").write_text(acl_text)

    broker = AclBroker(work, free_port(), free_port(), work / "certs" / "ca.crt")
    conf = (EXAMPLE_DIR / "edge-agent.conf").read_text()
    conf = conf.replace("/etc/mosquitto/", f"{work}/")
    conf = replace_once(conf, "listener 8883\n", f"listener {broker.tls_port} 127.0.0.1\n")
    conf = replace_once(conf, "listener 1883 127.0.0.1\n", f"listener {broker.plain_port} 127.0.0.1\n")
    # As root mosquitto would switch to user "mosquitto", which cannot read this tmp dir.
    conf += "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
    conf += "user root\n" if os.geteuid() == 0 else ""
    (work / "mosquitto.conf").write_text(conf)

    log = open(work / "mosquitto.log", "ab")
    broker.process = subprocess.Popen([mosquitto_binary(), "-c", str(work / "mosquitto.conf")],
                                      stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        if broker.process.poll() is not None:
            pytest.fail(f"mosquitto refused the example config:\n{broker.log}")
        try:
            socket.create_connection(("127.0.0.1", broker.tls_port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not listen within 10 s:\n{broker.log}")
            time.sleep(0.05)
    yield broker
    broker.process.terminate()
    broker.process.wait(timeout=10)
    log.close()


@dataclass
class ReasonClient:
    """One MQTT 5 connection; every message it receives lands in ``messages``."""

    client: mqtt.Client
    messages: "queue.Queue[mqtt.MQTTMessage]" = field(default_factory=queue.Queue)
    acks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    acked: threading.Condition = field(default_factory=threading.Condition)
    connect_reason: ReasonCode | None = None
    seen: list[tuple[str, str]] = field(default_factory=list)  # what wait_for has read so far

    def _wait_ack(self, mid: int, timeout: float = 5.0) -> list[ReasonCode]:
        with self.acked:
            if not self.acked.wait_for(lambda: mid in self.acks, timeout):
                raise AssertionError(f"no ack for packet {mid} within {timeout} s")
            return self.acks.pop(mid)

    def subscribe(self, topic: str) -> ReasonCode:
        result, mid = self.client.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        return self._wait_ack(mid)[0]

    def publish(self, topic: str, payload: str, *, retain: bool = False) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._wait_ack(info.mid)[0]

    def received(self, within_s: float = 1.0) -> list[tuple[str, str]]:
        """Everything that arrives within ``within_s`` (for "nothing arrives" checks too)."""
        got = []
        deadline = time.monotonic() + within_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                break
            got.append((message.topic, message.payload.decode()))
        return got

    def wait_for(self, match, timeout: float = 60.0) -> tuple[str, str]:
        """The first message for which ``match(topic, payload)`` holds; all seen are kept."""
        deadline = time.monotonic() + timeout
        while True:
            for topic, payload in self.seen:
                if match(topic, payload):
                    return topic, payload
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing matched within {timeout} s; got {self.seen[-10:]}")
            self.seen += self.received(within_s=0.2)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def connect_as(acl_broker: AclBroker):
    """``connect_as(user, password=None, tls=True)`` -> a connected ReasonClient (or the
    refusal reason in ``connect_reason`` when the broker says no)."""
    clients: list[ReasonClient] = []

    def connect(user: str | None, password: str | None = None, *, tls: bool = True) -> ReasonClient:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user or 'anon'}-{len(clients)}",
                             protocol=mqtt.MQTTv5)
        wrapper = ReasonClient(client)
        connected = threading.Event()

        def on_connect(_c, _u, _flags, reason_code, _props) -> None:
            wrapper.connect_reason = reason_code
            connected.set()

        def on_ack(_c, _u, mid, reason_codes, _props) -> None:
            codes = reason_codes if isinstance(reason_codes, list) else [reason_codes]
            with wrapper.acked:
                wrapper.acks[mid] = codes
                wrapper.acked.notify_all()

        client.on_connect = on_connect
        client.on_subscribe = on_ack
        client.on_publish = on_ack
        client.on_message = lambda _c, _u, message: wrapper.messages.put(message)
        if user is not None:
            client.username_pw_set(user, PASSWORDS.get(user) if password is None else password)
        if tls:
            client.tls_set(ca_certs=str(acl_broker.ca_file))
            port = acl_broker.tls_port
        else:
            port = acl_broker.plain_port
        client.connect("localhost", port, keepalive=30)
        client.loop_start()
        clients.append(wrapper)
        assert connected.wait(10), "no CONNACK within 10 s"
        return wrapper

    yield connect
    for wrapper in clients:
        wrapper.close()


@pytest.fixture
def agent_as(acl_broker: AclBroker, tmp_path: Path, ladder_dir: Path):
    """``agent_as(device_id, **mqtt)`` -> a real `edge-agent run` logged in as ``device_id``
    over the example's TLS listener (host name verified against the test CA), READY."""
    from types import SimpleNamespace

    from tests.support.daemon import RunningDaemon, wait_ready

    agents: list[RunningDaemon] = []

    def start(device_id: str, **mqtt_settings) -> RunningDaemon:
        work = tmp_path / f"agent-{device_id}"
        work.mkdir()
        (work / "mqtt-password").write_text(PASSWORDS[device_id])
        endpoint = SimpleNamespace(host="localhost", port=acl_broker.tls_port)
        agent = RunningDaemon(work, endpoint, ladder_dir, device_id=device_id, mqtt={
            "tls": {"enabled": True, "ca_file": str(acl_broker.ca_file)},
            "password_file": str(work / "mqtt-password"), **mqtt_settings})
        agents.append(agent.start())
        wait_ready(agent)  # READY=1 comes only once the broker took the connection
        return agent

    yield start
    for agent in agents:
        agent.close()
