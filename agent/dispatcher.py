"""The ``dispatcher`` thread: everything that arrives from the broker, one message at a time.

It owns ``inbox`` (paho's callbacks only decode and enqueue there). A prompt is parsed and
validated once (agent.mqtt.payloads.decode_prompt), its reply route chosen and checked, its
id admitted in the RequestLedger, and it is handed to ``Engine.submit``, whose records go
straight to the ``replies`` thread; the dispatcher never waits on a generation, a worker or a
model change. A command is parsed, admitted, and given to the op table (quick ops answer
here, the rest go to the ``model`` thread). After each (re)connect of the device's own
connection it publishes the birth messages; a refusal of the credentials stops the daemon.
Input that cannot be answered is reported on ``events``, rate-limited.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from agent.command_ops import CommandOps
from agent.config import AgentConfig
from agent.errors import BusyError, CancelledError_, EdgeAgentError, NoModelError, RequestError
from agent.ledger import InFlight, ReplyRoute, RequestLedger
from agent.log import get_logger
from agent.mqtt import payloads, topics
from agent.mqtt.client import ConnectionChange, Inbound
from agent.presence import DeviceLink, Presence
from agent.replies import Replies
from agent.runtime.engine import Engine

log = get_logger(__name__)

# The dispatcher wakes at least this often, so its heartbeat stays fresh while idle.
DISPATCH_POLL_S = 0.5
# At most this many ``rejected_input`` events per second; the rest are counted into the
# next one, so a flood of garbage cannot flood ``events``.
REJECTED_EVENTS_PER_S = 20


class Dispatcher:
    def __init__(self, config: AgentConfig, *, inbox: queue.Queue[Inbound | ConnectionChange],
                 link: DeviceLink, presence: Presence, ledger: RequestLedger, engine: Engine,
                 replies: Replies, ops: CommandOps, stop_event: threading.Event,
                 on_fatal: Callable[[], None]) -> None:
        self.config = config
        self.inbox = inbox
        self.link = link
        self.topics = link.topics
        self.reply_policy = topics.ReplyPolicy.for_device(
            self.topics, discovery_prefix=config.home_assistant.discovery_prefix,
            allowed=config.mqtt.reply_topics)
        self.presence = presence
        self.ledger = ledger
        self.engine = engine
        self.replies = replies
        self.ops = ops
        self.stop_event = stop_event
        self.on_fatal = on_fatal  # the broker refused the credentials
        self.heartbeat = time.monotonic()
        self._rejected_window = (0, 0)  # (second, events sent in it)
        self._rejected_suppressed = 0
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)

    def start(self) -> None:
        # Fresh from now: the model's bring-up ran between __init__ and here, and a stale
        # heartbeat would withhold the first watchdog ping and log a stall that is none.
        self.heartbeat = time.monotonic()
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        """Returns once the inbox is empty after ``stop_event`` (or at the timeout)."""
        self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
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
                self.on_fatal()
            elif self.link.is_own_connect(item):
                self.presence.birth()
        elif self.link.is_prompt(item):
            self._prompt(item)
        elif item.topic in (self.topics.cmd, self.topics.broadcast_cmd):
            self._command(item)
        else:
            log.warning("unexpected_topic", topic=item.topic)

    # -- prompts --------------------------------------------------------------------------

    def _prompt(self, message: Inbound) -> None:
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
        assert route is not None  # decode_prompt guarantees a usable id
        if self.stop_event.is_set():
            stopping = CancelledError_("the agent is stopping; send the request again later")
            final = payloads.error_final(request.id, stopping.to_dict())
            self.link.reply(route, payloads.encode(final))
            return
        admission = self.ledger.admit("prompt", request.id, InFlight(route, request.stream))
        if admission.seen == "in_flight":
            log.info("duplicate_ignored", id=request.id, seen="in_flight")
            return
        if admission.seen == "finished":
            log.info("duplicate_answered", id=request.id)
            self.link.reply(route, admission.final or b"")
            return
        self.presence.refresh()
        try:
            self.engine.submit(request, self.replies.recorder(request.id))
        except (BusyError, NoModelError) as exc:
            # Not a property of the request: the same id may be sent again later and run.
            self.ledger.forget("prompt", request.id)
            self.link.reply(route, payloads.encode(payloads.error_final(request.id, exc.to_dict())))
            self.presence.refresh()
        except EdgeAgentError as exc:
            self.replies.final(request.id, payloads.error_final(request.id, exc.to_dict()))

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
        if request_id and len(request_id) <= payloads.MAX_ID_CHARS \
                and topics.is_valid_level(request_id):
            return ReplyRoute(self.topics.reply(request_id), message.correlation_data), refused
        return None, refused

    # -- commands -------------------------------------------------------------------------

    def _command(self, message: Inbound) -> None:
        max_bytes = self.config.mqtt.max_payload_bytes
        try:
            command = payloads.decode_command(message.payload, max_bytes=max_bytes)
        except RequestError as exc:
            hint = payloads.reply_hint(message.payload, max_bytes=max_bytes)
            route = ReplyRoute(self.topics.cmd_result, message.correlation_data)
            self._reject(message, exc, route if hint.id else None, hint.id, kind="cmd")
            return
        admission = self.ledger.admit("cmd", command.id)
        route = ReplyRoute(self.topics.cmd_result, message.correlation_data)
        if admission.seen == "in_flight":
            return
        if admission.seen == "finished":
            self.link.reply(route, admission.final or b"")
            return
        self.ops.submit(command, route)

    # -- rejected input -------------------------------------------------------------------

    def _reject(self, message: Inbound, error: RequestError, route: ReplyRoute | None,
                request_id: str | None, *, kind: str, event: bool = False) -> None:
        """An error reply where a reply path exists, else (and with ``event`` also) a
        rate-limited ``events`` record."""
        log.info("rejected_input", topic=message.topic, code=error.code, error=error.message[:200])
        if route is not None:
            body = (payloads.error_final(request_id, error.to_dict()) if kind == "prompt"
                    else payloads.cmd_result(request_id, error=error.to_dict()))
            self.link.reply(route, payloads.encode(body))
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
        self.link.event("rejected_input", topic=message.topic, payload_kind=kind,
                        bytes=len(message.payload), error=error.to_dict(),
                        suppressed_before=suppressed)
