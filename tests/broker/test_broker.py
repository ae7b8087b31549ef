"""The embedded broker, driven by real clients: paho-mqtt 2.x (MQTT 5 and 3.1.1), the
mosquitto_pub/mosquitto_sub CLIs, and a raw socket for what no well-behaved client sends.

Tests that describe plain MQTT behaviour run against the embedded broker AND a real
Mosquitto (``any_broker``), so they check the protocol, not this implementation's reading
of it. Tests of the embedded broker's own choices (QoS 2 policy, queue bound, reason codes
for garbage) run against it alone.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.broker import EmbeddedBroker, topic_matches, valid_topic_filter, valid_topic_name
from agent.mqtt.topics import is_valid_filter, is_valid_publish_topic
from tests.support.broker import Broker, free_port

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Endpoint:
    kind: str
    port: int


@pytest.fixture
def embedded():
    broker = EmbeddedBroker()
    port = broker.run_in_thread()
    yield Endpoint("embedded", port)
    broker.stop_thread()


@pytest.fixture(params=["embedded", "mosquitto"])
def any_broker(request, tmp_path):
    if request.param == "embedded":
        broker = EmbeddedBroker()
        yield Endpoint("embedded", broker.run_in_thread())
        broker.stop_thread()
    else:
        mosquitto = Broker(tmp_path / "mosquitto", persistence=False).start()
        yield Endpoint("mosquitto", mosquitto.port)
        mosquitto.stop()


# ---------------------------------------------------------------------------- clients


class Peer:
    """A real paho client that records what it receives; no automatic reconnect, so a
    broker-side disconnect stays visible."""

    def __init__(self, port: int, client_id: str = "", *, v5: bool = True, clean: bool = True,
                 session_expiry: int | None = None, will: dict | None = None,
                 keepalive: int = 30) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subscribed = threading.Event()
        self.session_present: bool | None = None
        self.connect_properties = None
        self.disconnect_reason: ReasonCode | None = None
        self.granted: list[int] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else clean, reconnect_on_failure=False)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda client, userdata, message: self.messages.put(message)
        if will:
            self.client.will_set(**will)
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            if session_expiry is not None:
                properties.SessionExpiryInterval = session_expiry
        self.client.connect(HOST, port, keepalive=keepalive,
                            clean_start=clean if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                            properties=properties)
        self.client.loop_start()
        assert self.connected.wait(5), "no CONNACK"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.session_present = flags.session_present
        self.connect_properties = properties
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnect_reason = reason_code
        self.disconnected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.granted = [code.value for code in reason_codes]
        self.subscribed.set()

    def subscribe(self, topic: str, qos: int = 1, **options) -> list[int]:
        self.subscribed.clear()
        if options:
            self.client.subscribe(topic, options=SubscribeOptions(qos=qos, **options))
        else:
            self.client.subscribe(topic, qos)
        assert self.subscribed.wait(5), "no SUBACK"
        return self.granted

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(5)
        assert info.is_published()

    def next(self, timeout_s: float = 5.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout_s)

    def take(self, count: int, timeout_s: float = 5.0) -> list[mqtt.MQTTMessage]:
        return [self.next(timeout_s) for _ in range(count)]

    def assert_silent(self, for_s: float = 0.4) -> None:
        try:
            message = self.messages.get(timeout=for_s)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message on {message.topic}: {message.payload!r}")

    def close(self, reason: ReasonCode | None = None) -> None:
        self.client.disconnect(reasoncode=reason)
        self.client.loop_stop()


def round_trip(port: int, topic: str = "health/check") -> None:
    """Proof that the broker still serves: a fresh subscriber gets a fresh message."""
    listener = Peer(port)
    listener.subscribe(topic)
    talker = Peer(port, v5=False)
    talker.publish(topic, b"alive")
    assert listener.next().payload == b"alive"
    listener.close()
    talker.close()


def mosquitto_pub(port: int, topic: str, payload: str, *args: str) -> None:
    subprocess.run(["mosquitto_pub", "-h", HOST, "-p", str(port), "-t", topic, "-m", payload,
                    *args], check=True, timeout=10, capture_output=True)


def start_mosquitto_sub(port: int, *args: str) -> subprocess.Popen[bytes]:
    """A mosquitto_sub process; returns once it has its CONNACK (printed by -d)."""
    # stdbuf: mosquitto_sub's debug lines are block-buffered on a pipe otherwise.
    process = subprocess.Popen(
        ["stdbuf", "-oL", "mosquitto_sub", "-h", HOST, "-p", str(port), "-d", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
        if ready:
            seen += os.read(process.stdout.fileno(), 4096)
        if b"SUBACK" in seen:
            return process
    process.kill()
    raise AssertionError("mosquitto_sub did not get its SUBACK")


# ---------------------------------------------------------------------------- raw packets


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        digit, value = value & 0x7F, value >> 7
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def mqtt_string(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + varint(len(body)) + body


def connect_packet(client_id: bytes, *, version: int = 4, clean: bool = True,
                   keepalive: int = 60, will: tuple[bytes, bytes, int] | None = None,
                   properties: bytes = b"") -> bytes:
    flags = 0x02 if clean else 0x00
    payload = mqtt_string(client_id)
    if will:
        topic, message, qos = will
        flags |= 0x04 | qos << 3
        payload += (b"\x00" if version == 5 else b"") + mqtt_string(topic) + mqtt_string(message)
    header = mqtt_string(b"MQTT") + bytes((version, flags)) + keepalive.to_bytes(2, "big")
    if version == 5:
        header += varint(len(properties)) + properties
    return packet(0x10, header + payload)


def subscribe_packet(packet_id: int, topic: bytes, qos: int, version: int = 4) -> bytes:
    properties = b"\x00" if version == 5 else b""
    return packet(0x82, packet_id.to_bytes(2, "big") + properties + mqtt_string(topic)
                  + bytes((qos,)))


class RawClient:
    """A TCP socket speaking hand-made MQTT bytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=5)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, timeout_s: float = 3.0) -> tuple[int, int, bytes] | None:
        """(type, flags, body) of the next packet; None once the broker closed the socket."""
        self.sock.settimeout(timeout_s)
        while True:
            if len(self.buffer) >= 2:
                length, shift, index = 0, 0, 1
                while index < len(self.buffer):
                    digit = self.buffer[index]
                    length |= (digit & 0x7F) << shift
                    index += 1
                    if not digit & 0x80:
                        break
                    shift += 7
                if index + length <= len(self.buffer) and not self.buffer[index - 1] & 0x80:
                    first, body = self.buffer[0], self.buffer[index:index + length]
                    self.buffer = self.buffer[index + length:]
                    return first >> 4, first & 0x0F, body
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buffer += chunk

    def connect(self, client_id: bytes, **options) -> tuple[int, int, bytes]:
        self.send(connect_packet(client_id, **options))
        reply = self.read()
        assert reply is not None and reply[0] == 2, f"expected CONNACK, got {reply}"
        return reply

    def packets_until_closed(self, timeout_s: float = 3.0) -> list[tuple[int, int, bytes]]:
        seen = []
        while (found := self.read(timeout_s)) is not None:
            seen.append(found)
        return seen

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------- topics


@pytest.mark.parametrize("topic_filter, topic, expected", [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking/wimbledon", True),
    ("sport/#", "sport", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("#", "$SYS/broker", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/broker", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("a/b", "a/b", True),
    ("a/b", "a/B", False),
])
def test_topic_matching_follows_the_spec_examples(topic_filter, topic, expected):
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("topic_filter, valid", [
    ("#", True), ("+", True), ("a/+/c/#", True), ("+/+/+", True), ("/", True),
    ("", False), ("a/#/c", False), ("a#", False), ("a/b+", False), ("a/+b/c", False),
    ("$SYS/#", True), ("$SYS/+/load", True), ("$", True), ("$#", False), ("$+", False),
])
def test_topic_filter_validity(topic_filter, valid):
    assert valid_topic_filter(topic_filter) is valid


@pytest.mark.parametrize("topic", [
    "a/b", "a/+", "a/#", "#", "+", "", "a\x00b", "x" * 65536, "caf\u00e9/\u00fc", "\ud800",
    "a//b", "/", "a/b#", "sport/+/player",
])
def test_names_and_filters_follow_the_contracts_rules_where_dollar_is_not_involved(topic):
    """One rule for both: the broker differs from agent.mqtt.topics only on a leading '$'."""
    assert valid_topic_name(topic) is is_valid_publish_topic(topic)
    assert valid_topic_filter(topic) is is_valid_filter(topic)


def test_the_broker_shares_the_contracts_topic_rules_without_importing_paho():
    """It reuses agent.mqtt.topics, which must stay pure: the broker runs where paho is not."""
    probe = ("import sys, agent.broker; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'paho'))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- routing


def test_wildcards_route_each_topic_to_exactly_the_matching_subscribers(any_broker):
    filters = {
        "sport/tennis/+": False, "sport/#": True, "#": True, "+/+": False,
        "$edge/#": True, "+/tennis/#": True,
    }  # filter -> subscribe as MQTT 5 (else 3.1.1)
    expected = {
        "sport/tennis/+": {"sport/tennis/player1"},
        "sport/#": {"sport", "sport/tennis", "sport/tennis/player1",
                    "sport/tennis/player1/ranking"},
        "#": {"sport", "sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking",
              "/finance"},
        "+/+": {"sport/tennis", "/finance"},
        "$edge/#": {"$edge/load"},
        "+/tennis/#": {"sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking"},
    }
    subscribers = {}
    for topic_filter, v5 in filters.items():
        subscribers[topic_filter] = Peer(any_broker.port, v5=v5)
        assert subscribers[topic_filter].subscribe(topic_filter) == [1]
    publisher = Peer(any_broker.port)
    for topic in ["sport", "sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking",
                  "/finance", "$edge/load"]:
        publisher.publish(topic, topic.encode())
    for topic_filter, peer in subscribers.items():
        got = peer.take(len(expected[topic_filter]))
        assert {m.topic for m in got} == expected[topic_filter], topic_filter
        assert all(m.payload == m.topic.encode() for m in got)
        peer.assert_silent(0.2)
        peer.close()
    publisher.close()


def test_delivered_qos_is_the_lower_of_publish_and_subscription(any_broker):
    low, high = Peer(any_broker.port), Peer(any_broker.port, v5=False)
    low.subscribe("q/t", qos=0)
    high.subscribe("q/t", qos=1)
    publisher = Peer(any_broker.port)
    publisher.publish("q/t", b"one", qos=1)
    publisher.publish("q/t", b"zero", qos=0)
    assert [(m.payload, m.qos) for m in low.take(2)] == [(b"one", 0), (b"zero", 0)]
    assert [(m.payload, m.qos) for m in high.take(2)] == [(b"one", 1), (b"zero", 0)]
    for peer in (low, high, publisher):
        peer.close()


def test_no_local_keeps_a_clients_own_messages_from_it(any_broker):
    talker, other = Peer(any_broker.port), Peer(any_broker.port)
    talker.subscribe("room/1", noLocal=True)
    other.subscribe("room/1")
    talker.publish("room/1", b"hi")
    assert other.next().payload == b"hi"
    talker.assert_silent()
    talker.close()
    other.close()


# ---------------------------------------------------------------------------- retained


def test_retained_messages_are_stored_replaced_deleted_and_flagged(any_broker):
    publisher = Peer(any_broker.port)
    publisher.publish("dev/1/status", b"starting", retain=True)
    publisher.publish("dev/1/status", b"ready", retain=True)
    publisher.publish("dev/2/status", b"ready", retain=True)
    publisher.publish("dev/2/status", b"", retain=True)  # empty payload deletes
    for v5 in (True, False):
        late = Peer(any_broker.port, v5=v5)
        late.subscribe("dev/+/status")
        message = late.next()
        assert (message.topic, message.payload, message.retain) == ("dev/1/status", b"ready", True)
        late.assert_silent()
        # A live message to an existing subscription has RETAIN 0 (no Retain As Published).
        publisher.publish("dev/1/status", b"busy", retain=True)
        live = late.next()
        assert (live.payload, live.retain) == (b"busy", False)
        late.close()
        publisher.publish("dev/1/status", b"ready", retain=True)
    publisher.close()


def test_v5_retain_handling_and_retain_as_published(any_broker):
    publisher = Peer(any_broker.port)
    publisher.publish("cfg/a", b"1", retain=True)
    never = Peer(any_broker.port)
    never.subscribe("cfg/#", retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
    never.assert_silent()
    once = Peer(any_broker.port)
    once.subscribe("cfg/#", retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
    assert once.next().payload == b"1"
    once.subscribe("cfg/#", retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
    once.assert_silent()
    flagged = Peer(any_broker.port)
    flagged.subscribe("cfg/#", retainAsPublished=True, retainHandling=2)
    publisher.publish("cfg/a", b"2", retain=True)
    assert flagged.next().retain is True
    assert never.next().retain is False
    for peer in (publisher, never, once, flagged):
        peer.close()


# ---------------------------------------------------------------------------- shared


def test_shared_subscription_balances_round_robin_and_gets_no_retained(any_broker):
    publisher = Peer(any_broker.port)
    publisher.publish("jobs/old", b"retained", retain=True)
    workers = [Peer(any_broker.port), Peer(any_broker.port)]
    for worker in workers:
        assert worker.subscribe("$share/pool/jobs/+") == [1]
    watcher = Peer(any_broker.port)
    watcher.subscribe("jobs/+")
    assert watcher.next().payload == b"retained"
    sent = [f"job-{n}".encode() for n in range(20)]
    for payload in sent:
        publisher.publish("jobs/new", payload)
    assert [m.payload for m in watcher.take(20)] == sent
    shares = []
    for worker in workers:
        got = []
        while True:
            try:
                got.append(worker.next(0.5))
            except queue.Empty:
                break
        if any_broker.kind == "embedded":  # Mosquitto 2.0.11 (installed here) sends them
            assert not [m for m in got if m.retain], "retained message sent to a shared sub"
        shares.append([m.payload for m in got if not m.retain])
    assert sorted(shares[0] + shares[1]) == sorted(sent)  # each job exactly once
    # Balanced, not exact: each worker takes a fair share (Mosquitto round-robins, but a
    # broker may hand out in another order and stay fair).
    assert all(len(share) >= len(sent) // 3 for share in shares), [len(s) for s in shares]
    for peer in (*workers, watcher, publisher):
        peer.close()


# ---------------------------------------------------------------------------- wills


def test_will_published_when_client_is_killed_not_on_clean_disconnect(any_broker):
    watcher = Peer(any_broker.port)
    watcher.subscribe("will/#")
    victim = start_mosquitto_sub(any_broker.port, "-t", "work", "-i", "victim",
                                 "--will-topic", "will/victim", "--will-payload", "gone",
                                 "--will-qos", "1", "--will-retain")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    will = watcher.next()
    assert (will.topic, will.payload, will.qos) == ("will/victim", b"gone", 1)
    late = Peer(any_broker.port)  # will retain honoured
    late.subscribe("will/victim")
    assert late.next().retain is True
    polite = Peer(any_broker.port, will={"topic": "will/polite", "payload": b"gone", "qos": 1})
    polite.close()
    watcher.assert_silent(0.5)
    for peer in (watcher, late):
        peer.close()


def test_v5_will_delay_is_honoured_and_cancelled_by_reconnect(any_broker):
    watcher = Peer(any_broker.port)
    watcher.subscribe("will/#")
    delayed = ["-V", "mqttv5", "-x", "60", "-D", "will", "will-delay-interval", "2",
               "--will-topic", "will/slow", "--will-payload", "lost", "-t", "work", "-c"]
    victim = start_mosquitto_sub(any_broker.port, "-i", "slow-1", *delayed)
    victim.kill()
    victim.wait()
    killed_at = time.monotonic()
    watcher.assert_silent(1.2)
    assert watcher.next(4).payload == b"lost"
    assert time.monotonic() - killed_at >= 1.5
    victim = start_mosquitto_sub(any_broker.port, "-i", "slow-2", *delayed)
    victim.kill()
    victim.wait()
    back = start_mosquitto_sub(any_broker.port, "-i", "slow-2", *delayed)  # within the delay
    watcher.assert_silent(3.0)
    back.terminate()
    back.wait()
    watcher.close()


def test_v5_disconnect_with_will_reason_publishes_the_will(any_broker):
    watcher = Peer(any_broker.port)
    watcher.subscribe("will/#")
    leaver = Peer(any_broker.port, will={"topic": "will/leaver", "payload": b"bye"})
    leaver.close(ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
    assert watcher.next().payload == b"bye"
    watcher.close()


def test_keepalive_timeout_closes_the_connection_and_publishes_the_will(any_broker):
    watcher = Peer(any_broker.port)
    watcher.subscribe("will/#")
    silent = RawClient(any_broker.port)
    silent.connect(b"silent", keepalive=1, will=(b"will/silent", b"timeout", 1))
    started = time.monotonic()
    assert watcher.next(10).payload == b"timeout"  # Mosquitto checks only every few seconds
    assert time.monotonic() - started >= 1.0  # not before the keepalive ran out
    assert silent.packets_until_closed() in ([], [(14, 0, b"\x8d\x00")])
    watcher.close()


# ---------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_persistent_session_keeps_subscriptions_and_queues_qos1(any_broker, v5):
    device = Peer(any_broker.port, "keeper", v5=v5, clean=False, session_expiry=300)
    device.subscribe("edge/v1/keeper/prompt")
    device.close()
    for n in range(3):
        mosquitto_pub(any_broker.port, "edge/v1/keeper/prompt", f"q{n}", "-q", "1")
    mosquitto_pub(any_broker.port, "edge/v1/keeper/prompt", "lost", "-q", "0")
    device = Peer(any_broker.port, "keeper", v5=v5, clean=False, session_expiry=300)
    assert device.session_present
    assert [m.payload for m in device.take(3)] == [b"q0", b"q1", b"q2"]
    device.assert_silent()
    device.close()
    fresh = Peer(any_broker.port, "keeper", v5=v5, clean=True)
    assert not fresh.session_present
    fresh.close()


def test_v5_session_expires_after_its_interval(embedded):
    device = Peer(embedded.port, "brief", clean=False, session_expiry=1)
    device.subscribe("t")
    device.close()
    time.sleep(1.6)
    device = Peer(embedded.port, "brief", clean=False, session_expiry=1)
    assert not device.session_present
    device.close()


def test_offline_queue_is_bounded_and_drops_the_oldest():
    broker = EmbeddedBroker(max_queued=5)
    port = broker.run_in_thread()
    try:
        device = Peer(port, "bounded", clean=False, session_expiry=300)
        device.subscribe("q")
        device.close()
        publisher = Peer(port)
        for n in range(8):
            publisher.publish("q", f"m{n}".encode())
        device = Peer(port, "bounded", clean=False, session_expiry=300)
        assert [m.payload for m in device.take(5)] == [f"m{n}".encode() for n in range(3, 8)]
        device.assert_silent()
        device.close()
        publisher.close()
    finally:
        broker.stop_thread()


def test_unacknowledged_qos1_is_redelivered_with_dup_on_reconnect(any_broker):
    raw = RawClient(any_broker.port)
    raw.connect(b"forgetful", clean=False)
    raw.send(subscribe_packet(1, b"dup/t", 1))
    assert raw.read()[0] == 9
    Peer(any_broker.port).publish("dup/t", b"once")
    kind, flags, body = raw.read()
    assert (kind, flags & 0x06, flags & 0x08) == (3, 0x02, 0)  # PUBLISH, QoS 1, DUP 0
    packet_id = body[7:9]  # after the 2+5 byte topic
    raw.close()  # gone without PUBACK
    raw = RawClient(any_broker.port)
    assert raw.connect(b"forgetful", clean=False)[2] == b"\x01\x00"  # session present
    kind, flags, body = raw.read()
    assert (kind, flags & 0x06, flags & 0x08) == (3, 0x02, 0x08)  # now with DUP
    assert body[7:9] == packet_id and body.endswith(b"once")
    raw.send(b"\x40\x02" + packet_id)
    raw.close()
    raw = RawClient(any_broker.port)
    raw.connect(b"forgetful", clean=False)
    with pytest.raises(TimeoutError):
        raw.read(timeout_s=0.5)  # acknowledged: not sent again
    raw.close()


def test_v5_receive_maximum_limits_unacknowledged_sends(any_broker):
    raw = RawClient(any_broker.port)
    raw.connect(b"narrow", version=5, properties=b"\x21\x00\x02")  # Receive Maximum 2
    raw.send(subscribe_packet(1, b"flow", 1, version=5))
    assert raw.read()[0] == 9
    publisher = Peer(any_broker.port)
    for n in range(5):
        publisher.publish("flow", f"m{n}".encode())
    first, second = raw.read(), raw.read()
    with pytest.raises(TimeoutError):
        raw.read(timeout_s=0.5)
    raw.send(b"\x40\x02" + first[2][6:8])  # PUBACK the first: room for one more
    third = raw.read()
    assert [p[2].endswith(f"m{n}".encode()) for n, p in enumerate((first, second, third))] == [
        True, True, True]
    raw.close()
    publisher.close()


def test_session_takeover_disconnects_the_first_connection(any_broker):
    first = Peer(any_broker.port, "twin")
    second = Peer(any_broker.port, "twin")
    assert first.disconnected.wait(5)
    if any_broker.kind == "embedded":  # Mosquitto 2.0.11 closes without a DISCONNECT
        assert first.disconnect_reason.value == 0x8E  # Session taken over
    second.subscribe("twin/t")
    Peer(any_broker.port).publish("twin/t", b"to the second")
    assert second.next().payload == b"to the second"
    second.close()
    old = Peer(any_broker.port, "twin311", v5=False)
    Peer(any_broker.port, "twin311", v5=False)
    assert old.disconnected.wait(5)


def test_v5_empty_client_id_is_assigned_one_and_311_persistent_empty_id_is_rejected(any_broker):
    anonymous = Peer(any_broker.port, "")
    assert anonymous.connect_properties.AssignedClientIdentifier
    anonymous.close()
    raw = RawClient(any_broker.port)
    assert raw.connect(b"", clean=False)[2] == b"\x00\x02"  # identifier rejected
    raw.close()


# ---------------------------------------------------------------------------- properties


def test_v5_request_properties_arrive_unchanged(any_broker):
    responder = Peer(any_broker.port)
    responder.subscribe("edge/v1/dev-1/prompt")
    mosquitto_pub(any_broker.port, "edge/v1/dev-1/prompt", '{"id": "r1"}', "-q", "1",
                  "-V", "mqttv5", "-D", "publish", "response-topic", "ctl/replies/r1",
                  "-D", "publish", "correlation-data", "c0ffee-42",
                  "-D", "publish", "user-property", "trace", "abc",
                  "-D", "publish", "user-property", "trace", "def",
                  "-D", "publish", "content-type", "application/json",
                  "-D", "publish", "payload-format-indicator", "1",
                  "-D", "publish", "message-expiry-interval", "120")
    request = responder.next()
    properties = request.properties
    assert request.payload == b'{"id": "r1"}'
    assert properties.ResponseTopic == "ctl/replies/r1"
    assert properties.CorrelationData == b"c0ffee-42"
    assert properties.UserProperty == [("trace", "abc"), ("trace", "def")]
    assert properties.ContentType == "application/json"
    assert properties.PayloadFormatIndicator == 1
    assert 118 <= properties.MessageExpiryInterval <= 120
    # The reply, from paho, read by mosquitto_sub.
    listener = start_mosquitto_sub(any_broker.port, "-V", "mqttv5", "-t", "ctl/replies/#",
                                   "-C", "1", "-F", "%t|%p|%D|%C")
    reply = Properties(PacketTypes.PUBLISH)
    reply.CorrelationData = properties.CorrelationData
    reply.ContentType = "application/json"
    responder.publish(properties.ResponseTopic, b'{"id": "r1", "done": true}', properties=reply)
    out, _ = listener.communicate(timeout=5)
    lines = [line for line in out.decode().splitlines() if line.startswith("ctl/replies/")]
    assert lines == ['ctl/replies/r1|{"id": "r1", "done": true}|c0ffee-42|application/json']
    responder.close()


def test_message_expiry_counts_down_and_expired_retained_is_not_sent(any_broker):
    publisher = Peer(any_broker.port)
    for topic, expiry in (("exp/long", 30), ("exp/short", 1)):
        properties = Properties(PacketTypes.PUBLISH)
        properties.MessageExpiryInterval = expiry
        publisher.publish(topic, b"x", retain=True, properties=properties)
    time.sleep(2.1)
    late = Peer(any_broker.port)
    late.subscribe("exp/#")
    message = late.next()
    assert message.topic == "exp/long"
    assert 27 <= message.properties.MessageExpiryInterval <= 28
    late.assert_silent()
    late.close()
    publisher.close()


# ---------------------------------------------------------------------------- QoS 2


def test_qos2_is_downgraded_to_qos1_with_the_documented_policy(embedded):
    subscriber = Peer(embedded.port, v5=False)
    assert subscriber.subscribe("q2", qos=2) == [1]
    v311 = Peer(embedded.port, v5=False)
    v311.publish("q2", b"exactly once", qos=2)  # completes PUBREC/PUBREL/PUBCOMP
    message = subscriber.next()
    assert (message.payload, message.qos) == (b"exactly once", 1)
    subscriber.assert_silent()
    v5 = Peer(embedded.port)
    assert v5.connect_properties.MaximumQoS == 1
    v5.client.publish("q2", b"refused", qos=2)
    assert v5.disconnected.wait(5)
    assert v5.disconnect_reason.value == 0x9B  # QoS not supported
    subscriber.assert_silent()
    v311.close()
    subscriber.close()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name, opening, expected_disconnect", [
    ("garbage", b"\xff\xff\xff\xff\xff\xff", None),
    ("oversized remaining length", b"\x10\xff\xff\xff\x7f", None),
    ("five-byte remaining length", b"\x10\xff\xff\xff\xff\x01", None),
    ("publish before connect", packet(0x30, mqtt_string(b"a") + b"x"), None),
    ("v5 publish with invalid UTF-8 topic",
     connect_packet(b"bad-utf8", version=5) + packet(0x30, b"\x00\x02\xc3\x28\x00x"), 0x81),
    ("v5 publish with an unknown property",
     connect_packet(b"bad-prop", version=5) + packet(0x30, mqtt_string(b"a") + b"\x02\x7f\x00x"),
     0x81),
    ("v5 packet over the maximum size",
     connect_packet(b"too-big", version=5) + b"\x30\x80\x80\x80\x01", 0x95),
    ("v5 publish with a topic alias",
     connect_packet(b"alias", version=5) + packet(0x30, mqtt_string(b"a") + b"\x03\x23\x00\x01x"),
     0x94),
    ("v5 subscription identifier",
     connect_packet(b"subid", version=5) + packet(0x82, b"\x00\x01\x02\x0b\x01" + mqtt_string(b"a")
                                                  + b"\x01"), 0xA1),
    ("311 subscribe with wrong header flags",
     connect_packet(b"bad-flags") + packet(0x80, b"\x00\x01" + mqtt_string(b"a") + b"\x01"), None),
    ("311 publish with wildcard topic",
     connect_packet(b"wild") + packet(0x30, mqtt_string(b"a/#")), None),
])
def test_malformed_input_closes_only_that_connection(embedded, name, opening, expected_disconnect):
    bystander = Peer(embedded.port)
    bystander.subscribe("still/here")
    raw = RawClient(embedded.port)
    raw.send(opening)
    started = time.monotonic()
    replies = raw.packets_until_closed()
    assert time.monotonic() - started < 2.5, "the broker waited instead of closing"
    disconnects = [body for kind, _, body in replies if kind == 14]
    if expected_disconnect is None:
        assert not disconnects
    else:
        assert disconnects and disconnects[0][0] == expected_disconnect
    raw.close()
    Peer(embedded.port, v5=False).publish("still/here", b"yes")
    assert bystander.next().payload == b"yes"
    round_trip(embedded.port)
    bystander.close()


def test_mutated_packets_never_reach_an_internal_error(embedded):
    """Seeded byte mutations of valid v5 packets: each is handled or rejected, never crashes."""
    import random

    from structlog.testing import capture_logs

    valid = [
        packet(0x32, mqtt_string(b"f/t") + b"\x00\x01" + b"\x0e\x08" + mqtt_string(b"r/t")
               + b"\x09" + mqtt_string(b"cd") + b"\x02\x00\x00\x00\x09" + b"payload"),
        packet(0x82, b"\x00\x02\x03\x26\x00\x00" + b"\x00\x00" + mqtt_string(b"$share/g/f/#")
               + b"\x01"),
        packet(0xA2, b"\x00\x03\x00" + mqtt_string(b"f/+")),
        packet(0x40, b"\x00\x01\x10\x00"),
        packet(0xE0, b"\x04\x05\x11\x00\x00\x00\x05"),
    ]
    randomness = random.Random(7)
    with capture_logs() as logs:
        for attempt in range(200):
            mutated = bytearray(randomness.choice(valid))
            for _ in range(randomness.randint(1, 3)):
                mutated[randomness.randrange(len(mutated))] = randomness.randrange(256)
            raw = RawClient(embedded.port)
            raw.connect(f"fuzz-{attempt}".encode(), version=5)
            raw.send(bytes(mutated) + b"\xc0\x00")  # then PINGREQ: answered or closed
            try:
                while (reply := raw.read(0.25)) is not None and reply[0] != 13:
                    pass
            except TimeoutError:
                pass  # a mutated length made the broker wait for the rest: also correct
            raw.close()
    assert not [entry for entry in logs if entry["event"] == "broker_internal_error"]
    round_trip(embedded.port)


def test_broker_survives_a_client_vanishing_mid_packet(embedded):
    raw = RawClient(embedded.port)
    raw.connect(b"half", version=5)
    raw.send(b"\x30\x20\x00\x05abc")  # a PUBLISH cut short
    raw.close()
    round_trip(embedded.port)


# ---------------------------------------------------------------------------- lifecycle


def test_stop_and_start_keeps_sessions_and_retained():
    broker = EmbeddedBroker()
    port = broker.run_in_thread()
    try:
        device = Peer(port, "sleeper", clean=False, session_expiry=300)
        device.subscribe("wake")
        device.close()
        Peer(port).publish("wake", b"up")
        broker.stop_thread()
        assert broker.run_in_thread() == port
        device = Peer(port, "sleeper", clean=False, session_expiry=300)
        assert device.session_present
        assert device.next().payload == b"up"
        device.close()
    finally:
        broker.stop_thread()


def test_module_entry_point_serves_and_refuses_a_busy_port():
    port = free_port()
    command = [sys.executable, "-m", "agent.broker", "--port", str(port)]
    server = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "entry point did not listen"
                time.sleep(0.05)
        listener = start_mosquitto_sub(port, "-t", "cli/t", "-C", "1", "-V", "mqttv5")
        mosquitto_pub(port, "cli/t", "via cli", "-V", "mqttv311")
        out = listener.communicate(timeout=5)[0].decode().splitlines()
        assert out.count("via cli") == 1  # among -d's debug lines
        busy = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=10)
        assert busy.returncode == 2
        assert "broker_failed" in busy.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0


# ---------------------------------------------------------------------------- resource caps


class BrokerProcess:
    """``python -m agent.broker`` in its own process, so its RSS is its own."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.broker", "--port", str(self.port),
             "--log-level", "warning", *options], cwd=REPO, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while True:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the broker did not listen"
                time.sleep(0.05)

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=10)


@pytest.fixture
def broker_process():
    started: list[BrokerProcess] = []

    def start(*options: str) -> BrokerProcess:
        started.append(BrokerProcess(*options))
        return started[-1]

    yield start
    for broker in started:
        broker.stop()


def acked_reasons(peer: Peer) -> dict[int, int]:
    """mid -> PUBACK reason code, for every publish of ``peer`` from now on."""
    reasons: dict[int, int] = {}
    peer.client.on_publish = lambda _c, _u, mid, reason, _p: reasons.__setitem__(mid, reason.value)
    return reasons


def test_an_offline_session_queue_is_bounded_in_bytes_and_keeps_the_newest(broker_process):
    """The attack: 400 QoS 1 messages of 1 MiB to a session that never comes back took
    435 MiB of broker memory. The per-session byte cap drops the oldest queued message."""
    cap = 16 << 20  # the default max_session_bytes
    broker = broker_process()
    sleeper = Peer(broker.port, "sleeper", clean=False, session_expiry=300)
    sleeper.subscribe("bulk", qos=1)
    sleeper.close()
    publisher = Peer(broker.port, "flooder")
    baseline = broker.rss()
    payload = bytes(range(256)) * (((1 << 20) - 256) // 256)  # 1 MiB less room for the header
    for n in range(400):
        publisher.publish("bulk", n.to_bytes(4, "big") + payload[4:], qos=1)
    grown = broker.rss() - baseline
    print(f"broker RSS grew {grown / 2**20:.1f} MiB for 400 MiB queued (cap {cap >> 20} MiB)")
    assert grown < cap + (48 << 20)

    sleeper = Peer(broker.port, "sleeper", clean=False, session_expiry=300)
    kept = []
    while True:
        try:
            kept.append(int.from_bytes(sleeper.next(timeout_s=2).payload[:4], "big"))
        except queue.Empty:
            break
    assert 0 < len(kept) * len(payload) <= cap
    assert kept == list(range(400 - len(kept), 400))  # the newest, in order
    sleeper.close()
    publisher.close()


def test_the_connection_cap_refuses_one_more_and_admits_after_one_leaves(broker_process):
    broker = broker_process("--max-connections", "3")
    peers = [Peer(broker.port, f"c{n}") for n in range(3)]
    extra = RawClient(broker.port)
    extra.send(connect_packet(b"c3"))
    assert extra.read() is None  # closed before any CONNACK
    extra.close()
    peers.pop().close()
    time.sleep(0.2)
    peers.append(Peer(broker.port, "c3"))  # a freed slot is usable again
    peers[0].subscribe("still/serving")
    peers[1].publish("still/serving", b"yes")
    assert peers[0].next().payload == b"yes"
    for peer in peers:
        peer.close()


def test_the_retained_store_is_capped_in_topics_and_bytes(broker_process):
    broker = broker_process("--max-retained", "3", "--max-retained-bytes", "4096")
    publisher = Peer(broker.port, "retainer")
    reasons = acked_reasons(publisher)

    def retain(topic: str, payload: bytes) -> int:
        info = publisher.client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while info.mid not in reasons:
            assert time.monotonic() < deadline, "no PUBACK"
            time.sleep(0.01)
        return reasons[info.mid]

    assert [retain(f"r/{n}", b"x") for n in range(3)] == [0, 0, 0]
    assert retain("r/3", b"x") == 0x97  # quota exceeded: a fourth topic
    assert retain("r/0", b"replaced") == 0  # replacing a stored topic is no new one
    assert retain("r/1", b"y" * 5000) == 0x97  # more bytes than the store may hold
    assert retain("r/2", b"") == 0  # deleting frees a slot
    assert retain("r/3", b"now") == 0

    reader = Peer(broker.port, "reader")
    reader.subscribe("r/#")
    got = sorted((m.topic, m.payload) for m in reader.take(3))
    assert got == [("r/0", b"replaced"), ("r/1", b"x"), ("r/3", b"now")]
    reader.assert_silent()
    reader.close()
    publisher.close()


def test_an_idle_keepalive_0_connection_is_closed_after_the_idle_time(broker_process):
    broker = broker_process("--max-idle", "1")
    idle = Peer(broker.port, "idle", keepalive=0)
    busy = Peer(broker.port, "busy", keepalive=0)
    pinging = Peer(broker.port, "pinging", keepalive=1)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        busy.publish("keep/talking", b".", qos=0)
        time.sleep(0.2)
    assert idle.disconnected.is_set() and idle.disconnect_reason.value == 0x8D
    assert not busy.disconnected.is_set() and not pinging.disconnected.is_set()
    for peer in (idle, busy, pinging):
        peer.close()


def test_a_connect_larger_than_a_connect_needs_is_refused_from_its_header(broker_process):
    broker = broker_process()
    raw = RawClient(broker.port)
    raw.send(b"\x10" + varint(512 << 10))  # claims a 512 KiB CONNECT, sends nothing more
    assert raw.read(timeout_s=3) is None
    raw.close()


def test_in_flight_messages_a_reconnect_cannot_take_are_let_go(broker_process):
    """Messages in flight when a client left, which its new connection says are larger than
    it takes (Maximum Packet Size), are discarded as the spec asks and must free what they
    held: left in flight, they kept their bytes of the session cap for ever."""
    cap = 64 << 10
    broker = broker_process("--max-session-bytes", str(cap))

    def connect(max_packet: int | None = None) -> tuple[mqtt.Client, queue.Queue]:
        """Session "slow": persistent, v5, and it never acknowledges a message."""
        received: queue.Queue[bytes] = queue.Queue()
        connected = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="slow",
                             protocol=mqtt.MQTTv5, reconnect_on_failure=False, manual_ack=True)
        client.on_connect = lambda *_: connected.set()
        client.on_message = lambda _c, _u, message: received.put(message.payload)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 300
        if max_packet is not None:
            properties.MaximumPacketSize = max_packet
        client.connect(HOST, broker.port, clean_start=False, properties=properties)
        client.loop_start()
        assert connected.wait(5), "no CONNACK"
        return client, received

    def leave(client: mqtt.Client) -> None:
        client.disconnect()
        client.loop_stop()
        time.sleep(0.2)

    slow, received = connect()
    slow.subscribe("t", qos=1)
    time.sleep(0.2)
    publisher = Peer(broker.port)
    big = bytes(cap // 5)
    for n in range(4):  # most of the cap, in flight and never acknowledged
        publisher.publish("t", n.to_bytes(4, "big") + big)
    assert len([received.get(timeout=5) for _ in range(4)]) == 4
    leave(slow)

    slow, received = connect(max_packet=2048)  # the in-flight ones no longer fit
    with pytest.raises(queue.Empty):
        received.get(timeout=0.5)
    leave(slow)
    small = bytes(1000)
    count = cap // 2 // len(small)  # half the cap: fits only if the big ones were let go
    for n in range(count):
        publisher.publish("t", n.to_bytes(4, "big") + small)

    slow, received = connect(max_packet=2048)
    kept = []
    while True:
        try:
            kept.append(int.from_bytes(received.get(timeout=1)[:4], "big"))
        except queue.Empty:
            break
    assert kept == list(range(count))
    leave(slow)
    publisher.close()
