"""Batched ingest of device messages: the MQTT thread enqueues, one writer thread commits.

``offer`` runs on the MQTT network thread and only classifies the topic and enqueues the
raw bytes (no JSON, no SQL), so the broker connection never waits on the disk. The writer
thread wakes every ``flush_s``, decodes everything queued, and hands the batch to
``Registry.apply_batch`` (one transaction, executemany per table); that is what lets one
controller keep up with thousands of devices on two cores. Replies to prompts do not come
through here: they go straight to their waiter (agent.fleet.controller).
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import msgspec

from agent.fleet.registry import BatchOutcome, Incoming, Registry
from agent.log import get_logger
from agent.mqtt.payloads import Status
from agent.mqtt.topics import device_of

log = get_logger(__name__)

KINDS = frozenset({"status", "meta", "telemetry", "events", "cmd/result"})
PRUNE_EVERY_S = 60.0
LAG_WINDOW_S = 10.0
LAG_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


@dataclass
class IngestStats:
    received: int = 0
    applied: int = 0
    rejected: int = 0  # not JSON, not an object, or a status that fails its schema
    ignored_stale_status: int = 0
    batches: int = 0
    last_batch_size: int = 0
    last_flush_ms: float = 0.0
    last_age_s: float = 0.0  # device ts -> committed, the oldest telemetry of the last batch
    last_commit: float = 0.0
    recent_ages: deque = field(default_factory=lambda: deque(maxlen=512))  # (commit time, age)
    # Receive -> commit of the oldest message per batch: the controller's own share of the lag
    # (the rest is the device, the network, the broker and the socket before paho reads it).
    recent_queue_ages: deque = field(default_factory=lambda: deque(maxlen=512))
    # Histogram of every telemetry message's lag; the last slot counts those above the last bound.
    lag_buckets: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS_S) + 1))
    lag_sum_s: float = 0.0

    def worst_age(self, window_s: float = LAG_WINDOW_S, *, queue_only: bool = False) -> float:
        """The worst batch age committed in the last ``window_s`` (what "lag" means for alerts)."""
        since = time.time() - window_s
        ages = self.recent_queue_ages if queue_only else self.recent_ages
        return max((age for at, age in list(ages) if at >= since), default=0.0)


class Ingest:
    def __init__(
        self,
        registry: Registry,
        *,
        prefix: str = "edge/v1",
        flush_s: float = 0.2,
        on_batch: Callable[[BatchOutcome], None] | None = None,
    ) -> None:
        self.registry = registry
        self.prefix = prefix
        self.flush_s = flush_s
        self.on_batch = on_batch
        self.stats = IngestStats()
        self._queue: queue.SimpleQueue[tuple[str, str, bytes, float]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._decode = msgspec.json.Decoder()

    def offer(self, topic: str, payload: bytes) -> bool:
        """From the MQTT thread: queue a device message; False when the topic is not ours."""
        split = device_of(topic, self.prefix)
        if split is None or split[1] not in KINDS:
            return False
        self.stats.received += 1
        self._queue.put((split[1], split[0], payload, time.time()))
        return True

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def start(self) -> "Ingest":
        self._thread = threading.Thread(target=self._run, name="fleet-ingest", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout_s)
        self.flush()  # whatever arrived during shutdown is still committed
        self.registry.persist_latest()

    def _run(self) -> None:
        next_prune = time.monotonic() + PRUNE_EVERY_S
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_S
                    self.registry.prune()
            except Exception:  # a bad batch must not stop ingest for the whole fleet
                log.exception("ingest_batch_failed")

    def _decode_one(self, kind: str, payload: bytes) -> dict | None:
        if not payload:  # a cleared retained message: nothing to record
            return None
        try:
            body = self._decode.decode(payload)
        except msgspec.DecodeError:
            return None
        if not isinstance(body, dict):
            return None
        if kind == "status":
            try:
                msgspec.convert(body, Status)
            except msgspec.ValidationError:
                return None
        return body

    def flush(self) -> BatchOutcome | None:
        """Decode and commit everything queued now (the writer thread calls this)."""
        raw: list[tuple[str, str, bytes, float]] = []
        try:
            while True:
                raw.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if not raw:
            return None
        started = time.perf_counter()
        batch: list[Incoming] = []
        for kind, device_id, payload, received in raw:
            body = self._decode_one(kind, payload)
            if body is None:
                self.stats.rejected += 1
                if payload:
                    log.warning("message_rejected", device=device_id, kind=kind, bytes=len(payload))
                continue
            batch.append(Incoming(kind, device_id, body, received))
        outcome = self.registry.apply_batch(batch)
        stats = self.stats
        stats.applied += outcome.applied
        stats.ignored_stale_status += outcome.ignored_stale_status
        stats.batches += 1
        stats.last_batch_size = len(raw)
        stats.last_flush_ms = (time.perf_counter() - started) * 1000
        stats.last_commit = time.time()
        stats.recent_queue_ages.append((stats.last_commit, stats.last_commit - raw[0][3]))
        # Age at commit: broker hop + queueing + decode + SQL, what "ingest lag" means.
        if outcome.sent_times:
            stats.last_age_s = stats.last_commit - min(outcome.sent_times)
            stats.recent_ages.append((stats.last_commit, stats.last_age_s))
            for sent in outcome.sent_times:
                age = stats.last_commit - sent
                stats.lag_buckets[bisect.bisect_left(LAG_BUCKETS_S, age)] += 1
                stats.lag_sum_s += age
        if self.on_batch:
            self.on_batch(outcome)
        return outcome
