"""The device daemon (``edge-agent run``): the composition root that wires every subsystem.

Start order (``Daemon.run``; stop runs it backwards in ``Daemon._shutdown``):

1. state: the session counter, command overrides (pin, manifest) and the last good Selection,
   all in ``state_dir`` (agent.daemon_state)
2. MQTT client with its Will (``lost``, same session, after the Will Delay); connects in the
   background so ``starting`` and download progress are visible while the model loads
3. probe → match profile → load manifest → select (agent.catalog.select.plan_selection);
   when planning fails (manifest or network unreachable) the last good Selection is reused
4. fetch (ModelStore.ensure; offline it serves what the store holds)
5. engine: load with canary and the fallback ladder
6. dispatcher, ops and telemetry threads; ``status``/``meta`` published
7. READY=1 to systemd once MQTT is connected and the model passed its canary

A failed model (no fit, no cached file, every fallback failed) does not stop the daemon: it
reports ``degraded``, answers prompts with ``no_model`` and takes ``set_manifest``/``pin``/
``reload`` so the fleet can repair it.

Threads, and what each owns (one model: threads that talk through queues and one stop event):

- main: signal handlers (they only set ``stop_event``), the sd_notify watchdog ping at half
  of WATCHDOG_USEC (only while the dispatcher's heartbeat is fresh, so a hung dispatcher gets
  the unit restarted), startup and shutdown.
- paho's network thread (agent.mqtt.client), one per connection (the device's own, and the
  pool's when ``mqtt.pool`` is set): decodes messages into ``inbox``; nothing else.
- ``dispatcher``: owns ``inbox``. Validates prompts and commands, the idempotency record,
  submits prompts to the engine, answers quick commands (drain, resume, rebirth) and the birth
  messages after each connect; hands slow commands to ``ops``. It waits on the worker for
  each prompt's token count (Engine.submit's round trip, at most COUNT_TIMEOUT_S), never on a
  generation or a model change.
- ``ops``: owns model changes (reload, select, fetch, bench, pin, set_manifest) and agent
  upgrades (agent.upgrade), one at a time.
- ``upgrades``: closes a new version's trial once healthy, or asks for an exit at its
  deadline; reports the last upgrade's outcome; then ends (agent.upgrade.AgentUpgrades.watch).
- ``telemetry``: one message every ``telemetry.interval_s`` after a jittered start, waiting
  on ``stop_event.wait(interval)`` so shutdown is immediate.
- the engine's threads call ``_on_record`` (chunks from the worker's frame-reader thread,
  the final from the engine's dispatcher, one at a time per request), which only publishes
  (paho's publish is thread-safe) and stores the final in the idempotency record.

This module decides and wires; it must not parse payloads (agent.mqtt.payloads), name topics
(agent.mqtt.topics), talk paho (agent.mqtt.client) or touch llama_cpp (the worker).
"""

from __future__ import annotations

import queue
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import msgspec
import psutil

from agent import __version__
from agent.catalog.manifest import is_url
from agent.catalog.profiles import load_profiles, match_profile
from agent.catalog.select import plan_selection
from agent.catalog.selection import Selection
from agent.catalog.signing import key_id
from agent.config import AgentConfig, read_secret
from agent.daemon_state import DaemonState
from agent.errors import (
    BusyError,
    CancelledError_,
    EdgeAgentError,
    NoModelError,
    RequestError,
)
from agent.fetch.store import ModelStore
from agent.hardware.device import DeviceInfo
from agent.hardware.probe import probe
from agent.log import get_logger
from agent.mqtt import payloads, topics
from agent.mqtt.client import ConnectionChange, Inbound, MQTTClient, Will
from agent.mqtt.discovery import discovery_messages
from agent.mqtt.idempotency import RecentRequests
from agent.notify import Notifier
from agent.runtime.engine import Engine
from agent.runtime.request import ChatMessage, GenerateRequest
from agent.upgrade import AgentUpgrades

log = get_logger(__name__)

# Exit status when the broker refuses the credentials: retrying cannot help, so the unit
# should not restart (RestartPreventExitStatus=78; 78 is EX_CONFIG in sysexits.h).
EXIT_BAD_CREDENTIALS = 78
# How long a SIGTERM waits for in-flight requests before failing them; below systemd's
# default TimeoutStopSec (90 s) with room for the engine and MQTT to close.
STOP_GRACE_S = 20.0
# Without a systemd watchdog the main loop still wakes this often to check its threads.
MAIN_TICK_S = 1.0
# The dispatcher wakes at least this often, so its heartbeat stays fresh while idle.
DISPATCH_POLL_S = 0.5
# At most this many ``rejected_input`` events per second; the rest are counted into the
# next one, so a flood of garbage cannot flood ``events``.
REJECTED_EVENTS_PER_S = 20
QUICK_OPS = frozenset({"drain", "resume", "rebirth"})


@dataclass(frozen=True)
class ReplyRoute:
    """Where the records of one request go."""

    topic: str
    correlation_data: bytes | None = None


class Daemon:
    def __init__(self, config: AgentConfig, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.topics = topics.DeviceTopics(config.device_id, config.mqtt.topic_prefix)
        self.reply_policy = topics.ReplyPolicy.for_device(
            self.topics, discovery_prefix=config.home_assistant.discovery_prefix,
            allowed=config.mqtt.reply_topics)
        self.state = DaemonState(Path(config.state_dir))
        self.stop_event = threading.Event()
        self.inbox: queue.Queue[Inbound | ConnectionChange] = queue.Queue(maxsize=10000)
        self.ops: queue.Queue[tuple[payloads.Command, ReplyRoute | None] | None] = queue.Queue()
        self.recent = RecentRequests(config.mqtt.dedup_entries)
        self.exit_code = 0
        self.session = 0
        self.device: DeviceInfo | None = None
        self.profile_reasons: list[str] = []
        self.selection_source = "none"  # planned | cached | none
        self.problem: str | None = None  # why the daemon is degraded
        self.store = ModelStore(
            Path(config.cache_dir), budget_bytes=config.fetch.store_budget_bytes, fetch=config.fetch
        )
        self.engine: Engine | None = None
        self.mqtt: MQTTClient | None = None
        self.upgrades = AgentUpgrades(
            config.upgrade, config.fetch, publish_event=self._publish_event, request_exit=self._exit,
            connected=lambda: bool(self.mqtt and self.mqtt.connected),
            model_loaded=lambda: bool(self.engine and self.engine.selection))
        self.pool_mqtt: MQTTClient | None = None  # mqtt.pool's own connection (_make_pool_client)
        self._threads: list[threading.Thread] = []
        self._heartbeat = time.monotonic()
        self._status_lock = threading.Lock()
        self._published_state: str | None = None
        self._draining = False
        self._inflight: dict[str, ReplyRoute] = {}  # prompt id -> route, until its final
        self._inflight_lock = threading.Lock()
        self._rejected_window = (0.0, 0)  # (second, events sent in it)
        self._rejected_suppressed = 0
        self._telemetry_seq = 0

    # -- the composition root ------------------------------------------------------------

    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, stop in reverse. Returns the exit code."""
        self._install_signal_handlers()
        self.notifier.status("starting")
        self.session = self.state.next_session()
        if self.config.signing.allow_unsigned:
            log.warning("manifest_signatures_off", reason="signing.allow_unsigned is true: any "
                        "writer of a manifest or of cmd decides what this device loads")
        else:
            log.info("manifest_signatures_required", **self._signing_meta())
        self.mqtt = self._make_mqtt_client()
        self._subscribe_all()
        self.mqtt.start()
        self.pool_mqtt = self._make_pool_client()
        self._publish_status("starting")

        self.engine = Engine(
            self.config.runtime, state_dir=Path(self.config.state_dir),
            device_id=self.config.device_id, on_event=self._publish_engine_event,
        )
        # Not in _threads: it ends once a new version's trial is settled and reported.
        threading.Thread(target=self.upgrades.watch, args=(self.stop_event,), name="upgrades",
                         daemon=True).start()
        self._bring_up_model()

        for name, target in (("dispatcher", self._dispatch_loop), ("ops", self._ops_loop),
                             ("telemetry", self._telemetry_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._birth()

        ready_sent = False
        tick = self.notifier.watchdog_interval_s or MAIN_TICK_S
        while not self.stop_event.is_set():
            if not ready_sent and self.mqtt.connected:
                self.notifier.ready(self._status_line())
                ready_sent = True
                log.info("ready", state=self._state(), model=self._model_name())
            if self._threads_alive():
                self.notifier.watchdog()
            else:
                log.error("thread_stalled", heartbeat_age_s=round(time.monotonic() - self._heartbeat, 1))
            self.stop_event.wait(min(tick, MAIN_TICK_S) if not ready_sent else tick)
        self._shutdown()
        return self.exit_code

    def _bring_up_model(self) -> None:
        """Probe → profile → plan → fetch → load. A failure leaves the daemon degraded, not dead."""
        assert self.engine is not None
        try:
            self.device = probe(model_dir=self.config.cache_dir)
            self.notifier.status("selecting a model")
            selection = self._plan_or_last_good()
            self.notifier.status(f"fetching {selection.file}")
            selection = self._fetched(selection)
            self.notifier.status(f"loading {selection.quant} (canary)")
            self.engine.load(selection, smaller=self._smaller)
        except EdgeAgentError as exc:
            self.problem = f"{exc.code}: {exc.message}"
            log.error("model_unavailable", code=exc.code, error=exc.message)
            self._publish_event("model_unavailable", error=exc.to_dict())
            return
        loaded = self.engine.selection or selection
        self.state.save_selection(loaded)
        self.problem = None
        self._publish_event("model_loaded", model_id=loaded.model_id, quant=loaded.quant,
                            source=self.selection_source)

    def _shutdown(self) -> None:
        """Reverse of run(): stop taking work, finish or fail in-flight requests, say `stopped`."""
        assert self.mqtt is not None and self.engine is not None
        with self._inflight_lock:
            pending = len(self._inflight)
        self.notifier.stopping(f"stopping: finishing {pending} request(s)")
        log.info("stopping", in_flight=pending)
        if self.pool_mqtt is not None:
            self.pool_mqtt.stop()  # the pool's other members take its prompts from now on
        self.ops.put(None)
        for thread in self._threads:
            thread.join(timeout=STOP_GRACE_S if thread.name == "dispatcher" else 5.0)
        self.engine.close(timeout_s=STOP_GRACE_S)  # queued ones get `cancelled`, the running one ends
        with self._inflight_lock:
            leftover = dict(self._inflight)
        for request_id, route in leftover.items():
            self._finish_prompt(route, request_id, payloads.error_final(
                request_id, CancelledError_("the agent stopped before this request ran; send it again").to_dict()))
        self._publish_status("stopped", force=True)
        if not self.mqtt.flush(timeout=5.0):
            log.warning("mqtt_flush_timeout")
        self.mqtt.stop()
        self.notifier.close()
        log.info("stopped", exit_code=self.exit_code)

    def _install_signal_handlers(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            self.stop_event.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        # SIGHUP (systemctl reload) re-plans and swaps, like the `reload` command.
        signal.signal(signal.SIGHUP, lambda s, f: self.ops.put((
            payloads.Command(id=f"sighup-{int(time.time())}", op="reload", args=payloads.NoArgs()), None)))

    def _threads_alive(self) -> bool:
        fresh = time.monotonic() - self._heartbeat < max(10.0, 4 * DISPATCH_POLL_S)
        return fresh and all(t.is_alive() for t in self._threads)

    # -- MQTT wiring ----------------------------------------------------------------------

    def _make_mqtt_client(self) -> MQTTClient:
        mqtt = self.config.mqtt
        will = Will(
            self.topics.status,
            payloads.encode(payloads.status("lost", session=self.session, version=__version__)),
            qos=1, retain=True, delay_s=mqtt.will_delay_s,
        )
        return MQTTClient(
            mqtt,
            client_id=self.config.device_id,
            inbox=self.inbox,
            password=read_secret(mqtt.password_file, "mqtt-password"),
            will=will,
        )

    def _subscribe_all(self) -> None:
        assert self.mqtt is not None
        self.mqtt.subscribe(self.topics.prompt, 1)
        self.mqtt.subscribe(self.topics.cmd, 1)
        self.mqtt.subscribe(self.topics.broadcast_cmd, 1)

    def _make_pool_client(self) -> MQTTClient | None:
        """A second connection for the pool's shared subscription, with a session that ends
        with it. Brokers (Mosquitto, EMQX, as MQTT allows) keep giving a shared subscription's
        share to a member whose session outlives its connection, so on the device's persistent
        session a killed agent's share of the pool's prompts would wait for it instead of going
        to the rest of the pool. Same username, TLS and password as the device's connection;
        its client id cannot be a device's (device ids never hold '/')."""
        mqtt = self.config.mqtt
        if not mqtt.pool:
            return None
        client = MQTTClient(
            msgspec.structs.replace(mqtt, username=mqtt.username or self.config.device_id, session_expiry_s=0),
            client_id=f"{self.config.device_id}/pool",
            inbox=self.inbox,
            password=read_secret(mqtt.password_file, "mqtt-password"),
        )
        client.subscribe(topics.shared_pool_subscription(mqtt.pool, mqtt.topic_prefix), 1)
        client.start()
        return client

    def _birth(self) -> None:
        """Retained status and meta (and Home Assistant discovery): after start and every connect."""
        assert self.mqtt is not None
        self._publish_status(self._state(), force=True)
        self.mqtt.publish(self.topics.meta, payloads.encode(self._meta()), qos=1, retain=True)
        ha = self.config.home_assistant
        if ha.enabled:
            for topic, config in discovery_messages(self.topics, discovery_prefix=ha.discovery_prefix,
                                                    version=__version__):
                self.mqtt.publish(topic, payloads.encode(config), qos=1, retain=True)

    # -- status ---------------------------------------------------------------------------

    def _state(self) -> payloads.State:
        if self.engine is None or self.engine.selection is None:
            return "degraded"
        if self._draining:
            return "draining"
        with self._inflight_lock:
            busy = bool(self._inflight)
        return "busy" if busy else "ready"

    def _publish_status(self, state: payloads.State, *, force: bool = False) -> None:
        assert self.mqtt is not None
        with self._status_lock:
            if state == self._published_state and not force:
                return
            self._published_state = state
            self.mqtt.publish(self.topics.status,
                              payloads.encode(payloads.status(state, session=self.session, version=__version__)),
                              qos=1, retain=True)
        if state not in ("busy", "ready"):  # busy/ready flip per request: not worth a STATUS line
            self.notifier.status(self._status_line(state))

    def _refresh_status(self) -> None:
        if not self.stop_event.is_set():
            self._publish_status(self._state())

    def _status_line(self, state: str | None = None) -> str:
        state = state or self._state()
        connected = "connected" if self.mqtt and self.mqtt.connected else "not connected"
        detail = f" ({self.problem})" if self.problem and state == "degraded" else ""
        return f"{state}{detail}: model {self._model_name()}, MQTT {connected}, session {self.session}"

    def _model_name(self) -> str:
        selection = self.engine.selection if self.engine else None
        return f"{selection.model_id} {selection.quant}" if selection else "none"

    def _meta(self) -> dict[str, Any]:
        selection = self.engine.selection if self.engine else None
        return {
            "device_id": self.config.device_id,
            "version": __version__,
            "session": self.session,
            "probe": msgspec.to_builtins(self.device) if self.device else None,
            "profile": {"name": selection.profile if selection else None, "reasons": self.profile_reasons},
            "selection": self._selection_meta(selection) if selection else None,
            "selection_source": self.selection_source,
            # gguf / manifest:<name> / config:<name> / none: how messages become a prompt
            "chat_template": selection.chat_template if selection else None,
            "problem": self.problem,
            "runtime": msgspec.to_builtins(self.device.llama) if self.device and self.device.llama else None,
            "pool": self.config.mqtt.pool,
            "labels": self.config.labels,  # inventory labels, for rollout targets and filters
            "protocol": self.config.mqtt.protocol,
            "signing": self._signing_meta(),
        }

    @staticmethod
    def _selection_meta(selection: Selection) -> dict[str, Any]:
        """The selection without its explain table: meta is retained on the broker for every
        device, and the table (several KiB) is what the ``select`` command answers. The
        variants' names stay, for the dashboard's pin list."""
        facts = msgspec.to_builtins(msgspec.structs.replace(selection, candidates=[]))
        facts["variants"] = [candidate.quant for candidate in selection.candidates]
        return facts

    def _signing_meta(self) -> dict[str, Any]:
        """Whether manifests must be signed and by which key: an opt-out is visible fleet-wide."""
        signing = self.config.signing
        return {"required": signing.required, "allow_unsigned": signing.allow_unsigned,
                "key_id": key_id(signing.public_key) if signing.public_key else None}

    # -- dispatcher thread ------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            self._heartbeat = time.monotonic()
            if self.stop_event.is_set() and self.inbox.empty():
                return
            try:
                item = self.inbox.get(timeout=DISPATCH_POLL_S)
            except queue.Empty:
                continue
            try:
                self._dispatch(item)
            except Exception:  # one bad message must never stop the dispatcher
                log.exception("dispatch_failed", item=type(item).__name__)

    def _dispatch(self, item: Inbound | ConnectionChange) -> None:
        if isinstance(item, ConnectionChange):
            if item.fatal:
                self.exit_code = EXIT_BAD_CREDENTIALS
                self.stop_event.set()
            elif item.connected and item.client_id == self.config.device_id:  # not the pool's
                self._birth()
            return
        prefix = self.config.mqtt.topic_prefix
        if item.topic == self.topics.prompt or (
            self.config.mqtt.pool and item.topic == topics.pool_prompt(self.config.mqtt.pool, prefix)
        ):
            self._handle_prompt(item)
        elif item.topic in (self.topics.cmd, self.topics.broadcast_cmd):
            self._handle_command(item)
        else:
            log.warning("unexpected_topic", topic=item.topic)

    def _route(self, message: Inbound, request_id: str | None,
               reply_to: str | None) -> tuple[ReplyRoute | None, RequestError | None]:
        """Response Topic + Correlation Data, else ``reply_to``, else the default reply topic.

        A requested topic that the reply policy refuses is never written to: the route is the
        next address that is allowed (the default reply topic at the latest), and the refusal
        comes back with it, so the request is answered there with ``bad_request``."""
        refused: RequestError | None = None
        for field, topic in (("response_topic", message.response_topic), ("reply_to", reply_to)):
            if not topic:
                continue
            why = self.reply_policy.refusal(topic)
            if why is None:
                return ReplyRoute(topic, message.correlation_data), refused
            refused = refused or RequestError(f"{field}: {why}", field=field)
        if request_id and topics.is_valid_level(request_id) and len(request_id) <= payloads.MAX_ID_CHARS:
            return ReplyRoute(self.topics.reply(request_id), message.correlation_data), refused
        return None, refused

    def _handle_prompt(self, message: Inbound) -> None:
        assert self.engine is not None and self.mqtt is not None
        max_bytes = self.config.mqtt.max_payload_bytes
        try:
            request = payloads.decode_prompt(message.payload, max_bytes=max_bytes)
        except RequestError as exc:
            hint = payloads.reply_hint(message.payload, max_bytes=max_bytes)
            route, _ = self._route(message, hint.id, hint.reply_to)
            self._reject(message, exc, route, hint.id, kind="prompt")
            return
        route, refused = self._route(message, request.id, request.reply_to)
        if refused is not None:  # the request does not run: it asked to write where it may not
            self._reject(message, refused, route, request.id, kind="prompt", event=True)
            return
        if self.stop_event.is_set():
            if route:
                self._send_final(route, payloads.encode(payloads.error_final(
                    request.id, CancelledError_("the agent is stopping; send the request again later").to_dict())))
            return
        assert route is not None  # decode_prompt guarantees a usable id
        key = f"prompt:{request.id}"
        admission = self.recent.admit(key)
        if admission.seen == "in_flight":
            log.info("duplicate_ignored", id=request.id, seen="in_flight")
            return
        if admission.seen == "finished":
            log.info("duplicate_answered", id=request.id)
            self._send_final(route, admission.final or b"")
            return
        with self._inflight_lock:
            self._inflight[request.id] = route
        self._refresh_status()
        try:
            self.engine.submit(request, lambda record: self._on_record(route, request, record))
        except EdgeAgentError as exc:
            final = payloads.error_final(request.id, exc.to_dict())
            if isinstance(exc, (BusyError, NoModelError)):
                # Not a property of the request: the same id may be sent again later and run.
                with self._inflight_lock:
                    self._inflight.pop(request.id, None)
                self.recent.forget(key)
                self._send_final(route, payloads.encode(final))
                self._refresh_status()
            else:
                self._finish_prompt(route, request.id, final)

    def _on_record(self, route: ReplyRoute, request: GenerateRequest, record: dict[str, Any]) -> None:
        """Engine thread: publish a chunk (QoS 0) or the final record (QoS 1)."""
        assert self.mqtt is not None
        if record.get("done"):
            self._finish_prompt(route, request.id, record)
        elif request.stream:
            self.mqtt.publish(route.topic, payloads.encode(record), qos=0,
                              correlation_data=route.correlation_data)

    def _finish_prompt(self, route: ReplyRoute, request_id: str, final: dict[str, Any]) -> None:
        encoded = payloads.encode(final)
        self.recent.finish(f"prompt:{request_id}", encoded)
        with self._inflight_lock:
            self._inflight.pop(request_id, None)
        self._send_final(route, encoded)
        self._refresh_status()

    def _send_final(self, route: ReplyRoute, encoded: bytes) -> None:
        assert self.mqtt is not None
        self.mqtt.publish(route.topic, encoded, qos=1, correlation_data=route.correlation_data)

    def _handle_command(self, message: Inbound) -> None:
        max_bytes = self.config.mqtt.max_payload_bytes
        try:
            command = payloads.decode_command(message.payload, max_bytes=max_bytes)
        except RequestError as exc:
            hint = payloads.reply_hint(message.payload, max_bytes=max_bytes)
            route = ReplyRoute(self.topics.cmd_result, message.correlation_data) if hint.id else None
            self._reject(message, exc, route, hint.id, kind="cmd")
            return
        key = f"cmd:{command.id}"
        admission = self.recent.admit(key)
        route = ReplyRoute(self.topics.cmd_result, message.correlation_data)
        if admission.seen == "in_flight":
            return
        if admission.seen == "finished":
            self._send_final(route, admission.final or b"")
            return
        if command.op in QUICK_OPS:
            self._run_command(command, route)
        else:
            self.ops.put((command, route))

    def _reject(self, message: Inbound, error: RequestError, route: ReplyRoute | None,
                request_id: str | None, *, kind: str, event: bool = False) -> None:
        """An error reply where a reply path exists, else (and with ``event`` also) a
        rate-limited ``events`` record."""
        log.info("rejected_input", topic=message.topic, code=error.code, error=error.message[:200])
        if route is not None:
            body = (payloads.error_final(request_id, error.to_dict()) if kind == "prompt"
                    else payloads.cmd_result(request_id, error=error.to_dict()))
            self._send_final(route, payloads.encode(body))
            if not event:
                return
        second = int(time.monotonic())
        window, sent = self._rejected_window
        if window != second:
            window, sent = second, 0
        if sent >= REJECTED_EVENTS_PER_S:
            self._rejected_suppressed += 1
            self._rejected_window = (window, sent)
            return
        self._rejected_window = (window, sent + 1)
        suppressed, self._rejected_suppressed = self._rejected_suppressed, 0
        self._publish_event("rejected_input", topic=message.topic, payload_kind=kind, bytes=len(message.payload),
                            error=error.to_dict(), suppressed_before=suppressed)

    # -- commands -------------------------------------------------------------------------

    def _ops_loop(self) -> None:
        while True:
            item = self.ops.get()
            if item is None:
                return
            command, route = item
            self._run_command(command, route)

    def _run_command(self, command: payloads.Command, route: ReplyRoute | None) -> None:
        handler: Callable[[Any], Any] = getattr(self, f"_op_{command.op}")
        log.info("command", id=command.id, op=command.op)
        try:
            body = payloads.cmd_result(command.id, result=handler(command.args))
        except EdgeAgentError as exc:
            body = payloads.cmd_result(command.id, error=exc.to_dict())
        except Exception as exc:  # an op bug must answer, not hang the controller
            log.exception("command_failed", id=command.id, op=command.op)
            body = payloads.cmd_result(command.id, error={"code": "internal", "message": str(exc)})
        encoded = payloads.encode(body)
        self.recent.finish(f"cmd:{command.id}", encoded)
        if route is not None:
            self._send_final(route, encoded)

    def _op_drain(self, args: payloads.NoArgs) -> dict[str, Any]:
        assert self.engine is not None
        self._draining = True
        # The engine's drain waits for the running request; the dispatcher must not.
        threading.Thread(target=self.engine.drain, name="drain", daemon=True).start()
        self._refresh_status()
        return {"state": "draining", "queue_depth": self.engine.queue_depth}

    def _op_resume(self, args: payloads.NoArgs) -> dict[str, Any]:
        assert self.engine is not None
        self.engine.resume()
        self._draining = False
        self._refresh_status()
        return {"state": self._state()}

    def _op_rebirth(self, args: payloads.NoArgs) -> dict[str, Any]:
        self._birth()
        return {"state": self._state(), "session": self.session}

    def _op_select(self, args: payloads.SelectArgs) -> dict[str, Any]:
        selection = self._plan(pin=args.pin, profile=args.profile)
        return msgspec.to_builtins(selection)

    def _op_fetch(self, args: payloads.NoArgs) -> dict[str, Any]:
        selection = self._fetched(self._plan())
        return {"quant": selection.quant, "file": selection.file, "path": selection.model_path}

    def _op_reload(self, args: payloads.NoArgs) -> dict[str, Any]:
        return self._reload(strict=False)

    def _reload(self, *, strict: bool) -> dict[str, Any]:
        """Plan, fetch, swap when the choice changed. ``strict``: a planning failure is the
        answer (pin, set_manifest asked for exactly this), not a reason to keep the last good."""
        assert self.engine is not None
        selection = self._fetched(self._plan() if strict else self._plan_or_last_good())
        current = self.engine.selection
        if current is not None and current.sha256 == selection.sha256 and current.n_ctx == selection.n_ctx \
                and current.kv_type == selection.kv_type and current.n_gpu_layers == selection.n_gpu_layers:
            return {"changed": False, "quant": current.quant}
        before = self._model_name()
        self.engine.load(selection, smaller=self._smaller)  # swaps when a model is loaded
        loaded = self.engine.selection or selection
        self.state.save_selection(loaded)
        self.problem = None
        self._publish_event("model_switch", before=before, after=self._model_name())
        self._birth()
        return {"changed": True, "quant": loaded.quant, "model_id": loaded.model_id}

    def _op_pin(self, args: payloads.PinArgs) -> dict[str, Any]:
        previous = self.state.overrides().get("pin")
        self.state.set_override("pin", args.quant)
        try:
            result = self._reload(strict=True)
        except EdgeAgentError:
            self.state.set_override("pin", previous)  # a pin that cannot load must not stick
            raise
        return {"pin": args.quant, **result}

    def _op_set_manifest(self, args: payloads.SetManifestArgs) -> dict[str, Any]:
        source = self._commanded_manifest(args.source)
        previous = self.state.overrides().get("manifest")
        self.state.set_override("manifest", source)
        try:
            result = self._reload(strict=True)
        except EdgeAgentError:
            self.state.set_override("manifest", previous)  # a bad manifest must not stick
            raise
        return {"manifest": source, **result}

    def _commanded_manifest(self, source: str) -> str:
        """Where a ``set_manifest`` may point: an http(s) URL, the configured manifest, or a
        file under ``model.manifest_dir`` (symlinks and ``..`` resolved first). Checked before
        anything is opened, so a command cannot make the daemon read (and quote back in an
        error) a file such as /etc/shadow. Returns the source to load."""
        if is_url(source):
            return source
        if urlparse(source).scheme:
            raise RequestError("args.source: only http(s) URLs or local paths", field="args.source")
        model = self.config.model
        try:
            candidate = Path(model.manifest_dir or "/", source).resolve()
            local = model.manifest and not is_url(model.manifest)
            configured = Path(model.manifest).resolve() if local else None
        except (ValueError, OSError):  # a NUL byte, a symlink loop
            raise RequestError("args.source: not a usable path", field="args.source") from None
        if candidate == configured:
            return str(candidate)  # going back to the admin's own choice (a rollback) is fine
        if model.manifest_dir is None:
            raise RequestError("args.source: an http(s) URL (local manifests need "
                               "model.manifest_dir in the device config)", field="args.source")
        root = Path(model.manifest_dir).resolve()
        if not candidate.is_relative_to(root):
            raise RequestError("args.source: a local manifest must lie under "
                               f"model.manifest_dir ({root})", field="args.source")
        return str(candidate)

    def _op_upgrade(self, args: payloads.UpgradeArgs) -> dict[str, Any]:
        return self.upgrades.upgrade(args)

    def _exit(self, code: int) -> None:
        """Stop as on SIGTERM, then exit with ``code`` (what the unit's Restart= acts on)."""
        self.exit_code = code
        self.stop_event.set()

    def _op_bench(self, args: payloads.BenchArgs) -> dict[str, Any]:
        assert self.engine is not None
        request = GenerateRequest(id=f"bench-{time.monotonic_ns()}",
                                  messages=[ChatMessage(role="user", content=args.prompt)],
                                  max_tokens=args.max_tokens, temperature=0.0, seed=0, stream=False)
        final: dict[str, Any] = {}
        for record in self.engine.generate(request):
            final = record
        if final.get("error"):
            raise EdgeAgentError(final["error"]["message"])
        return {"model": self._model_name(), "usage": final.get("usage"), "timings": final.get("timings")}

    # -- model planning -----------------------------------------------------------------------

    def _effective_config(self, pin: str | None = None) -> AgentConfig:
        overrides = self.state.overrides()
        model = self.config.model
        model = msgspec.structs.replace(
            model,
            pin=pin if pin is not None else overrides.get("pin", model.pin),
            manifest=overrides.get("manifest") or model.manifest,
        )
        return msgspec.structs.replace(self.config, model=model)

    def _plan(self, *, pin: str | None = None, profile: str | None = None) -> Selection:
        config = self._effective_config(pin)
        if self.device is None:
            self.device = probe(model_dir=config.cache_dir)
        matched, reasons = match_profile(self.device, load_profiles(), forced=profile or config.model.profile)
        self.profile_reasons = reasons
        return plan_selection(config, device=self.device, manifest_source=config.model.manifest,
                              profile=matched.name, state_dir=config.state_dir)

    def _plan_or_last_good(self) -> Selection:
        try:
            selection = self._plan()
        except EdgeAgentError as exc:
            last = self.state.last_good_selection()
            if last is None:
                raise
            log.warning("planning_failed_using_last_good", code=exc.code, error=exc.message, quant=last.quant)
            self._publish_event("selection_fallback", error=exc.to_dict(), quant=last.quant)
            self.selection_source = "cached"
            return last
        self.selection_source = "planned"
        return selection

    def _fetched(self, selection: Selection) -> Selection:
        path = self.store.ensure(selection, on_progress=self._publish_download)
        return msgspec.structs.replace(selection, model_path=str(path))

    def _smaller(self, selection: Selection) -> Selection | None:
        """The next smaller variant that fits, fetched; the engine's last fallback rung."""
        smaller = sorted((c for c in selection.candidates if c.verdict != "rejected" and c.size < selection.size),
                         key=lambda c: c.size, reverse=True)
        for candidate in smaller:
            try:
                return self._fetched(self._plan(pin=candidate.quant))
            except EdgeAgentError as exc:
                log.warning("smaller_variant_unavailable", quant=candidate.quant, code=exc.code)
        return None

    # -- telemetry and events -------------------------------------------------------------

    def _telemetry_loop(self) -> None:
        interval = self.config.telemetry.interval_s
        # A jittered start keeps a fleet that rebooted together from reporting in lockstep.
        if self.stop_event.wait(random.uniform(0, interval)):
            return
        psutil.cpu_percent(None)  # the first call only primes the counter
        while not self.stop_event.wait(0 if self._telemetry_seq == 0 else interval):
            try:
                assert self.mqtt is not None
                self.mqtt.publish(self.topics.telemetry, payloads.encode(self._telemetry()), qos=0)
            except Exception:
                log.exception("telemetry_failed")

    def _telemetry(self) -> dict[str, Any]:
        assert self.engine is not None
        self._telemetry_seq += 1
        stats = self.engine.stats()
        window = stats.get("last_minute") or {}
        total = stats.get("since_start") or {}
        last = stats.get("last_request") or {}
        memory = psutil.virtual_memory()
        temps = self.device.temperatures_c if self.device else {}
        try:
            disk_free = psutil.disk_usage(self.config.cache_dir).free
        except OSError:
            disk_free = None
        return {
            "seq": self._telemetry_seq,
            "ts": round(time.time(), 3),
            "state": self._state(),
            "cpu_percent": psutil.cpu_percent(None),
            "mem": {"total_bytes": memory.total, "available_bytes": memory.available, "percent": memory.percent},
            "temp_c": _hottest_now() or (max(temps.values()) if temps else None),
            "disk_free_bytes": disk_free,
            "queue_depth": stats.get("queue_depth"),
            "prefill_tps": window.get("prefill_tokens_per_s") or last.get("prefill_tokens_per_s"),
            "decode_tps": window.get("decode_tokens_per_s") or last.get("decode_tokens_per_s"),
            "ttft_ms": window.get("ttft_ms") or last.get("ttft_ms"),
            "requests_ok": total.get("requests_ok", 0),
            "requests_error": total.get("requests_error", 0),
            "worker_rss_bytes": (stats.get("worker") or {}).get("rss_bytes"),
            "worker_restarts": stats.get("worker_restarts"),
            "model": self._model_name(),
        }

    def _publish_event(self, event_name: str, /, **fields: Any) -> None:
        if self.mqtt is not None:
            self.mqtt.publish(self.topics.events, payloads.encode(payloads.event(event_name, **fields)), qos=1)

    def _publish_engine_event(self, event: dict[str, Any]) -> None:
        self._publish_event(str(event.get("event", "engine")), **{k: v for k, v in event.items() if k != "event"})

    def _publish_download(self, progress: dict[str, Any]) -> None:
        self._publish_event("download", **{k: v for k, v in progress.items() if k != "event"})


def _hottest_now() -> float | None:
    """The hottest sensor right now (psutil), where the platform has sensors."""
    read = getattr(psutil, "sensors_temperatures", None)
    try:
        sensors = read() if read else {}
    except OSError:
        return None
    values = [entry.current for entries in sensors.values() for entry in entries if entry.current]
    return max(values) if values else None


def run_daemon(config: AgentConfig) -> int:
    """Entry point for ``edge-agent run``."""
    code = Daemon(config).run()
    sys.stdout.flush()
    return code
