"""A real paho MQTT 5 client that records what arrives: the controller's or a user's view."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None


class Observer:
    """A second MQTT client, as a controller or a user would have."""

    def __init__(self, host: str, port: int) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"obs-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_connect = self._on_connect
        self._topics: list[str] = []
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = 300  # keeps what arrives while a broker restart is under way
        self.client.connect(host, port, clean_start=False, properties=session)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        for topic in self._topics:  # survive broker restarts like a real controller
            client.subscribe(topic, 1)

    def _on_message(self, client, userdata, message) -> None:
        props = message.properties
        with self._cond:
            self.messages.append(Received(message.topic, bytes(message.payload), bool(message.retain),
                                          getattr(props, "CorrelationData", None) if props else None))
            self._cond.notify_all()

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self._topics.append(topic)
        self.client.subscribe(topic, 1)
        assert self._subscribed.wait(5)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, response_topic: str | None = None,
                correlation_data: bytes | None = None) -> None:
        props = None
        if response_topic or correlation_data:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data:
                props.CorrelationData = correlation_data
        self.client.publish(topic, payload, qos=qos, properties=props).wait_for_publish(5)

    def wait_for(self, match: Callable[[Received], bool], timeout: float = 20) -> Received:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages:
                    if match(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"nothing matched within {timeout}s; got {[m.topic for m in self.messages][-20:]}")
                self._cond.wait(remaining)

    def on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Observers:
    """Observers made on one broker during a test, each subscribed as asked; closed together."""

    def __init__(self, broker) -> None:
        self.broker = broker
        self.made: list[Observer] = []

    def connect(self, *subscriptions: str) -> Observer:
        observer = Observer(self.broker.host, self.broker.port)
        for topic in subscriptions:
            observer.subscribe(topic)
        self.made.append(observer)
        return observer

    def close(self) -> None:
        for observer in self.made:
            observer.close()
