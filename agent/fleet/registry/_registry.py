"""The controller's registry: every device, its latest status/meta/telemetry, history, commands.

A database holds what must survive a restart: devices with their latest status, meta and
telemetry, a telemetry time series kept at one point per device per ``telemetry_sample_s``
for ``telemetry_retention_s``, events, commands with their results, rollouts (with the lease
that says which controller drives each) and dashboard sessions. It is SQLite (WAL) at a path,
or PostgreSQL at a ``postgresql://`` URL (agent.fleet.registry._backends); the SQL here is the
one both accept, and nothing outside this package knows which it is. An in-memory copy of the
device rows (``DeviceRecord``) answers the dashboard, API and /metrics without a query.

Writes: ``apply_batch`` is called by the one ingest writer thread with a batch of decoded
messages and commits them in one transaction (telemetry points in one batch insert: COPY on
PostgreSQL); the web side and the rollout thread write their low-rate rows (commands,
rollouts, sessions) in their own short transactions. Every method here blocks on the
database: callers on an event loop go through a thread. This module does no MQTT and no HTTP.

Several controllers on one PostgreSQL each receive every status, meta and cmd/result but only
their share of telemetry and events (shared subscriptions), so ``refresh_shared`` (called by
the ingest thread) folds in the latest telemetry the others wrote, and every chart is read
from the database, which holds all of it.

What it takes is validated (agent.fleet.schemas): ``apply_batch`` gets objects that passed
their schema, and rows loaded at start are validated again, so a record written by an older
controller cannot break the dashboard; a device whose stored meta fails is flagged instead.

Bound on disk per device: one ``devices`` row (meta and telemetry, each at most its message
limit), telemetry points at most one per ``telemetry_sample_s`` of controller time for
``telemetry_retention_s``, and at most ``events_per_device`` plus 10 % events (the newest;
older ones go in the same transaction), each at most ``event_max_bytes``: with the defaults,
1100 x 8 KiB = 8.6 MiB of events per device, whatever the device sends (with N controllers
each trims on its own count: up to 1000 + N x 100 events).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from agent.errors import RequestError
from agent.fleet import schemas
from agent.fleet.registry._backends import Transaction, open_backend
from agent.log import get_logger

log = get_logger(__name__)

# Telemetry keys as the daemon sends them; the first present name wins, so a renamed field
# on older agents still charts.
TELEMETRY_FIELDS = {
    "decode_tps": ("decode_tps", "decode_tokens_per_s"),
    "prefill_tps": ("prefill_tps", "prefill_tokens_per_s"),
    "mem_bytes": ("mem_used_bytes", "mem_bytes"),
    "rss_bytes": ("worker_rss_bytes", "rss_bytes"),
    "temp_c": ("temp_c", "temperature_c"),
    "cpu_percent": ("cpu_percent", "cpu"),
    "queue_depth": ("queue_depth",),
}
# A device clock further off than this from the controller's is not believed: its points and
# lag are stamped with the arrival time instead (a far-future ts would dodge retention).
MAX_CLOCK_SKEW_S = 300.0
REJECTION_EVENT_EVERY_S = 10.0  # at most one rejected_input event per device and this period
# Shared database: how far back ``refresh_shared`` looks past the newest row it has seen, so a
# row another controller committed late (its batch took a while) is still picked up.
REFRESH_OVERLAP_S = 5.0
SAMPLE_COLUMNS = ("device_id", "ts", *TELEMETRY_FIELDS, "state")
# The fleet chart's states: what telemetry says; a sample with any other is counted as "other".
CHART_STATES = ("starting", "ready", "busy", "degraded", "draining")


def pick(source: dict[str, Any] | None, names: Iterable[str]) -> Any:
    if not source:
        return None
    for name in names:
        value = source.get(name)
        if value is not None:
            return value
    return None


def telemetry_point(payload: dict[str, Any]) -> dict[str, Any]:
    """The charted numbers of one telemetry payload (None where the device did not say)."""
    point: dict[str, Any] = {}
    for column, names in TELEMETRY_FIELDS.items():
        value = pick(payload, names)
        if column == "mem_bytes" and value is None:
            value = _memory_used(payload.get("mem"))
        point[column] = (
            value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        )
    return point


def _memory_used(mem: Any) -> int | None:
    """The daemon sends ``mem: {total_bytes, available_bytes, percent}``; used = total - available."""
    if (
        isinstance(mem, dict)
        and isinstance(mem.get("total_bytes"), int)
        and isinstance(mem.get("available_bytes"), int)
    ):
        return mem["total_bytes"] - mem["available_bytes"]
    return None


@dataclass
class DeviceRecord:
    """The latest of one device, kept in memory; ``version`` grows on every change."""

    id: str
    first_seen: float
    last_seen: float
    state: str | None = None
    session: int | None = None
    status_ts: float | None = None
    agent_version: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    meta_ts: float | None = None
    telemetry: dict[str, Any] = field(default_factory=dict)
    telemetry_ts: float | None = None
    last_sample_ts: float = 0.0
    # Seen spacing of telemetry (EWMA): the stale rule needs each device's own interval even
    # when the device does not state it.
    interval_estimate_s: float | None = None
    # What the controller refused from the device, by topic kind ("meta": "bad_request: …");
    # a valid message of the same kind clears its entry. Memory only: a retained bad message
    # is redelivered, so the flag comes back after a restart by itself.
    problems: dict[str, str] = field(default_factory=dict)
    last_rejection_event: float = 0.0
    version: int = 0


@dataclass
class Incoming:
    """One decoded device message, as the ingest queue hands it to ``apply_batch``."""

    # status | meta | telemetry | events | cmd/result, validated; or "rejected": what ingest
    # refused from the device, {kind, code, reason, dropped}
    kind: str
    device_id: str
    body: dict[str, Any]
    received: float


@dataclass
class BatchOutcome:
    applied: int = 0
    ignored_stale_status: int = 0
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    cmd_results: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    sent_times: list[float] = field(default_factory=list)  # the devices' own ts of each telemetry


_UPSERT_TELEMETRY = (
    "INSERT INTO devices (id, first_seen, last_seen, telemetry, telemetry_ts) VALUES (?,?,?,?,?)"
    " ON CONFLICT(id) DO UPDATE SET last_seen=excluded.last_seen,"
    " telemetry=excluded.telemetry, telemetry_ts=excluded.telemetry_ts"
)
_UPSERT_STEP = (
    "INSERT INTO rollout_devices (rollout_id, device_id, position, state, previous, cmd_id,"
    " progress, error, updated_ts, detail) VALUES (?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT(rollout_id, device_id) DO UPDATE SET position=excluded.position,"
    " state=excluded.state, previous=excluded.previous, cmd_id=excluded.cmd_id,"
    " progress=excluded.progress, error=excluded.error, updated_ts=excluded.updated_ts,"
    " detail=excluded.detail"
)
_INSERT_ROLLOUT_EVENT = (
    "INSERT INTO rollout_events (rollout_id, ts, device_id, decision, reason) VALUES (?,?,?,?,?)"
)
_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


def _dumps(value: Any) -> str:
    return _json.encode(value).decode()


class Registry:
    def __init__(
        self,
        location: str | Path,
        *,
        pool_size: int = 8,
        password: str | None = None,
        telemetry_sample_s: float = 10.0,
        telemetry_retention_s: float = 7 * 86400.0,
        events_retention_s: float = 30 * 86400.0,
        events_per_device: int = 1000,
        event_max_bytes: int = 8 * 1024,
    ) -> None:
        """``location``: a SQLite file path (or ":memory:"), or a ``postgresql://`` URL."""
        self.backend = open_backend(location, pool_size=pool_size, password=password)
        self.telemetry_sample_s = telemetry_sample_s
        self.telemetry_retention_s = telemetry_retention_s
        self.events_retention_s = events_retention_s
        self.events_per_device = events_per_device
        self.event_max_bytes = event_max_bytes
        self._devices_lock = threading.Lock()
        self.devices: dict[str, DeviceRecord] = {}
        self._refreshed_to = 0.0  # the newest devices.last_seen refresh_shared has read
        self._load_devices()
        self._event_counts: dict[str, int] = {}
        self._bound_stored_events()

    @property
    def shared(self) -> bool:
        """Whether other controllers may write this database (PostgreSQL)."""
        return self.backend.shared

    def close(self) -> None:
        self.backend.close()

    def _load_devices(self) -> None:
        for row in self.backend.query(
            "SELECT id, first_seen, last_seen, state, session, status_ts, version, meta, meta_ts,"
            " telemetry, telemetry_ts FROM devices"
        ):
            record = _record_of(row)
            self.devices[record.id] = record
            self._refreshed_to = max(self._refreshed_to, record.last_seen)

    def refresh_shared(self) -> int:
        """Fold in what other controllers on this database wrote since the last call: the
        latest telemetry of every device (their share of it), and devices only they have
        seen. A no-op on a database no one else writes. Returns the devices updated."""
        if not self.shared:
            return 0
        rows = self.backend.query(
            "SELECT id, first_seen, last_seen, state, session, status_ts, version, meta, meta_ts,"
            " telemetry, telemetry_ts FROM devices WHERE last_seen > ?",
            (self._refreshed_to - REFRESH_OVERLAP_S,),
        )
        updated = 0
        for row in rows:
            self._refreshed_to = max(self._refreshed_to, row["last_seen"])
            record = self.devices.get(row["id"])
            if record is None:
                record = _record_of(row)
                with self._devices_lock:
                    self.devices.setdefault(record.id, record)
                updated += 1
                continue
            stored_ts = row["telemetry_ts"]
            if stored_ts is None or (record.telemetry_ts or 0.0) >= stored_ts:
                continue
            telemetry = _load_stored(record, "telemetry", row["telemetry"])
            if telemetry:
                record.telemetry, record.telemetry_ts = telemetry, stored_ts
                record.last_sample_ts = max(record.last_sample_ts, stored_ts)
            record.last_seen = max(record.last_seen, row["last_seen"])
            record.version += 1
            updated += 1
        return updated

    def _bound_stored_events(self) -> None:
        """Hold events written before these bounds to them too: drop oversize bodies, trim
        each device to its cap, and learn the per-device counts that later trims use."""
        with self.backend.transaction() as tx:
            tx.execute("DELETE FROM events WHERE length(body) > ?", (self.event_max_bytes,))
            counts = tx.fetchall("SELECT device_id, COUNT(*) FROM events GROUP BY device_id")
            for device_id, count in counts:
                self._event_counts[device_id] = count
                if count > self.events_per_device:
                    self._trim_events(tx, device_id)

    # --- ingest -------------------------------------------------------------------------

    def _record(self, device_id: str, now: float) -> DeviceRecord:
        record = self.devices.get(device_id)
        if record is None:
            record = DeviceRecord(id=device_id, first_seen=now, last_seen=now)
            with self._devices_lock:
                self.devices[device_id] = record
        return record

    def apply_batch(self, batch: list[Incoming]) -> BatchOutcome:
        """Fold a batch into memory and commit it in one transaction."""
        outcome = BatchOutcome()
        status_rows: dict[str, tuple] = {}
        meta_rows: dict[str, tuple] = {}
        seen_rows: dict[str, tuple] = {}
        samples: list[tuple] = []
        events: list[tuple] = []
        results: list[tuple] = []
        trim: set[str] = set()
        for message in batch:
            record = self._record(message.device_id, message.received)
            body = message.body
            if message.kind == "rejected":
                problem = f"{body['code']}: {body['reason']}"
                if body["dropped"] > 1:
                    problem += f" ({body['dropped']} messages dropped)"
                record.problems[body["kind"]] = problem
                record.version += 1
                if message.received - record.last_rejection_event >= REJECTION_EVENT_EVERY_S:
                    record.last_rejection_event = message.received
                    events.append(
                        (
                            record.id,
                            message.received,
                            "rejected_input",
                            _dumps({"event": "rejected_input", "ts": message.received, **body}),
                        )
                    )
                    trim.add(record.id)
                continue
            if record.problems.pop(message.kind, None) is not None:
                record.version += 1
            if message.kind == "status":
                session = body.get("session")
                if (
                    isinstance(session, int)
                    and record.session is not None
                    and session < record.session
                ):
                    # A Will (or any late status) from an earlier session, delivered after the
                    # device came back: the newer session's state stands.
                    outcome.ignored_stale_status += 1
                    log.info(
                        "stale_status_ignored",
                        device=record.id,
                        state=body.get("state"),
                        session=session,
                        newest=record.session,
                    )
                    continue
                record.state = body["state"]
                record.session = session
                record.status_ts = float(body["ts"])
                record.agent_version = body["version"] or record.agent_version
                if record.state != "lost":
                    record.last_seen = max(record.last_seen, message.received)
                status_rows[record.id] = (
                    record.id,
                    record.first_seen,
                    record.last_seen,
                    record.state,
                    record.session,
                    record.status_ts,
                    record.agent_version,
                )
            elif message.kind == "meta":
                record.meta = body
                record.meta_ts = message.received
                record.last_seen = max(record.last_seen, message.received)
                meta_rows[record.id] = (
                    record.id,
                    record.first_seen,
                    record.last_seen,
                    _dumps(body),
                    record.meta_ts,
                )
            elif message.kind == "telemetry":
                record.telemetry = body
                sent = body.get("ts")
                if sent is None or abs(sent - message.received) > MAX_CLOCK_SKEW_S:
                    sent = message.received
                if record.telemetry_ts is not None and 0 < sent - record.telemetry_ts < 3600:
                    gap = sent - record.telemetry_ts
                    estimate = record.interval_estimate_s
                    record.interval_estimate_s = (
                        gap if estimate is None else 0.8 * estimate + 0.2 * gap
                    )
                record.telemetry_ts = sent
                record.last_seen = max(record.last_seen, message.received)
                outcome.sent_times.append(sent)
                if sent - record.last_sample_ts >= self.telemetry_sample_s:
                    # The latest telemetry lives in memory; SQLite gets it once per sample
                    # period (and at shutdown), which keeps the write rate per device bounded.
                    record.last_sample_ts = sent
                    point = telemetry_point(body)
                    samples.append((record.id, sent, *point.values(), body.get("state")))
                    seen_rows[record.id] = (
                        record.id,
                        record.first_seen,
                        record.last_seen,
                        _dumps(body),
                        sent,
                    )
            elif message.kind == "events":
                # PostgreSQL text cannot hold NUL; the body keeps it, escaped in the JSON.
                kind = str(body.get("event") or body.get("type") or "event").replace("\x00", "")
                ts = body.get("ts")
                if ts is None or abs(ts - message.received) > MAX_CLOCK_SKEW_S:
                    ts = message.received  # retention counts from it: it must not be the future
                events.append((record.id, ts, kind, _dumps(body)))
                trim.add(record.id)
                outcome.events.append((record.id, body))
            elif message.kind == "cmd/result":
                ok = 1 if body["ok"] else 0
                payload = body.get("result") if ok else body.get("error")
                results.append((message.received, ok, _dumps(payload), body["id"], record.id))
                outcome.cmd_results.append((record.id, body))
            else:
                continue
            record.version += 1
            outcome.applied += 1
        with self.backend.transaction() as tx:
            if status_rows:
                tx.executemany(
                    "INSERT INTO devices (id, first_seen, last_seen, state, session, status_ts,"
                    " version) VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET"
                    " last_seen=excluded.last_seen, state=excluded.state, session=excluded.session,"
                    " status_ts=excluded.status_ts, version=excluded.version",
                    list(status_rows.values()),
                )
            if meta_rows:
                tx.executemany(
                    "INSERT INTO devices (id, first_seen, last_seen, meta, meta_ts) VALUES"
                    " (?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET last_seen=excluded.last_seen,"
                    " meta=excluded.meta, meta_ts=excluded.meta_ts",
                    list(meta_rows.values()),
                )
            if seen_rows:
                tx.executemany(_UPSERT_TELEMETRY, list(seen_rows.values()))
            if samples:
                tx.insert_rows("telemetry", SAMPLE_COLUMNS, samples)
            if events:
                tx.insert_rows("events", ("device_id", "ts", "kind", "body"), events)
                for device_id, *_ in events:
                    self._event_counts[device_id] = self._event_counts.get(device_id, 0) + 1
                for device_id in trim:
                    # 10 % slack: one DELETE per device per ~100 events, not per event.
                    if self._event_counts[device_id] > self.events_per_device * 1.1:
                        self._trim_events(tx, device_id)
            if results:
                tx.executemany(
                    "UPDATE commands SET done_ts=?, ok=?, result=? WHERE id=? AND device_id=?",
                    results,
                )
        return outcome

    def _trim_events(self, tx: Transaction, device_id: str) -> None:
        """Keep the newest ``events_per_device`` events of one device (inside ``tx``)."""
        removed = tx.execute(
            "DELETE FROM events WHERE device_id=? AND id <= (SELECT id FROM events WHERE"
            " device_id=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (device_id, device_id, self.events_per_device),
        )
        # Counted again rather than decremented: retention prunes without telling the counts.
        self._event_counts[device_id] = tx.fetchall(
            "SELECT COUNT(*) FROM events WHERE device_id=?", (device_id,)
        )[0][0]
        log.info("events_trimmed", device=device_id, removed=removed)

    def persist_latest(self) -> None:
        """Write every device's latest telemetry and last_seen (at shutdown)."""
        rows = [
            (r.id, r.first_seen, r.last_seen, _dumps(r.telemetry), r.telemetry_ts)
            for r in self.snapshot()
            if r.telemetry
        ]
        if rows:
            with self.backend.transaction() as tx:
                tx.executemany(_UPSERT_TELEMETRY, rows)

    def prune(self, now: float | None = None) -> int:
        """Drop telemetry and events past their retention; returns rows removed."""
        now = time.time() if now is None else now
        with self.backend.transaction() as tx:
            removed = tx.execute(
                "DELETE FROM telemetry WHERE ts < ?", (now - self.telemetry_retention_s,)
            )
            removed += tx.execute(
                "DELETE FROM events WHERE ts < ?", (now - self.events_retention_s,)
            )
            # Sessions past their expiry are refused anyway; this keeps the table small.
            tx.execute("DELETE FROM sessions WHERE expires < ?", (now,))
        return removed

    # --- commands (low rate, from the web side) ------------------------------------------

    def record_command(
        self, command_id: str, device_id: str, op: str, args: dict, source: str
    ) -> None:
        with self.backend.transaction() as tx:
            tx.execute(
                "INSERT INTO commands (id, device_id, op, args, sent_ts, source) VALUES"
                " (?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET device_id=excluded.device_id,"
                " op=excluded.op, args=excluded.args, sent_ts=excluded.sent_ts,"
                " done_ts=NULL, ok=NULL, result=NULL, source=excluded.source",
                (command_id, device_id, op, _dumps(args), time.time(), source),
            )

    def command(self, command_id: str) -> dict[str, Any] | None:
        rows = self.backend.query("SELECT * FROM commands WHERE id=?", (command_id,))
        return _command_dict(rows[0]) if rows else None

    def commands(self, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.backend.query(
            "SELECT * FROM commands WHERE device_id=? ORDER BY sent_ts DESC LIMIT ?",
            (device_id, limit),
        )
        return [_command_dict(row) for row in rows]

    # --- rollouts (agent.fleet.rollout) ----------------------------------------------------

    def insert_rollout(
        self,
        rollout_id: str,
        created: float,
        spec: str,
        state: str,
        steps: list[tuple],
        *,
        expect: str | None = None,
        events: list[tuple] = (),
    ) -> None:
        """A new rollout with its device steps (rows as ``save_rollout`` takes), at once."""
        with self.backend.transaction() as tx:
            tx.execute(
                "INSERT INTO rollouts (id, created_ts, spec, state, expect) VALUES (?,?,?,?,?)",
                (rollout_id, created, spec, state, expect),
            )
            tx.executemany(_UPSERT_STEP, [(rollout_id, *step) for step in steps])
            if events:
                tx.executemany(_INSERT_ROLLOUT_EVENT, [(rollout_id, *e) for e in events])

    def save_rollout(
        self,
        rollout_id: str,
        state: str,
        reason: str | None,
        steps: list[tuple],
        *,
        owner: str,
        events: list[tuple] = (),
    ) -> bool:
        """A rollout's state, the device steps given and its new decision events, in one
        transaction, written only while ``owner`` holds its lease: False (nothing written)
        when another controller took it. ``steps`` rows: (device_id, position, state, previous
        JSON, cmd_id, progress, error, sent_ts, detail JSON); ``events``: (ts, device_id,
        decision, reason)."""
        with self.backend.transaction() as tx:
            if (
                tx.execute(
                    "UPDATE rollouts SET state=?, reason=? WHERE id=? AND lease_owner=?",
                    (state, reason, rollout_id, owner),
                )
                != 1
            ):
                return False
            if steps:
                tx.executemany(_UPSERT_STEP, [(rollout_id, *step) for step in steps])
            if events:
                tx.executemany(_INSERT_ROLLOUT_EVENT, [(rollout_id, *e) for e in events])
        return True

    def rollout_events(
        self, rollout_id: str, *, after_id: int = 0, limit: int = 50
    ) -> list[dict[str, Any]]:
        """A rollout's decisions, oldest first: those after ``after_id``, or (at 0) the latest
        ``limit``."""
        columns = "SELECT id, ts, device_id, decision, reason FROM rollout_events"
        if after_id:
            return self.backend.query(
                f"{columns} WHERE rollout_id=? AND id>? ORDER BY id LIMIT ?",
                (rollout_id, after_id, limit),
            )
        rows = self.backend.query(
            f"{columns} WHERE rollout_id=? ORDER BY id DESC LIMIT ?", (rollout_id, limit)
        )
        return rows[::-1]

    def rollout_rows(self, rollout_id: str | None = None) -> list[tuple[dict, list[dict]]]:
        """Stored rollouts (one, or all) with their device steps in position order."""
        where, params = ("WHERE id=?", (rollout_id,)) if rollout_id else ("", ())
        rollouts = self.backend.query(
            "SELECT id, created_ts, spec, state, reason, lease_owner, lease_expires, expect"
            f" FROM rollouts {where}",
            params,
        )
        steps: dict[str, list[dict]] = {row["id"]: [] for row in rollouts}
        if rollouts:
            step_where = "WHERE rollout_id=?" if rollout_id else ""
            for step in self.backend.query(
                f"SELECT * FROM rollout_devices {step_where} ORDER BY rollout_id, position",
                params,
            ):
                steps.setdefault(step["rollout_id"], []).append(step)
        return [(row, steps[row["id"]]) for row in rollouts]

    def take_lease(self, rollout_id: str, owner: str, ttl_s: float, *, force: bool = False) -> bool:
        """Hold (or renew) the right to drive one rollout for ``ttl_s``: True when ``owner``
        holds it now. Free, expired or already ours is taken; someone else's live lease only
        with ``force`` (a rollback asked of this controller)."""
        now = time.time()
        condition = (
            "" if force else " AND (lease_owner IS NULL OR lease_owner=? OR lease_expires<?)"
        )
        params: tuple = (owner, now + ttl_s, rollout_id) + (() if force else (owner, now))
        with self.backend.transaction() as tx:
            return (
                tx.execute(
                    f"UPDATE rollouts SET lease_owner=?, lease_expires=? WHERE id=?{condition}",
                    params,
                )
                == 1
            )

    def release_lease(self, rollout_id: str, owner: str) -> None:
        with self.backend.transaction() as tx:
            tx.execute(
                "UPDATE rollouts SET lease_owner=NULL, lease_expires=NULL"
                " WHERE id=? AND lease_owner=?",
                (rollout_id, owner),
            )

    # --- dashboard sessions (agent.fleet.auth) ---------------------------------------------

    def save_session(self, key: str, csrf: str, user: str, expires: float) -> None:
        with self.backend.transaction() as tx:
            tx.execute(
                "INSERT INTO sessions (key, csrf, username, expires) VALUES (?,?,?,?)",
                (key, csrf, user, expires),
            )

    def load_session(self, key: str) -> tuple[str, str, float] | None:
        """(csrf, user, expires) of a live session, or None."""
        rows = self.backend.query(
            "SELECT csrf, username, expires FROM sessions WHERE key=? AND expires>=?",
            (key, time.time()),
        )
        return (rows[0]["csrf"], rows[0]["username"], rows[0]["expires"]) if rows else None

    def delete_session(self, key: str) -> None:
        with self.backend.transaction() as tx:
            tx.execute("DELETE FROM sessions WHERE key=?", (key,))

    # --- reads ---------------------------------------------------------------------------

    def snapshot(self) -> list[DeviceRecord]:
        with self._devices_lock:
            return list(self.devices.values())

    def series(self, device_id: str, since: float = 0.0, limit: int = 2000) -> list[dict[str, Any]]:
        rows = self.backend.query(
            "SELECT ts, decode_tps, prefill_tps, mem_bytes, rss_bytes, temp_c, cpu_percent,"
            " queue_depth FROM telemetry WHERE device_id=? AND ts>? ORDER BY ts DESC LIMIT ?",
            (device_id, since, limit),
        )
        return rows[::-1]

    def fleet_history(self, since: float, bucket_s: int) -> list[dict[str, Any]]:
        """The whole fleet over time from the stored telemetry samples (every controller's, so
        the same answer from any of them): per ``bucket_s`` bucket from ``since``, how many
        devices reported each state and their summed decode tok/s (each device's mean over
        the bucket). One row per bucket and state, so the answer is bounded by the buckets
        asked for, not by the fleet; the query reads the samples in the window once."""
        rows = self.backend.query(
            # CAST(ts AS BIGINT) / n is integer division on both databases (SQLite truncates
            # the cast, PostgreSQL rounds it: a sample within half a second of a bucket's edge
            # may fall in the neighbouring bucket, nothing is lost or counted twice).
            "SELECT bucket, state, COUNT(*) AS devices, SUM(tps) AS decode_tps FROM ("
            " SELECT CAST(ts AS BIGINT) / ? AS bucket, device_id, MAX(state) AS state,"
            " AVG(decode_tps) AS tps FROM telemetry WHERE ts >= ? GROUP BY 1, 2) AS per_device"
            " GROUP BY 1, 2 ORDER BY 1",
            (bucket_s, since),
        )
        buckets: dict[int, dict[str, Any]] = {}
        for row in rows:
            entry = buckets.setdefault(
                int(row["bucket"]),
                {"ts": int(row["bucket"]) * bucket_s, "counts": {}, "decode_tps": 0.0},
            )
            state = row["state"] if row["state"] in CHART_STATES else "other"
            entry["counts"][state] = entry["counts"].get(state, 0) + int(row["devices"])
            entry["decode_tps"] += float(row["decode_tps"] or 0.0)
        return list(buckets.values())

    def events(
        self, device_id: str | None = None, after_id: int = 0, limit: int = 50
    ) -> list[dict[str, Any]]:
        if device_id is None:
            rows = self.backend.query(
                "SELECT id, device_id, ts, kind, body FROM events WHERE id>?"
                " ORDER BY id DESC LIMIT ?",
                (after_id, limit),
            )
        else:
            rows = self.backend.query(
                "SELECT id, device_id, ts, kind, body FROM events WHERE device_id=? AND id>?"
                " ORDER BY id DESC LIMIT ?",
                (device_id, after_id, limit),
            )
        return [{**r, "body": _decode.decode(r["body"])} for r in reversed(rows)]


def _command_dict(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "device_id": row["device_id"],
        "op": row["op"],
        "args": _decode.decode(row["args"]),
        "sent_ts": row["sent_ts"],
        "done_ts": row["done_ts"],
        "ok": None if row["ok"] is None else bool(row["ok"]),
        "result": _decode.decode(row["result"]) if row["result"] else None,
        "source": row["source"],
    }


_STATES = frozenset({"starting", "ready", "busy", "degraded", "draining", "stopped", "lost"})


def _load_stored(record: DeviceRecord, kind: str, text: str | None) -> dict[str, Any]:
    """A stored meta/telemetry validated as if it had just arrived; {} and a flag if not."""
    if not text:
        return {}
    try:
        try:
            body = _decode.decode(text)
        except msgspec.DecodeError:
            raise RequestError(f"{kind}: not valid JSON", field=kind) from None
        return schemas.validate(kind, body)
    except RequestError as exc:
        record.problems[kind] = f"bad_request: stored {exc.message}"
        log.warning("stored_record_invalid", device=record.id, kind=kind, reason=exc.message)
        return {}


def _record_of(row: dict[str, Any]) -> DeviceRecord:
    """A stored devices row as a record, every field checked as if it had just arrived."""
    record = DeviceRecord(
        id=row["id"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        state=row["state"] if row["state"] in _STATES else None,
        session=row["session"] if isinstance(row["session"], int) else None,
        status_ts=row["status_ts"] if isinstance(row["status_ts"], float) else None,
        agent_version=row["version"] if isinstance(row["version"], str) else None,
        meta_ts=row["meta_ts"],
    )
    record.meta = _load_stored(record, "meta", row["meta"])
    record.telemetry = _load_stored(record, "telemetry", row["telemetry"])
    if record.telemetry:
        record.telemetry_ts = row["telemetry_ts"]
        record.last_sample_ts = row["telemetry_ts"] or 0.0
    return record
