"""MQTTClient against a real mosquitto: sessions, re-subscribe, queued publishes, bad credentials."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import structlog

from agent.config import MQTTConfig
from agent.mqtt.client import ConnectionChange, Inbound, MQTTClient, Will
from tests.support.broker import Broker


def _config(broker, **overrides) -> MQTTConfig:
    return MQTTConfig(host=broker.host, port=broker.port, reconnect_min_s=1, reconnect_max_s=2, **overrides)


def _next(inbox: queue.Queue, kind: type, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(item, kind):
            return item
    raise AssertionError(f"no {kind.__name__} within {timeout}s")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_resubscribes_after_broker_restart_and_delivers_queued_publishes(broker, observer, protocol):
    inbox: queue.Queue = queue.Queue()
    client = MQTTClient(_config(broker, protocol=protocol), client_id=f"dev-{protocol}", inbox=inbox)
    client.subscribe("t/in", 1)
    client.start()
    try:
        assert _next(inbox, ConnectionChange).connected
        watcher = observer()
        watcher.subscribe("t/out")
        watcher.publish("t/in", b"one")
        assert _next(inbox, Inbound).payload == b"one"

        broker.stop()
        assert _next(inbox, ConnectionChange).connected is False
        assert client.publish("t/out", b"made-while-away", qos=1)  # queued by paho
        broker.start()
        assert _next(inbox, ConnectionChange, timeout=15).connected
        watcher.wait_for(lambda m: m.payload == b"made-while-away")
        assert client.flush(5)
        watcher.publish("t/in", b"two")  # the registry re-subscribed on the reconnect
        assert _next(inbox, Inbound).payload == b"two"
    finally:
        client.stop()


def test_persistent_session_delivers_qos1_sent_while_away(broker, observer):
    inbox: queue.Queue = queue.Queue()
    config = _config(broker)
    first = MQTTClient(config, client_id="dev-away", inbox=inbox)
    first.subscribe("dev/prompt", 1)
    first.start()
    assert _next(inbox, ConnectionChange).connected
    first.stop()

    observer().publish("dev/prompt", b"while-you-were-out", qos=1)
    inbox2: queue.Queue = queue.Queue()
    second = MQTTClient(config, client_id="dev-away", inbox=inbox2)  # no subscribe: the session has it
    second.start()
    try:
        change = _next(inbox2, ConnectionChange)
        assert change.connected and change.session_present
        received = _next(inbox2, Inbound)
        assert (received.topic, received.payload) == ("dev/prompt", b"while-you-were-out")
    finally:
        second.stop()


def test_mqtt5_properties_reach_the_inbox(broker, observer):
    inbox: queue.Queue = queue.Queue()
    client = MQTTClient(_config(broker), client_id="dev-props", inbox=inbox)
    client.subscribe("dev/prompt")
    client.start()
    try:
        _next(inbox, ConnectionChange)
        observer().publish("dev/prompt", b"{}", response_topic="me/replies", correlation_data=b"\x01\x02")
        received = _next(inbox, Inbound)
        assert (received.response_topic, received.correlation_data) == ("me/replies", b"\x01\x02")
    finally:
        client.stop()


def test_will_is_published_after_its_delay_on_a_broken_connection(broker, observer):
    watcher = observer()
    watcher.subscribe("dev/status")
    inbox: queue.Queue = queue.Queue()
    client = MQTTClient(_config(broker), client_id="dev-will", inbox=inbox,
                        will=Will("dev/status", b"lost", delay_s=1))
    client.start()
    _next(inbox, ConnectionChange)
    # What a crash looks like to the broker: the socket closes with no DISCONNECT, and no one
    # reconnects.
    client._network.give_up()
    client._client.socket().close()
    start = time.monotonic()
    watcher.wait_for(lambda m: m.payload == b"lost", timeout=10)
    assert time.monotonic() - start >= 0.9


def test_bad_credentials_stop_retrying_with_a_clear_log(tmp_path: Path):
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "dev", "right"], check=True)
    broker = Broker(tmp_path / "b", extra_config=f"allow_anonymous false\npassword_file {passwords}").start()
    try:
        for protocol in ("5", "3.1.1"):
            inbox: queue.Queue = queue.Queue()
            client = MQTTClient(_config(broker, protocol=protocol, username="dev"), client_id="dev",
                                inbox=inbox, password="wrong")
            with structlog.testing.capture_logs() as logs:
                client.start()
                change = _next(inbox, ConnectionChange)
                time.sleep(2.5)  # longer than the reconnect delay: no second attempt may happen
            client.stop()
            assert change.fatal and not change.connected
            rejected = [entry for entry in logs if entry["event"] == "mqtt_credentials_rejected"]
            assert len(rejected) == 1, logs
            assert "not retrying" in rejected[0]["hint"]
            assert inbox.empty()

        inbox = queue.Queue()
        good = MQTTClient(_config(broker, username="dev"), client_id="dev", inbox=inbox, password="right")
        good.start()
        assert _next(inbox, ConnectionChange).connected
        good.stop()
    finally:
        broker.stop()


def test_a_qos1_publish_is_acked_only_by_its_puback_after_message_ids_wrap(broker):
    """paho's message ids wrap after 65535. A QoS 0 publish nobody waits for must not leave its
    id behind as "already finished": a QoS 1 publish that reuses the id later would count as
    acknowledged before the broker's PUBACK, and flush() at stop would not wait for it."""
    inbox: queue.Queue = queue.Queue()
    client = MQTTClient(_config(broker), client_id="dev-wrap", inbox=inbox)
    client.start()
    try:
        assert _next(inbox, ConnectionChange).connected
        ids = 65535  # paho hands out 1..65535, then 1 again
        unwatched = 4096  # a span of ids, so the QoS 1 publish below reuses one of them
        for _ in range(unwatched):
            assert client.publish("t/noise", b"x")
        all_written = threading.Event()
        left = [ids - unwatched]

        def written() -> None:
            left[0] -= 1
            if left[0] == 0:
                all_written.set()

        for _ in range(ids - unwatched):
            assert client.publish("t/noise", b"x", on_written=written)
        assert all_written.wait(60), "paho did not write the QoS 0 messages"

        os.kill(broker.process.pid, signal.SIGSTOP)  # no PUBACK can come
        try:
            assert client.publish("t/out", b"must-be-acked", qos=1)
            assert not client.flush(0.5)
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        assert client.flush(10)
    finally:
        client.stop()
