"""The controller's registry: every device, its latest status/meta/telemetry, history, commands.

SQLite in WAL mode holds what must survive a restart: devices with their latest status,
meta and telemetry, a telemetry time series kept at one point per device per
``telemetry_sample_s`` for ``telemetry_retention_s``, events, commands with their results,
and rollouts. An in-memory copy of the device rows (``DeviceRecord``) answers the dashboard,
API and /metrics without touching the disk.

Writes: ``apply_batch`` is called by the one ingest writer thread with a batch of decoded
messages and commits them in one transaction (executemany per table); the web side writes
its low-rate rows (commands, rollouts) through the same connection under ``_write_lock``.
Reads of history use one connection per thread. This module does no MQTT and no HTTP.

What it takes is validated (agent.fleet.schemas): ``apply_batch`` gets objects that passed
their schema, and rows loaded at start are validated again, so a record written by an older
controller cannot break the dashboard; a device whose stored meta fails is flagged instead.

Bound on disk per device: one ``devices`` row (meta and telemetry, each at most its message
limit), telemetry points at most one per ``telemetry_sample_s`` of controller time for
``telemetry_retention_s``, and at most ``events_per_device`` plus 10 % events (the newest;
older ones go in the same transaction), each at most ``event_max_bytes``: with the defaults,
1100 x 8 KiB = 8.6 MiB of events per device, whatever the device sends.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import msgspec

from agent.errors import RequestError
from agent.fleet import schemas
from agent.log import get_logger

log = get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    state TEXT,
    session INTEGER,
    status_ts REAL,
    version TEXT,
    meta TEXT,
    meta_ts REAL,
    telemetry TEXT,
    telemetry_ts REAL
);
CREATE TABLE IF NOT EXISTS telemetry (
    device_id TEXT NOT NULL,
    ts REAL NOT NULL,
    decode_tps REAL,
    prefill_tps REAL,
    mem_bytes INTEGER,
    rss_bytes INTEGER,
    temp_c REAL,
    cpu_percent REAL,
    queue_depth INTEGER
);
CREATE INDEX IF NOT EXISTS telemetry_by_device ON telemetry (device_id, ts);
CREATE INDEX IF NOT EXISTS telemetry_by_ts ON telemetry (ts);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_device ON events (device_id, id);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    op TEXT NOT NULL,
    args TEXT NOT NULL,
    sent_ts REAL NOT NULL,
    done_ts REAL,
    ok INTEGER,
    result TEXT,
    source TEXT
);
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device_id, sent_ts);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    created_ts REAL NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    state TEXT NOT NULL,
    previous TEXT,
    cmd_id TEXT,
    progress REAL,
    error TEXT,
    updated_ts REAL,
    PRIMARY KEY (rollout_id, device_id)
);
"""

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
_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


def _dumps(value: Any) -> str:
    return _json.encode(value).decode()


class Registry:
    def __init__(
        self,
        db_path: str | Path,
        *,
        telemetry_sample_s: float = 10.0,
        telemetry_retention_s: float = 7 * 86400.0,
        events_retention_s: float = 30 * 86400.0,
        events_per_device: int = 1000,
        event_max_bytes: int = 8 * 1024,
    ) -> None:
        self.db_path = str(db_path)
        if self.db_path != ":memory:":
            Path(self.db_path).parent.mkdir(parents=True, exist_ok=True)
        self.telemetry_sample_s = telemetry_sample_s
        self.telemetry_retention_s = telemetry_retention_s
        self.events_retention_s = events_retention_s
        self.events_per_device = events_per_device
        self.event_max_bytes = event_max_bytes
        self._write_lock = threading.Lock()
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)
        self._local = threading.local()
        self._devices_lock = threading.Lock()
        self.devices: dict[str, DeviceRecord] = {}
        self._load_devices()
        self._event_counts: dict[str, int] = {}
        self._bound_stored_events()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across a controller crash in WAL mode; only a power cut can lose
        # the last batch, which the devices resend anyway (retained status/meta, telemetry).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._write_lock:
            self._writer.close()

    def _load_devices(self) -> None:
        rows = self._writer.execute(
            "SELECT id, first_seen, last_seen, state, session, status_ts, version, meta, meta_ts,"
            " telemetry, telemetry_ts FROM devices"
        ).fetchall()
        for row in rows:
            record = DeviceRecord(
                id=row[0],
                first_seen=row[1],
                last_seen=row[2],
                state=row[3] if row[3] in _STATES else None,
                session=row[4] if isinstance(row[4], int) else None,
                status_ts=row[5] if isinstance(row[5], float) else None,
                agent_version=row[6] if isinstance(row[6], str) else None,
                meta_ts=row[8],
            )
            record.meta = _load_stored(record, "meta", row[7])
            record.telemetry = _load_stored(record, "telemetry", row[9])
            if record.telemetry:
                record.telemetry_ts = row[10]
                record.last_sample_ts = row[10] or 0.0
            self.devices[record.id] = record

    def _bound_stored_events(self) -> None:
        """Hold events written before these bounds to them too: drop oversize bodies, trim
        each device to its cap, and learn the per-device counts that later trims use."""
        with self._write_lock:
            self._writer.execute(
                "DELETE FROM events WHERE length(body) > ?", (self.event_max_bytes,)
            )
            counts = self._writer.execute(
                "SELECT device_id, COUNT(*) FROM events GROUP BY device_id"
            ).fetchall()
            for device_id, count in counts:
                self._event_counts[device_id] = count
                if count > self.events_per_device:
                    self._trim_events(self._writer, device_id)

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
                        (record.id, message.received, "rejected_input",
                         _dumps({"event": "rejected_input", "ts": message.received, **body}))
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
                    samples.append((record.id, sent, *point.values()))
                    seen_rows[record.id] = (
                        record.id,
                        record.first_seen,
                        record.last_seen,
                        _dumps(body),
                        sent,
                    )
            elif message.kind == "events":
                kind = str(body.get("event") or body.get("type") or "event")
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
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN")
            try:
                if status_rows:
                    conn.executemany(
                        "INSERT INTO devices (id, first_seen, last_seen, state, session, status_ts, version)"
                        " VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET last_seen=excluded.last_seen,"
                        " state=excluded.state, session=excluded.session, status_ts=excluded.status_ts,"
                        " version=excluded.version",
                        list(status_rows.values()),
                    )
                if meta_rows:
                    conn.executemany(
                        "INSERT INTO devices (id, first_seen, last_seen, meta, meta_ts) VALUES (?,?,?,?,?)"
                        " ON CONFLICT(id) DO UPDATE SET last_seen=excluded.last_seen, meta=excluded.meta,"
                        " meta_ts=excluded.meta_ts",
                        list(meta_rows.values()),
                    )
                if seen_rows:
                    conn.executemany(_UPSERT_TELEMETRY, list(seen_rows.values()))
                if samples:
                    conn.executemany(
                        "INSERT INTO telemetry (device_id, ts, decode_tps, prefill_tps, mem_bytes, rss_bytes,"
                        " temp_c, cpu_percent, queue_depth) VALUES (?,?,?,?,?,?,?,?,?)",
                        samples,
                    )
                if events:
                    conn.executemany(
                        "INSERT INTO events (device_id, ts, kind, body) VALUES (?,?,?,?)", events
                    )
                    for device_id, *_ in events:
                        self._event_counts[device_id] = self._event_counts.get(device_id, 0) + 1
                    for device_id in trim:
                        # 10 % slack: one DELETE per device per ~100 events, not per event.
                        if self._event_counts[device_id] > self.events_per_device * 1.1:
                            self._trim_events(conn, device_id)
                if results:
                    conn.executemany(
                        "UPDATE commands SET done_ts=?, ok=?, result=? WHERE id=? AND device_id=?",
                        results,
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return outcome

    def _trim_events(self, conn: sqlite3.Connection, device_id: str) -> None:
        """Keep the newest ``events_per_device`` events of one device (under ``_write_lock``)."""
        removed = conn.execute(
            "DELETE FROM events WHERE device_id=? AND id <= (SELECT id FROM events WHERE"
            " device_id=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (device_id, device_id, self.events_per_device),
        ).rowcount
        # Counted again rather than decremented: retention prunes without telling the counts.
        self._event_counts[device_id] = conn.execute(
            "SELECT COUNT(*) FROM events WHERE device_id=?", (device_id,)
        ).fetchone()[0]
        log.info("events_trimmed", device=device_id, removed=removed)

    def persist_latest(self) -> None:
        """Write every device's latest telemetry and last_seen (at shutdown)."""
        rows = [
            (r.id, r.first_seen, r.last_seen, _dumps(r.telemetry), r.telemetry_ts)
            for r in self.snapshot()
            if r.telemetry
        ]
        with self._write_lock:
            self._writer.executemany(_UPSERT_TELEMETRY, rows)

    def prune(self, now: float | None = None) -> int:
        """Drop telemetry and events past their retention; returns rows removed."""
        now = time.time() if now is None else now
        with self._write_lock:
            removed = self._writer.execute(
                "DELETE FROM telemetry WHERE ts < ?", (now - self.telemetry_retention_s,)
            ).rowcount
            removed += self._writer.execute(
                "DELETE FROM events WHERE ts < ?", (now - self.events_retention_s,)
            ).rowcount
        return removed

    # --- commands and rollouts (low rate, from the web side) -----------------------------

    def record_command(
        self, command_id: str, device_id: str, op: str, args: dict, source: str
    ) -> None:
        with self._write_lock:
            self._writer.execute(
                "INSERT OR REPLACE INTO commands (id, device_id, op, args, sent_ts, source) VALUES (?,?,?,?,?,?)",
                (command_id, device_id, op, _dumps(args), time.time(), source),
            )

    def command(self, command_id: str) -> dict[str, Any] | None:
        row = self._reader().execute("SELECT * FROM commands WHERE id=?", (command_id,)).fetchone()
        return _command_dict(row) if row else None

    def commands(self, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
        rows = (
            self._reader()
            .execute(
                "SELECT * FROM commands WHERE device_id=? ORDER BY sent_ts DESC LIMIT ?",
                (device_id, limit),
            )
            .fetchall()
        )
        return [_command_dict(row) for row in rows]

    def execute(self, sql: str, params: tuple = ()) -> None:
        """One write of the rollout manager, serialised with the ingest batches."""
        with self._write_lock:
            self._writer.execute(sql, params)

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        return self._reader().execute(sql, params).fetchall()

    # --- reads ---------------------------------------------------------------------------

    def snapshot(self) -> list[DeviceRecord]:
        with self._devices_lock:
            return list(self.devices.values())

    def series(self, device_id: str, since: float = 0.0, limit: int = 2000) -> list[dict[str, Any]]:
        rows = (
            self._reader()
            .execute(
                "SELECT ts, decode_tps, prefill_tps, mem_bytes, rss_bytes, temp_c, cpu_percent, queue_depth"
                " FROM telemetry WHERE device_id=? AND ts>? ORDER BY ts DESC LIMIT ?",
                (device_id, since, limit),
            )
            .fetchall()
        )
        return [dict(row) for row in reversed(rows)]

    def events(
        self, device_id: str | None = None, after_id: int = 0, limit: int = 50
    ) -> list[dict[str, Any]]:
        if device_id is None:
            rows = (
                self._reader()
                .execute(
                    "SELECT id, device_id, ts, kind, body FROM events WHERE id>? ORDER BY id DESC LIMIT ?",
                    (after_id, limit),
                )
                .fetchall()
            )
        else:
            rows = (
                self._reader()
                .execute(
                    "SELECT id, device_id, ts, kind, body FROM events WHERE device_id=? AND id>?"
                    " ORDER BY id DESC LIMIT ?",
                    (device_id, after_id, limit),
                )
                .fetchall()
            )
        return [
            {
                "id": r["id"],
                "device_id": r["device_id"],
                "ts": r["ts"],
                "kind": r["kind"],
                "body": _decode.decode(r["body"]),
            }
            for r in reversed(rows)
        ]


def _command_dict(row: sqlite3.Row) -> dict[str, Any]:
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
