"""Bounded, batched ingest of device messages: the MQTT thread enqueues, one writer commits.

``offer`` runs on the MQTT I/O thread (and, for cmd/result, on fleet-dispatch). It reads
no JSON and does no SQL; per message it only checks the topic, the size and the device's
rate, and enqueues the raw bytes, so the broker connection never waits on the disk. The
writer thread wakes every ``flush_s``, decodes and validates everything queued
(agent.fleet.schemas), and hands the batch to ``Registry.apply_batch`` (one transaction);
that is what lets one controller keep up with thousands of devices on two cores. Replies to
prompts do not come through here: they go straight to their waiter (agent.fleet.controller).

What one device can cost, and the overflow policy (``FleetIngestConfig``):

- size: a payload over its topic's limit (status 1 KiB, meta 64 KiB, telemetry 8 KiB,
  events 8 KiB, cmd/result 64 KiB by default) is dropped unread;
- status and meta are coalesced per device, since only the latest matters: the newest meta,
  the last ``STATUS_KEPT`` statuses (so a late Will of an older session is still ordered
  after the status it must not override);
- telemetry, events and cmd/result pass a token bucket per device (``device_rate_per_s``,
  ``device_burst``; the table forgets the least recently seen past ``MAX_BUCKETS``), then
  one bounded queue (``queue_max``): past it, new messages are dropped;
- everything waiting holds at most ``queue_max_bytes`` of payload: past it, new messages of
  any kind are dropped, so a burst of large messages from many ids cannot exhaust memory;
- a message that fails its schema is dropped at the writer; one whose topic level cannot be
  a device id (``all``, ``pool``, the other contract words) is dropped at once.

Every drop is counted by reason (``edge_fleet_ingest_dropped_total``) and noted against its
device, which gets a flag on its row and a throttled ``rejected_input`` event (the
registry's job). Nothing a device sends is kept beyond these bounds.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import msgspec

from agent.config import FleetIngestConfig
from agent.errors import RequestError
from agent.fleet import schemas
from agent.fleet.registry import BatchOutcome, Incoming, Registry
from agent.log import get_logger
from agent.mqtt.topics import device_of

log = get_logger(__name__)

KINDS = frozenset({"status", "meta", "telemetry", "events", "cmd/result"})
COALESCED = frozenset({"status", "meta"})
STATUS_KEPT = 4
MAX_BUCKETS = 100_000  # devices with a rate bucket; past it the least recently seen is forgotten
MAX_NOTED = 10_000  # devices with rejections waiting for the writer; past it only counted
DROP_REASONS = ("too_large", "rate_limited", "queue_full", "bad_request", "bad_device_id")
PRUNE_EVERY_S = 60.0
REFRESH_EVERY_S = 1.0  # on a shared registry: how often the other controllers' telemetry is read
LAG_WINDOW_S = 10.0
LAG_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


@dataclass
class IngestStats:
    received: int = 0
    applied: int = 0
    rejected: int = 0  # not JSON, not an object, or failing its schema
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    coalesced: int = 0  # status/meta replaced by a newer one before the writer saw it
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


def topic_kind(topic: str, prefix: str) -> str | None:
    """``status``, ``meta``, … of ``<prefix>/<id>/<kind>``, whatever the id; else None."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    _, _, kind = topic[len(head) :].partition("/")
    return kind or None


class TokenBuckets:
    """A token bucket per device id, in a table bounded to ``max_devices`` (LRU)."""

    def __init__(self, rate_per_s: float, burst: int, max_devices: int = MAX_BUCKETS) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.max_devices = max_devices
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # id -> [tokens, at]

    def take(self, device_id: str, now: float) -> bool:
        bucket = self._buckets.get(device_id)
        if bucket is None:
            bucket = self._buckets[device_id] = [self.burst, now]
            if len(self._buckets) > self.max_devices:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(device_id)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate_per_s)
            bucket[1] = now
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True


class Ingest:
    def __init__(
        self,
        registry: Registry,
        *,
        prefix: str = "edge/v1",
        flush_s: float = 0.2,
        limits: FleetIngestConfig | None = None,
        on_batch: Callable[[BatchOutcome], None] | None = None,
    ) -> None:
        self.registry = registry
        self.prefix = prefix
        self.flush_s = flush_s
        self.limits = limits or FleetIngestConfig()
        self.max_bytes = {
            "status": self.limits.status_max_bytes,
            "meta": self.limits.meta_max_bytes,
            "telemetry": self.limits.telemetry_max_bytes,
            "events": self.limits.event_max_bytes,
            "cmd/result": self.limits.cmd_result_max_bytes,
        }
        self.on_batch = on_batch
        self.stats = IngestStats()
        self._buckets = TokenBuckets(self.limits.device_rate_per_s, self.limits.device_burst)
        # Everything below is guarded by _lock: offer() runs on two threads, flush() on a third.
        self._lock = threading.Lock()
        self._statuses: dict[str, deque[tuple[bytes, float]]] = {}
        self._metas: dict[str, tuple[bytes, float]] = {}
        self._records: deque[tuple[str, str, bytes, float]] = deque()
        self._queued_bytes = 0
        self._noted: dict[str, dict[tuple[str, str], list]] = {}  # id -> (kind, code) -> [n, why]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._decode = msgspec.json.Decoder()

    def offer(self, topic: str, payload: bytes) -> bool:
        """Queue a device message within its device's limits; False when not queued."""
        if topic_kind(topic, self.prefix) not in KINDS:
            return False
        split = device_of(topic, self.prefix)
        now = time.time()
        with self._lock:
            self.stats.received += 1
            if split is None:  # a reserved word or no id at all: there is no row to flag
                self.stats.dropped["bad_device_id"] += 1
                return False
            device_id, kind = split
            if len(payload) > self.max_bytes[kind]:
                return self._drop(device_id, kind, "too_large",
                                  f"{len(payload)} bytes, over the {self.max_bytes[kind]} "
                                  f"bytes a {kind} message may have")
            if self._queued_bytes + len(payload) > self.limits.queue_max_bytes:
                return self._drop(device_id, kind, "queue_full", "the ingest queue is full")
            if kind == "meta":
                self.stats.coalesced += device_id in self._metas
                if device_id in self._metas or len(self._metas) < self.limits.queue_max:
                    replaced = self._metas.get(device_id)
                    self._queued_bytes += len(payload) - (len(replaced[0]) if replaced else 0)
                    self._metas[device_id] = (payload, now)
                    return True
                return self._drop(device_id, kind, "queue_full", "the ingest queue is full")
            if kind == "status":
                kept = self._statuses.get(device_id)
                if kept is None:
                    if len(self._statuses) >= self.limits.queue_max:
                        return self._drop(device_id, kind, "queue_full", "the ingest queue is full")
                    kept = self._statuses[device_id] = deque(maxlen=STATUS_KEPT)
                if len(kept) == STATUS_KEPT:
                    self.stats.coalesced += 1
                    self._queued_bytes -= len(kept[0][0])
                kept.append((payload, now))
                self._queued_bytes += len(payload)
                return True
            if not self._buckets.take(device_id, now):
                return self._drop(device_id, kind, "rate_limited",
                                  f"over {self.limits.device_rate_per_s:g} messages/s "
                                  f"(burst {self.limits.device_burst})")
            if len(self._records) >= self.limits.queue_max:
                return self._drop(device_id, kind, "queue_full", "the ingest queue is full")
            self._records.append((kind, device_id, payload, now))
            self._queued_bytes += len(payload)
        return True

    def _drop(self, device_id: str, kind: str, code: str, reason: str) -> bool:
        """Count a dropped message and note it against its device (under ``_lock``)."""
        self.stats.dropped[code] += 1
        noted = self._noted.get(device_id)
        if noted is None:
            if len(self._noted) >= MAX_NOTED:
                return False
            noted = self._noted[device_id] = {}
        entry = noted.setdefault((kind, code), [0, reason])
        entry[0] += 1
        entry[1] = reason
        return False

    @property
    def backlog(self) -> int:
        return len(self._records) + len(self._metas) + len(self._statuses)

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
        next_refresh = 0.0
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
                if self.registry.shared and time.monotonic() >= next_refresh:
                    # The devices' latest telemetry that reached the other controllers.
                    next_refresh = time.monotonic() + REFRESH_EVERY_S
                    self.registry.refresh_shared()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_S
                    self.registry.prune()
            except Exception:  # a bad batch must not stop ingest for the whole fleet
                log.exception("ingest_batch_failed")

    def _take(self) -> tuple[list[tuple[str, str, bytes, float]], dict]:
        """Everything queued now, oldest first; status and meta before the rest."""
        with self._lock:
            statuses, self._statuses = self._statuses, {}
            metas, self._metas = self._metas, {}
            records, self._records = self._records, deque()
            noted, self._noted = self._noted, {}
            self._queued_bytes = 0
        raw = [("status", d, p, at) for d, kept in statuses.items() for p, at in kept]
        raw += [("meta", d, p, at) for d, (p, at) in metas.items()]
        raw += records
        return raw, noted

    def _decode_one(self, kind: str, payload: bytes) -> dict:
        try:
            body = self._decode.decode(payload)
        except msgspec.DecodeError as exc:
            raise RequestError(schemas.truncate(f"{kind}: not valid JSON ({exc})"),
                               field=kind) from None
        return schemas.validate(kind, body)

    def flush(self) -> BatchOutcome | None:
        """Decode, validate and commit everything queued now (the writer thread calls this)."""
        raw, noted = self._take()
        if not raw and not noted:
            return None
        started = time.perf_counter()
        batch: list[Incoming] = []
        for kind, device_id, payload, received in raw:
            if not payload:  # a cleared retained message: nothing to record
                continue
            try:
                body = self._decode_one(kind, payload)
            except RequestError as exc:
                self.stats.rejected += 1
                self.stats.dropped["bad_request"] += 1
                log.warning("message_rejected", device=device_id, kind=kind,
                            bytes=len(payload), reason=exc.message)
                noted.setdefault(device_id, {})[(kind, exc.code)] = [1, exc.message]
                continue
            batch.append(Incoming(kind, device_id, body, received))
        now = time.time()
        for device_id, problems in noted.items():
            for (kind, code), (count, reason) in problems.items():
                batch.append(Incoming("rejected", device_id,
                                      {"kind": kind, "code": code, "reason": reason,
                                       "dropped": count}, now))
        outcome = self.registry.apply_batch(batch)
        stats = self.stats
        stats.applied += outcome.applied
        stats.ignored_stale_status += outcome.ignored_stale_status
        stats.batches += 1
        stats.last_batch_size = len(raw)
        stats.last_flush_ms = (time.perf_counter() - started) * 1000
        stats.last_commit = time.time()
        if raw:
            oldest = min(received for _, _, _, received in raw)
            stats.recent_queue_ages.append((stats.last_commit, stats.last_commit - oldest))
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
