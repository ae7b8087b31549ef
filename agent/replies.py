"""Prompt replies: chunks and the final of each request, published in order.

The engine hands every record of a request, in order, from one thread (the worker's frame
reader) to ``Replies.recorder(id)``. That thread publishes it at once when the line is idle:
one hand-off from the worker to the socket, no queue in between. Replies' one lock (it never
calls into the engine, and paho's callbacks never take it) keeps the stream state and the
order of publishes consistent with the ``replies`` thread, which publishes what the line held
back (on a written-notice or at the interval) and the finals of requests the engine never
took (the dispatcher's refusals, the cancels at stop). A final is never published before a
chunk it follows, and no chunk after its final.

Streamed chunks are coalesced when the broker connection is slower than the tokens: a chunk
is published at once when the line is idle (every chunk published before has been written to
the socket: MQTTClient.publish's ``on_written``); otherwise its text waits and goes out with the
chunks after it as one chunk, when the last outstanding publish has been written or
``mqtt.stream_interval_ms`` after the previous publish, whichever comes first (the interval
also covers a written-notice that a broken connection never sends). Published chunks are
numbered ``seq`` 0, 1, 2, ... per request; their deltas join to the final's text.

At stop it answers every prompt still in flight with ``cancelled``, then ends.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.errors import CancelledError_
from agent.ledger import InFlight, RequestLedger
from agent.log import get_logger
from agent.mqtt import payloads
from agent.mqtt.client import MQTTClient

log = get_logger(__name__)

_STOP = object()
_WAKE = object()  # a chunk now waits: the thread recomputes when its interval ends


@dataclass
class _Stream:
    """One streamed request's coalescing state (the replies thread only)."""

    flight: InFlight
    seq: int = 0  # the next published chunk's number
    pending: list[str] = field(default_factory=list)  # deltas not yet published
    published: int = 0  # chunks handed to MQTTClient (under Replies' lock)
    # Chunks written to the socket: counted under the connection's I/O lock by whichever
    # thread finished the write, which must not take Replies' lock (a short write is finished
    # by the I/O thread, without it). Two counters, each written under one lock.
    written: int = 0
    last_publish: float = 0.0

    @property
    def outstanding(self) -> int:
        return self.published - self.written


@dataclass(frozen=True)
class _Written:
    request_id: str
    stream: _Stream


class Replies:
    def __init__(self, mqtt: MQTTClient, ledger: RequestLedger, *, interval_s: float,
                 on_answered: Callable[[], None]) -> None:
        self.mqtt = mqtt
        self.ledger = ledger
        self.interval_s = interval_s
        self.on_answered = on_answered  # after each final: the status may go busy -> ready
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}  # under _lock
        self._thread = threading.Thread(target=self._run, name="replies", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Publish what is queued, answer what is still in flight with ``cancelled``, end."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def recorder(self, request_id: str) -> Callable[[dict[str, Any]], None]:
        """The engine's ``on_record`` for one request: publish now or hold for the line."""
        return lambda record: self._take(request_id, record)

    def final(self, request_id: str, record: dict[str, Any]) -> None:
        """Any thread: the final record of an admitted prompt that the engine never took."""
        self._queue.put((request_id, record))

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._wait_s())
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            try:
                if isinstance(item, _Written):
                    with self._lock:
                        self._written(item)
                elif isinstance(item, tuple):
                    self._take(*item)
                with self._lock:
                    self._publish_due()
            except Exception:  # one bad record must never stop the replies
                log.exception("reply_failed")
        self._cancel_unanswered()

    def _wait_s(self) -> float | None:
        """Until the earliest interval a waiting chunk has; forever when none waits."""
        with self._lock:
            due = [s.last_publish + self.interval_s for s in self._streams.values() if s.pending]
        return max(min(due) - time.monotonic(), 0.0) if due else None

    def _take(self, request_id: str, record: dict[str, Any]) -> None:
        """A record, on the engine's thread or this one."""
        with self._lock:
            answered = self._record(request_id, record)
        if answered:
            self.on_answered()

    def _record(self, request_id: str, record: dict[str, Any]) -> bool:
        """Publish or hold one record; True when it was the request's final."""
        if record.get("done"):
            return self._finish(request_id, record)
        stream = self._streams.get(request_id)
        if stream is None:
            flight = self.ledger.in_flight(request_id)
            if flight is None or not flight.stream:
                return False  # not streamed, or a stale chunk of a request already answered
            stream = self._streams[request_id] = _Stream(flight)
        stream.pending.append(record["delta"])
        if stream.outstanding <= 0:
            self._publish_chunk(request_id, stream)
        elif len(stream.pending) == 1:
            self._queue.put(_WAKE)
        return False

    def _on_written(self, request_id: str, stream: _Stream) -> None:
        """Under the MQTT I/O lock: count it; wake the thread only if text waits for it. (The
        count goes first and a publisher appends before it reads the count, so one of the two
        always sees the other.)"""
        stream.written += 1
        if stream.pending:
            self._queue.put(_Written(request_id, stream))

    def _written(self, notice: _Written) -> None:
        stream = notice.stream
        if self._streams.get(notice.request_id) is stream and stream.outstanding <= 0 \
                and stream.pending:
            self._publish_chunk(notice.request_id, stream)

    def _publish_due(self) -> None:
        now = time.monotonic()
        for request_id, stream in self._streams.items():
            if stream.pending and now >= stream.last_publish + self.interval_s:
                self._publish_chunk(request_id, stream)

    def _publish_chunk(self, request_id: str, stream: _Stream) -> None:
        body = {"id": request_id, "seq": stream.seq, "delta": "".join(stream.pending)}
        stream.pending.clear()
        stream.seq += 1
        stream.last_publish = time.monotonic()
        route = stream.flight.route
        stream.published += 1  # first: it may be reported written before publish() returns
        queued = self.mqtt.publish(route.topic, payloads.encode(body), qos=0,
                                   correlation_data=route.correlation_data,
                                   on_written=lambda: self._on_written(request_id, stream))
        if not queued:
            stream.published -= 1  # dropped (disconnected): nothing will be written

    def _finish(self, request_id: str, final: dict[str, Any]) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is not None and stream.pending:
            self._publish_chunk(request_id, stream)
        encoded = payloads.encode(final)
        flight = self.ledger.finish("prompt", request_id, encoded)
        if flight is None:
            return False  # answered already (a cancel at shutdown behind the engine's own final)
        self.mqtt.publish(flight.route.topic, encoded, qos=1,
                          correlation_data=flight.route.correlation_data)
        return True

    def _cancel_unanswered(self) -> None:
        for request_id in self.ledger.unanswered_prompts():
            error = CancelledError_("the agent stopped before this request ran; send it again")
            self._take(request_id, payloads.error_final(request_id, error.to_dict()))
