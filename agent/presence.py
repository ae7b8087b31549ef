"""How the device appears on the broker: its connections (with the ``lost`` Will), the
retained ``status`` and ``meta``, Home Assistant discovery, and ``events``.

``DeviceLink`` makes the connections and publishes; paho's publish is thread-safe, so any
thread may call it. ``Presence`` decides what status and meta say; it reads the model state
(the ModelSupervisor's snapshot, the engine's selection) and the ledger, and owns one piece of
state itself: ``draining``, set by the drain/resume ops, under its lock with the last
published state. Meta is built in one place, ``Presence.meta``: add a field there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import msgspec

from agent import __version__
from agent.buildinfo import build_info
from agent.catalog.selection import Selection
from agent.catalog.signing import key_id
from agent.config import AgentConfig, read_secret
from agent.ledger import ReplyRoute, RequestLedger
from agent.mqtt import payloads, topics
from agent.mqtt.client import ConnectionChange, Inbound, MQTTClient, Will
from agent.mqtt.discovery import discovery_messages
from agent.notify import Notifier
from agent.runtime.engine import Engine
from agent.supervisor import ModelSupervisor


class DeviceLink:
    """The device's MQTT connection, and the pool's when ``mqtt.pool`` is set."""

    def __init__(self, config: AgentConfig, *, session: int, inbox: Any) -> None:
        self.config = config
        self.topics = topics.DeviceTopics(config.device_id, config.mqtt.topic_prefix)
        mqtt = config.mqtt
        will = Will(self.topics.status,
                    payloads.encode(payloads.status("lost", session=session, version=__version__)),
                    qos=1, retain=True, delay_s=mqtt.will_delay_s)
        password = read_secret(mqtt.password_file, "mqtt-password")
        self.mqtt = MQTTClient(mqtt, client_id=config.device_id, inbox=inbox, password=password,
                               will=will)
        for topic in (self.topics.prompt, self.topics.cmd, self.topics.broadcast_cmd):
            self.mqtt.subscribe(topic, 1)
        self.pool: MQTTClient | None = None
        if mqtt.pool:
            # A session that ends with the connection: brokers (Mosquitto, EMQX, as MQTT allows)
            # keep giving a shared subscription's share to a member whose session outlives its
            # connection, so on the device's persistent session a killed agent's share of the
            # pool's prompts would wait for it instead of going to the rest of the pool. Its
            # client id cannot be a device's (device ids never hold '/').
            pool_config = msgspec.structs.replace(mqtt, username=mqtt.username or config.device_id,
                                                  session_expiry_s=0)
            self.pool = MQTTClient(pool_config, client_id=f"{config.device_id}/pool", inbox=inbox,
                                   password=password)
            self.pool.subscribe(topics.shared_pool_subscription(mqtt.pool, mqtt.topic_prefix), 1)

    def start(self) -> None:
        self.mqtt.start()
        if self.pool is not None:
            self.pool.start()

    def stop_pool(self) -> None:
        """The pool's other members take its prompts from now on."""
        if self.pool is not None:
            self.pool.stop()

    def stop(self, flush_timeout_s: float) -> bool:
        """Wait for QoS 1 acks (False on timeout), then disconnect (the broker drops the Will)."""
        flushed = self.mqtt.flush(timeout=flush_timeout_s)
        self.mqtt.stop()
        return flushed

    def is_prompt(self, message: Inbound) -> bool:
        pool = self.config.mqtt.pool
        return message.topic == self.topics.prompt or bool(
            pool and message.topic == topics.pool_prompt(pool, self.config.mqtt.topic_prefix))

    def is_own_connect(self, change: ConnectionChange) -> bool:
        return change.connected and change.client_id == self.config.device_id  # not the pool's

    def reply(self, route: ReplyRoute, encoded: bytes) -> None:
        """A final reply or a cmd/result: QoS 1."""
        self.mqtt.publish(route.topic, encoded, qos=1, correlation_data=route.correlation_data)

    def event(self, event_name: str, /, **fields: Any) -> None:
        body = payloads.event(event_name, **fields)
        self.mqtt.publish(self.topics.events, payloads.encode(body), qos=1)

    def telemetry(self, body: dict[str, Any]) -> None:
        self.mqtt.publish(self.topics.telemetry, payloads.encode(body), qos=0)

    def engine_event(self, event: dict[str, Any]) -> None:
        fields = {k: v for k, v in event.items() if k != "event"}
        self.event(str(event.get("event", "engine")), **fields)


class Presence:
    def __init__(self, config: AgentConfig, *, link: DeviceLink, session: int, engine: Engine,
                 supervisor: ModelSupervisor, ledger: RequestLedger, notifier: Notifier,
                 stopping: Callable[[], bool]) -> None:
        self.config = config
        self.link = link
        self.session = session
        self.engine = engine
        self.supervisor = supervisor
        self.ledger = ledger
        self.notifier = notifier
        self.stopping = stopping
        self._lock = threading.Lock()
        self._draining = False
        self._published: str | None = None

    def set_draining(self, draining: bool) -> None:
        with self._lock:
            self._draining = draining
        self.refresh()

    def state(self) -> payloads.State:
        if self.engine.selection is None:
            return "degraded"
        with self._lock:
            if self._draining:
                return "draining"
        return "busy" if self.ledger.prompts_in_flight() else "ready"

    def publish_status(self, state: payloads.State, *, force: bool = False) -> None:
        with self._lock:
            if state == self._published and not force:
                return
            self._published = state
            body = payloads.status(state, session=self.session, version=__version__)
            self.link.mqtt.publish(self.link.topics.status, payloads.encode(body), qos=1,
                                   retain=True)
        if state not in ("busy", "ready"):  # busy/ready flip per request: not worth a STATUS line
            self.notifier.status(self.status_line(state))

    def refresh(self) -> None:
        """Any thread: publish the state if it changed (not once the daemon is stopping)."""
        if not self.stopping():
            self.publish_status(self.state())

    def status_line(self, state: str | None = None) -> str:
        state = state or self.state()
        connected = "connected" if self.link.mqtt.connected else "not connected"
        problem = self.supervisor.status.problem
        detail = f" ({problem})" if problem and state == "degraded" else ""
        model = self.supervisor.model_name()
        return f"{state}{detail}: model {model}, MQTT {connected}, session {self.session}"

    def birth(self) -> None:
        """Retained status and meta (and Home Assistant discovery): at start, every connect."""
        self.publish_status(self.state(), force=True)
        self.link.mqtt.publish(self.link.topics.meta, payloads.encode(self.meta()), qos=1,
                               retain=True)
        ha = self.config.home_assistant
        if ha.enabled:
            for topic, body in discovery_messages(
                    self.link.topics, discovery_prefix=ha.discovery_prefix, version=__version__):
                self.link.mqtt.publish(topic, payloads.encode(body), qos=1, retain=True)

    def meta(self) -> dict[str, Any]:
        """The retained ``meta``: what the controller knows this device by."""
        selection = self.engine.selection
        model = self.supervisor.status
        device = model.device
        return {
            "device_id": self.config.device_id,
            "version": __version__,
            "session": self.session,
            "probe": msgspec.to_builtins(device) if device else None,
            "profile": {"name": selection.profile if selection else None,
                        "reasons": list(model.profile_reasons)},
            "selection": selection_meta(selection) if selection else None,
            "selection_source": model.selection_source,
            # gguf / manifest:<name> / config:<name> / none: how messages become a prompt
            "chat_template": selection.chat_template if selection else None,
            "problem": model.problem,
            "runtime": msgspec.to_builtins(device.llama) if device and device.llama else None,
            "pool": self.config.mqtt.pool,
            "labels": self.config.labels,  # inventory labels, for rollout targets and filters
            # The pin selection honours (a pin command's over the config's): plans and rollbacks.
            "pin": self.supervisor.state.overrides().get("pin", self.config.model.pin),
            "protocol": self.config.mqtt.protocol,
            "signing": signing_meta(self.config),
            "build": msgspec.to_builtins(build_info()),  # versions, engine build key and flags
        }


def selection_meta(selection: Selection) -> dict[str, Any]:
    """The selection without its explain table: meta is retained on the broker for every
    device, and the table (several KiB) is what the ``select`` command answers. The variants'
    names stay, for the dashboard's pin list."""
    facts = msgspec.to_builtins(msgspec.structs.replace(selection, candidates=[]))
    facts["variants"] = [candidate.quant for candidate in selection.candidates]
    return facts


def signing_meta(config: AgentConfig) -> dict[str, Any]:
    """Whether manifests must be signed and by which key: an opt-out is visible fleet-wide."""
    signing = config.signing
    return {"required": signing.required, "allow_unsigned": signing.allow_unsigned,
            "key_id": key_id(signing.public_key) if signing.public_key else None}
