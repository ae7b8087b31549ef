"""One ingest batch: device messages folded into their in-memory records, one small method per
message kind, with the rows they make gathered per table and written by ``write`` in the
caller's one transaction (telemetry points in one batch insert: COPY on PostgreSQL).

Status, meta and the stored latest telemetry are one row per device per batch (the newest
wins); telemetry points are kept at most one per device per ``telemetry_sample_s`` of the
device's clock, when it is believable. Runs on the one ingest writer thread only: records are
changed without a lock, and a batch is not shared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.fleet.registry._backends import Transaction
from agent.fleet.registry._events import EventBounds
from agent.fleet.registry._records import (
    TELEMETRY_FIELDS,
    BatchOutcome,
    DeviceRecord,
    Incoming,
    telemetry_point,
    to_json,
)
from agent.log import get_logger

log = get_logger(__name__)

# A device clock further off than this from the controller's is not believed: its points and
# lag are stamped with the arrival time instead (a far-future ts would dodge retention).
MAX_CLOCK_SKEW_S = 300.0
REJECTION_EVENT_EVERY_S = 10.0  # at most one rejected_input event per device and this period
# A gap between two telemetry messages longer than this (or not forward) is not an interval.
INTERVAL_MAX_GAP_S = 3600.0
SAMPLE_COLUMNS = ("device_id", "ts", *TELEMETRY_FIELDS, "state")

UPSERT_TELEMETRY = (
    "INSERT INTO devices (id, first_seen, last_seen, telemetry, telemetry_ts) VALUES (?,?,?,?,?)"
    " ON CONFLICT(id) DO UPDATE SET last_seen=excluded.last_seen,"
    " telemetry=excluded.telemetry, telemetry_ts=excluded.telemetry_ts"
)
_UPSERT_STATUS = (
    "INSERT INTO devices (id, first_seen, last_seen, state, session, status_ts,"
    " version) VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET"
    " last_seen=excluded.last_seen, state=excluded.state, session=excluded.session,"
    " status_ts=excluded.status_ts, version=excluded.version"
)
_UPSERT_META = (
    "INSERT INTO devices (id, first_seen, last_seen, meta, meta_ts) VALUES"
    " (?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET last_seen=excluded.last_seen,"
    " meta=excluded.meta, meta_ts=excluded.meta_ts"
)
_COMPLETE_COMMAND = "UPDATE commands SET done_ts=?, ok=?, result=? WHERE id=? AND device_id=?"


def _believed_ts(sent: Any, received: float) -> float:
    """The device's own timestamp, or the arrival time when it is missing or too far off."""
    if sent is None or abs(sent - received) > MAX_CLOCK_SKEW_S:
        return received
    return sent


class IngestBatch:
    def __init__(self, telemetry_sample_s: float, event_bounds: EventBounds) -> None:
        self.outcome = BatchOutcome()
        self._telemetry_sample_s = telemetry_sample_s
        self._event_bounds = event_bounds
        self._status_rows: dict[str, tuple] = {}
        self._meta_rows: dict[str, tuple] = {}
        self._telemetry_rows: dict[str, tuple] = {}
        self._samples: list[tuple] = []
        self._events: list[tuple] = []
        self._results: list[tuple] = []
        self._trim: set[str] = set()  # devices with new events: their count may be past the cap
        self._apply: dict[str, Callable[[DeviceRecord, Incoming], None]] = {
            "status": self._status,
            "meta": self._meta,
            "telemetry": self._telemetry,
            "events": self._event,
            "cmd/result": self._cmd_result,
        }

    def add(self, record: DeviceRecord, message: Incoming) -> None:
        """Fold one message into its device's record and queue the rows it makes."""
        if message.kind == "rejected":
            self._rejected(record, message)
            return
        if record.problems.pop(message.kind, None) is not None:
            record.version += 1
        apply = self._apply.get(message.kind)
        if apply is None or (message.kind == "status" and self._stale(record, message.body)):
            return
        apply(record, message)
        record.version += 1
        self.outcome.applied += 1

    def write(self, tx: Transaction) -> None:
        """Every row the batch made, inside ``tx``."""
        if self._status_rows:
            tx.executemany(_UPSERT_STATUS, list(self._status_rows.values()))
        if self._meta_rows:
            tx.executemany(_UPSERT_META, list(self._meta_rows.values()))
        if self._telemetry_rows:
            tx.executemany(UPSERT_TELEMETRY, list(self._telemetry_rows.values()))
        if self._samples:
            tx.insert_rows("telemetry", SAMPLE_COLUMNS, self._samples)
        if self._events:
            self._event_bounds.insert(tx, self._events, self._trim)
        if self._results:
            tx.executemany(_COMPLETE_COMMAND, self._results)

    def _rejected(self, record: DeviceRecord, message: Incoming) -> None:
        """Flag what ingest refused on the device's row; an event now and then, not each time."""
        body = message.body
        problem = f"{body['code']}: {body['reason']}"
        if body["dropped"] > 1:
            problem += f" ({body['dropped']} messages dropped)"
        record.problems[body["kind"]] = problem
        record.version += 1
        if message.received - record.last_rejection_event >= REJECTION_EVENT_EVERY_S:
            record.last_rejection_event = message.received
            event = {"event": "rejected_input", "ts": message.received, **body}
            self._events.append((record.id, message.received, "rejected_input", to_json(event)))
            self._trim.add(record.id)

    def _stale(self, record: DeviceRecord, body: dict[str, Any]) -> bool:
        """A Will (or any late status) from an earlier session, delivered after the device
        came back: the newer session's state stands."""
        session = body.get("session")
        if not isinstance(session, int) or record.session is None or session >= record.session:
            return False
        self.outcome.ignored_stale_status += 1
        log.info(
            "stale_status_ignored",
            device=record.id,
            state=body.get("state"),
            session=session,
            newest=record.session,
        )
        return True

    def _status(self, record: DeviceRecord, message: Incoming) -> None:
        body = message.body
        record.state = body["state"]
        record.session = body.get("session")
        record.status_ts = float(body["ts"])
        record.agent_version = body["version"] or record.agent_version
        if record.state != "lost":
            record.last_seen = max(record.last_seen, message.received)
        self._status_rows[record.id] = (
            record.id,
            record.first_seen,
            record.last_seen,
            record.state,
            record.session,
            record.status_ts,
            record.agent_version,
        )

    def _meta(self, record: DeviceRecord, message: Incoming) -> None:
        record.meta = message.body
        record.meta_ts = message.received
        record.last_seen = max(record.last_seen, message.received)
        self._meta_rows[record.id] = (
            record.id,
            record.first_seen,
            record.last_seen,
            to_json(message.body),
            record.meta_ts,
        )

    def _telemetry(self, record: DeviceRecord, message: Incoming) -> None:
        body = message.body
        record.telemetry = body
        sent = _believed_ts(body.get("ts"), message.received)
        if record.telemetry_ts is not None and 0 < sent - record.telemetry_ts < INTERVAL_MAX_GAP_S:
            gap = sent - record.telemetry_ts
            estimate = record.interval_estimate_s
            record.interval_estimate_s = gap if estimate is None else 0.8 * estimate + 0.2 * gap
        record.telemetry_ts = sent
        record.last_seen = max(record.last_seen, message.received)
        self.outcome.sent_times.append(sent)
        if sent - record.last_sample_ts >= self._telemetry_sample_s:
            self._sample(record, body, sent)

    def _sample(self, record: DeviceRecord, body: dict[str, Any], sent: float) -> None:
        """A telemetry point, and the stored latest telemetry: once per sample period."""
        # The latest telemetry lives in memory; the database gets it once per sample period
        # (and at shutdown), which keeps the write rate per device bounded.
        record.last_sample_ts = sent
        point = telemetry_point(body)
        self._samples.append((record.id, sent, *point.values(), body.get("state")))
        self._telemetry_rows[record.id] = (
            record.id,
            record.first_seen,
            record.last_seen,
            to_json(body),
            sent,
        )

    def _event(self, record: DeviceRecord, message: Incoming) -> None:
        body = message.body
        # PostgreSQL text cannot hold NUL; the body keeps it, escaped in the JSON.
        kind = str(body.get("event") or body.get("type") or "event").replace("\x00", "")
        # Retention counts from the stored ts: it must not be the future.
        ts = _believed_ts(body.get("ts"), message.received)
        self._events.append((record.id, ts, kind, to_json(body)))
        self._trim.add(record.id)
        self.outcome.events.append((record.id, body))

    def _cmd_result(self, record: DeviceRecord, message: Incoming) -> None:
        body = message.body
        ok = 1 if body["ok"] else 0
        payload = body.get("result") if ok else body.get("error")
        self._results.append((message.received, ok, to_json(payload), body["id"], record.id))
        self.outcome.cmd_results.append((record.id, body))
