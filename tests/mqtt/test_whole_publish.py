"""QoS 0 publishes that MQTTClient builds and writes itself (agent.mqtt.packets), against a real
mosquitto: the bytes are what the broker and a paho subscriber read back, and a packet that a
full send buffer cuts is finished before any other starts."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time

import pytest

from agent.config import MQTTConfig
from agent.mqtt import network
from agent.mqtt.client import ConnectionChange, MQTTClient


def _connected_client(broker, protocol: str = "5") -> tuple[MQTTClient, queue.Queue]:
    inbox: queue.Queue = queue.Queue()
    client = MQTTClient(MQTTConfig(host=broker.host, port=broker.port, protocol=protocol,
                                   reconnect_min_s=1, reconnect_max_s=1),
                        client_id=f"whole-{protocol}", inbox=inbox)
    client.start()
    assert client.wait_connected(10)
    return client, inbox


def _count_whole_writes(monkeypatch) -> list[bool]:
    """What each send_whole answered: True when the packet went out without paho."""
    answers: list[bool] = []
    real = network.NetworkLoop.send_whole

    def counted(self, packet: bytes) -> bool:
        answer = real(self, packet)
        answers.append(answer)
        return answer

    monkeypatch.setattr(network.NetworkLoop, "send_whole", counted)
    return answers


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_whole_written_publishes_arrive_as_sent(broker, observer, monkeypatch, protocol):
    answers = _count_whole_writes(monkeypatch)
    watcher = observer()
    watcher.subscribe("replies/#")
    client, _ = _connected_client(broker, protocol)
    # Remaining Length takes 1 and 2 bytes across these; 5000 is past the whole-write size.
    sizes = [0, 1, 100, 127, 128, 4000, 5000, 3]
    written = []
    try:
        for number, size in enumerate(sizes):
            payload = bytes((number + i) % 256 for i in range(size))
            assert client.publish(f"replies/{number}", payload, qos=0,
                                  correlation_data=f"corr-{number}".encode(),
                                  on_written=lambda number=number: written.append(number))
            if number == 3:  # a QoS 1 publish between them keeps its place
                assert client.publish("replies/acked", b"in order", qos=1)
        last = watcher.wait_for(lambda m: m.topic == f"replies/{len(sizes) - 1}")
        assert last.payload == bytes((len(sizes) - 1 + i) % 256 for i in range(3))
    finally:
        client.stop()
    received = [m for m in watcher.messages if m.topic.startswith("replies/")]
    assert [m.topic for m in received] == [f"replies/{n}" for n in range(4)] + ["replies/acked"] + [
        f"replies/{n}" for n in range(4, len(sizes))]
    for message in received:
        if message.topic == "replies/acked":
            continue
        number = int(message.topic.split("/")[1])
        assert message.payload == bytes((number + i) % 256 for i in range(sizes[number]))
        # Correlation Data is an MQTT 5 property: on 3.1.1 it is left out, as paho leaves it.
        assert message.correlation_data == (f"corr-{number}".encode() if protocol == "5" else None)
    assert written == list(range(len(sizes)))
    # Every small QoS 0 publish went out whole; the 5000-byte one, and the QoS 1, through paho.
    assert answers == [True] * 6 + [False, True]


def test_a_publish_cut_by_a_full_send_buffer_is_finished_before_the_next(broker, observer,
                                                                          monkeypatch):
    cut = threading.Event()
    real_finish = network.NetworkLoop._finish_write

    def finishing(self, sock, rest):
        cut.set()
        real_finish(self, sock, rest)

    monkeypatch.setattr(network.NetworkLoop, "_finish_write", finishing)
    watcher = observer()
    watcher.subscribe("cut/#")
    client, _ = _connected_client(broker)
    size = 3001  # no divisor of a segment's size: some publish straddles the full buffer's edge
    sent: list[int] = []

    def publish_until_cut() -> None:
        for number in range(12_000):  # the stopped broker's receive window is many MB
            payload = number.to_bytes(4, "big") * (size // 4)
            assert client.publish(f"cut/{number}", payload, qos=1 if number % 500 == 0 else 0)
            sent.append(number)
            if cut.is_set():
                break

    os.kill(broker.process.pid, signal.SIGSTOP)  # it stops reading: the line fills up
    publisher = threading.Thread(target=publish_until_cut)
    try:
        publisher.start()
        assert cut.wait(60), "no publish was cut by a full send buffer"
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
    publisher.join(30)
    try:
        assert not publisher.is_alive()
        watcher.wait_for(lambda m: m.topic == f"cut/{sent[-1]}", timeout=60)
        assert client.connected  # the stream was never broken
    finally:
        client.stop()
    received = [m for m in watcher.messages if m.topic.startswith("cut/")]
    assert [m.topic for m in received] == [f"cut/{n}" for n in sent]
    assert all(m.payload == int(m.topic[4:]).to_bytes(4, "big") * (size // 4) for m in received)


def test_a_line_that_takes_nothing_of_a_cut_publish_is_reconnected(broker, observer,
                                                                      monkeypatch):
    monkeypatch.setattr(network, "STALLED_WRITE_S", 1.0)
    watcher = observer()
    watcher.subscribe("stalled/#")
    client, changes = _connected_client(broker)
    os.kill(broker.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        for number in range(12_000):
            before = time.monotonic()
            client.publish(f"stalled/{number}", b"x" * 3001, qos=0)
            if time.monotonic() - before >= 0.9:  # this one was cut and waited out the limit
                break
        else:
            pytest.fail("no publish was cut by a full send buffer")
        assert time.monotonic() - started < 30
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
    try:
        seen = []
        deadline = time.monotonic() + 20
        while not (seen and seen[-1]) and time.monotonic() < deadline:
            item = changes.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, ConnectionChange) and (seen or not item.connected):
                seen.append(item.connected)
        assert seen == [False, True]  # cut mid-packet: the connection ended and came back
        assert client.publish("stalled/after", b"fine", qos=1)
        watcher.wait_for(lambda m: m.topic == "stalled/after")
    finally:
        client.stop()


def test_publishes_after_one_that_paho_holds_keep_their_order(broker, observer, monkeypatch):
    answers = _count_whole_writes(monkeypatch)
    watcher = observer()
    watcher.subscribe("held/#")
    client, _ = _connected_client(broker)
    big = bytes(range(256)) * 16384  # 4 MiB: paho's to write, more than the line holds at once
    os.kill(broker.process.pid, signal.SIGSTOP)  # it stops reading: paho keeps the rest queued
    try:
        assert client.publish("held/big", big, qos=0)
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
    # While paho's I/O thread writes the rest as the line takes it, small publishes find room
    # on the line now and then: they must queue behind paho's, never cut into it.
    sent = 0
    try:
        while not watcher.on("held/big") and sent < 20_000:
            assert client.publish(f"held/{sent}", b"small %d" % sent, qos=0)
            sent += 1
        watcher.wait_for(lambda m: m.topic == f"held/{sent - 1}", timeout=60)
    finally:
        client.stop()
    received = [m for m in watcher.messages if m.topic.startswith("held/")]
    assert [m.topic for m in received] == ["held/big"] + [f"held/{n}" for n in range(sent)]
    assert received[0].payload == big
    assert answers[0] is False  # the big one was paho's
