"""The fleet controller's core: broker connection, registry, ingest, commands, prompts, rollouts.

Threads and who owns what:

- the connection's I/O thread (``mqtt-<controller id>``, agent.mqtt.network) only decodes
  and enqueues. Its "queue" is ``_InboxRouter``: status/meta/telemetry/events go straight
  into ingest's bounded queues (the bulk of the traffic, one hop fewer; size, rate and
  overflow limits per device are ingest's, see agent.fleet.ingest), and each record of a
  prompt's reply straight to its waiter (one per streamed token: a waiter only enqueues, e.g.
  onto the web's event loop, so a token crosses the I/O thread and the loop, nothing else);
  everything else onto the dispatch queue. Only the I/O thread writes ``reply_counts``.
- ``fleet-dispatch`` takes cmd results to their waiter (a callback registered by the web
  side), then to ingest.
- ``fleet-ingest`` (agent.fleet.ingest) owns batched writes to the registry and calls
  ``_on_batch``, which feeds command results and download events to the rollout manager.
- ``fleet-rollout`` (agent.fleet.rollout) paces rollouts.
- The web server (uvicorn, agent.fleet.web) calls ``send_command``/``send_prompt`` from its
  event loop; those only publish and register waiters.

Replies: each prompt asks for its replies (MQTT 5 Response Topic, and ``reply_to`` for a 3.1.1
device) at ``<prefix>/reply/<controller id>/<key>``, ``key`` a fresh random token, and the
controller subscribes to its own inbox only: N controllers cost each reply once, not N times,
and a reply cannot be forged into a waiting request without its key (the broker ACL lets a
device write any inbox, and a controller read only its own).

Subscriptions: status, meta, cmd/result and the reply inbox on normal subscriptions
(retained status/meta are not delivered to shared subscribers); telemetry and events through
``$share/<group>/…`` so several controllers split the load. Start order is registry →
ingest → rollouts → MQTT → dispatch; stop is the reverse.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgspec

from agent.config import FleetConfig, default_state_dir, read_secret
from agent.errors import RequestError
from agent.fleet.hosting import ControllerKey
from agent.fleet import schemas
from agent.fleet.ingest import Ingest, topic_kind
from agent.fleet.registry import BatchOutcome, Registry
from agent.fleet.rollout import RolloutManager
from agent.log import get_logger
from agent.mqtt import payloads
from agent.mqtt.client import ConnectionChange, Inbound, MQTTClient
from agent.mqtt.topics import (
    DeviceTopics,
    device_id_problem,
    device_of,
    pool_prompt,
    reply_inbox,
)
from agent.topic_rules import SAFE_NAME

log = get_logger(__name__)

Waiter = Callable[[dict[str, Any]], None]
BULK_KINDS = frozenset({"status", "meta", "telemetry", "events"})


@dataclass(frozen=True)
class SentPrompt:
    """A published prompt: its request id, and the key its replies and waiter are found by."""

    request_id: str
    key: str


class _InboxRouter:
    """The MQTT client's inbox: device state messages to ingest, replies to their waiters, the
    rest to dispatch.

    Runs on paho's thread, so it only classifies a topic, decodes and enqueues (``Ingest.offer``,
    a reply waiter)."""

    def __init__(
        self, ingest: Ingest, dispatch: "queue.Queue[Inbound | ConnectionChange]", prefix: str,
        reply_inbox: str, on_reply: Callable[[Inbound], None],
    ) -> None:
        self.ingest = ingest
        self.dispatch = dispatch
        self.prefix = prefix
        self.reply_prefix = reply_inbox + "/"
        self.on_reply = on_reply

    def put(self, item: Inbound | ConnectionChange) -> None:
        if isinstance(item, Inbound) and item.topic.startswith(self.reply_prefix):
            self.on_reply(item)
            return
        # By the topic's shape, not its device id: ingest also counts the ones whose id cannot
        # be a device (``all``, ``pool``…), which must not reach the dispatch queue either.
        if isinstance(item, Inbound) and topic_kind(item.topic, self.prefix) in BULK_KINDS:
            self.ingest.offer(item.topic, item.payload)
            return
        self.dispatch.put(item)


def signing_key_path(config: FleetConfig) -> Path:
    """``signing_key_file``, else ``signing.key`` in the directory that holds the registry."""
    if config.signing_key_file:
        return Path(config.signing_key_file)
    if config.db_path == ":memory:":
        return default_state_dir() / "signing.key"
    return Path(config.db_path).parent / "signing.key"


class FleetController:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.prefix = config.mqtt.topic_prefix
        # First, before anything listens: every manifest this controller serves is signed.
        self.signing_key = ControllerKey.load_or_create(signing_key_path(config))
        log.info(
            "fleet_signing_key",
            key_id=self.signing_key.key_id,
            public_key=self.signing_key.public_key,
            created=self.signing_key.created,
            path=str(self.signing_key.path),
        )
        self.registry = Registry(
            config.registry.url or config.db_path,
            pool_size=config.registry.pool_size,
            password=read_secret(config.registry.password_file, "registry-password"),
            telemetry_sample_s=config.telemetry_sample_s,
            telemetry_retention_s=config.telemetry_retention_s,
            events_retention_s=config.events_retention_s,
            events_per_device=config.ingest.events_per_device,
            event_max_bytes=config.ingest.event_max_bytes,
        )
        self.ingest = Ingest(
            self.registry,
            prefix=self.prefix,
            flush_s=config.ingest_flush_s,
            limits=config.ingest,
            on_batch=self._on_batch,
        )
        self.rollouts = RolloutManager(
            self, command_timeout_s=config.command_timeout_s, lease_s=config.rollout_lease_s
        )
        self._inbox: queue.Queue[Inbound | ConnectionChange] = queue.Queue(maxsize=10_000)
        # Keyed by the MQTT account, which is what the broker's ACL lets read it.
        self.reply_inbox = reply_inbox(config.inbox_owner, self.prefix)
        # Messages that arrived in the inbox: for a waiting request, or for none (late, after
        # the waiter left, or sent there by someone without the key).
        self.reply_counts = {"delivered": 0, "unmatched": 0}
        router = _InboxRouter(self.ingest, self._inbox, self.prefix, self.reply_inbox,
                              self._deliver_reply)
        self.mqtt = MQTTClient(
            config.mqtt,
            client_id=config.controller_id,
            inbox=router,  # type: ignore[arg-type]
            password=read_secret(config.mqtt.password_file, "mqtt-password"),
        )
        # Apart, so that a record in the reply inbox (which any device may write) can never
        # reach a command's waiter, nor a cmd/result a prompt's, past its own checks.
        self._command_waiters: dict[str, Waiter] = {}
        self._reply_waiters: dict[str, Waiter] = {}
        self._waiters_lock = threading.Lock()
        self._stop = threading.Event()
        self._dispatch_thread: threading.Thread | None = None
        self.started_at = time.time()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> "FleetController":
        self.ingest.start()
        self.rollouts.start()
        p = self.prefix
        for kind in ("status", "meta", "cmd/result"):
            self.mqtt.subscribe(f"{p}/+/{kind}", 1)
        self.mqtt.subscribe(f"{self.reply_inbox}/+", 1)
        share = f"$share/{self.config.telemetry_share_group}/{p}/+"
        self.mqtt.subscribe(f"{share}/telemetry", 0)
        # Shared like telemetry: on a shared database each event is stored once, not N times.
        self.mqtt.subscribe(f"{share}/events", 1)
        self._dispatch_thread = threading.Thread(
            target=self._dispatch, name="fleet-dispatch", daemon=True
        )
        self._dispatch_thread.start()
        self.mqtt.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.mqtt.stop()
        if self._dispatch_thread:
            self._dispatch_thread.join(5)
        self.rollouts.stop()
        self.ingest.stop()
        self.registry.close()

    @property
    def connected(self) -> bool:
        return self.mqtt.connected

    # --- inbound -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(item, ConnectionChange):
                log.info(
                    "broker_connection",
                    connected=item.connected,
                    reason=item.reason,
                    fatal=item.fatal,
                )
                continue
            try:
                self._route(item)
            except Exception:  # one bad message must not stop the dispatcher
                log.exception("dispatch_failed", topic=item.topic)

    def _route(self, message: Inbound) -> None:
        split = device_of(message.topic, self.prefix)
        if split is None:
            return
        rest = split[1]
        if rest == "cmd/result" and len(message.payload) <= self.config.ingest.cmd_result_max_bytes:
            try:
                body = schemas.validate("cmd/result", msgspec.json.decode(message.payload))
            except (msgspec.DecodeError, RequestError):
                body = None  # ingest refuses it again, and flags the device
            if body is not None:
                self._deliver(self._command_waiters, body["id"], message.payload, body)
        self.ingest.offer(message.topic, message.payload)

    def _deliver_reply(self, message: Inbound) -> None:
        """paho's thread: one record of a prompt's reply to its waiter."""
        key = message.topic[len(self.reply_inbox) + 1 :]
        with self._waiters_lock:
            waiting = key in self._reply_waiters
        # A device that speaks MQTT 5 echoes the key as Correlation Data; a 3.1.1 one sends none.
        if not waiting or message.correlation_data not in (None, key.encode()):
            self.reply_counts["unmatched"] += 1
            return
        self.reply_counts["delivered"] += 1
        self._deliver(self._reply_waiters, key, message.payload)

    def _deliver(self, waiters: dict[str, Waiter], key: str, payload: bytes,
                 body: dict | None = None) -> None:
        with self._waiters_lock:
            waiter = waiters.get(key)
        if waiter is None:
            return
        if body is None:
            try:
                body = msgspec.json.decode(payload)
            except msgspec.DecodeError:
                log.warning("reply_not_json", request=key)
                return
        if isinstance(body, dict):
            waiter(body)

    def _on_batch(self, outcome: BatchOutcome) -> None:
        for device_id, body in outcome.cmd_results:
            self.rollouts.on_cmd_result(device_id, body)
        for device_id, body in outcome.events:
            self.rollouts.on_event(device_id, body)

    def remove_waiter(self, key: str) -> None:
        """End the wait for a command id or a prompt's reply key."""
        with self._waiters_lock:
            self._command_waiters.pop(key, None)
            self._reply_waiters.pop(key, None)

    # --- outbound ------------------------------------------------------------------------

    def _topics(self, device_id: str) -> DeviceTopics:
        # `all` or `pool` here would address the whole fleet or a pool through a device's API.
        problem = device_id_problem(device_id)
        if problem:
            raise RequestError(f"device: {device_id[:128]!r}: {problem}", field="device")
        return DeviceTopics(device_id, self.prefix)

    def send_command(
        self,
        device_id: str,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        source: str = "api",
        waiter: Waiter | None = None,
    ) -> str:
        """Validate against the contract, record, publish; returns the command id."""
        command_id = uuid.uuid4().hex
        body = {"id": command_id, "op": op, "args": args or {}}
        encoded = payloads.encode(body)
        payloads.decode_command(encoded, max_bytes=self.config.mqtt.max_payload_bytes)
        topics = self._topics(device_id)
        self.registry.record_command(command_id, device_id, op, body["args"], source)
        if waiter is not None:
            with self._waiters_lock:
                self._command_waiters[command_id] = waiter
        self.mqtt.publish(topics.cmd, encoded, qos=1)
        log.info("command_sent", device=device_id, op=op, command=command_id, source=source)
        return command_id

    def send_prompt(self, device_id: str, request: dict[str, Any], waiter: Waiter) -> SentPrompt:
        """Publish a prompt whose records go to ``waiter``, called on the MQTT I/O thread, so
        it must only hand the record on; the caller ends the wait with
        ``remove_waiter(sent.key)``."""
        return self._publish_prompt(self._topics(device_id).prompt, request, waiter, device_id)

    def send_pool_prompt(self, pool: str, request: dict[str, Any], waiter: Waiter) -> SentPrompt:
        """Like send_prompt, to the pool's shared subscription: the broker picks the device."""
        if not SAFE_NAME.fullmatch(pool):
            raise RequestError(
                f"pool: {pool[:80]!r}: use letters, digits, '.', '_', '-'", field="pool"
            )
        return self._publish_prompt(pool_prompt(pool, self.prefix), request, waiter, f"pool/{pool}")

    def _publish_prompt(
        self, topic: str, request: dict[str, Any], waiter: Waiter, target: str
    ) -> SentPrompt:
        body = dict(request)
        body.setdefault("id", uuid.uuid4().hex)
        key = secrets.token_hex(16)
        reply_topic = f"{self.reply_inbox}/{key}"
        body["reply_to"] = reply_topic  # for a device on MQTT 3.1.1; 5 uses the Response Topic
        encoded = payloads.encode(body)
        payloads.decode_prompt(encoded, max_bytes=self.config.mqtt.max_payload_bytes)
        with self._waiters_lock:
            self._reply_waiters[key] = waiter
        self.mqtt.publish(
            topic, encoded, qos=1, response_topic=reply_topic, correlation_data=key.encode()
        )
        log.info("prompt_sent", target=target, request=body["id"])
        return SentPrompt(str(body["id"]), key)
