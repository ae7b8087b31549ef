"""The controller's registry: every device, its latest status/meta/telemetry, history, commands.

A database holds what must survive a restart: devices with their latest status, meta and
telemetry, a telemetry time series kept at one point per device per ``telemetry_sample_s``
for ``telemetry_retention_s``, events, commands with their results, rollouts (with the lease
that says which controller drives each) and dashboard sessions. It is SQLite (WAL) at a path,
or PostgreSQL at a ``postgresql://`` URL (agent.fleet.registry._backends); the SQL here is the
one both accept, and nothing outside this package knows which it is. An in-memory copy of the
device rows (``DeviceRecord``) answers the dashboard, API and /metrics without a query.

``Registry`` owns the device records and the database; the tables the web side and the
rollout thread use are its mixins, each in its own module: ``CommandTable`` (_commands),
``RolloutTables`` with the leases (_rollouts), ``SessionTable`` (_sessions) and the history
reads ``HistoryQueries`` (_history).

Writes: ``apply_batch`` is called by the one ingest writer thread with a batch of decoded
messages; an ``IngestBatch`` (_batch) folds each into its record and commits their rows in one
transaction (telemetry points in one batch insert: COPY on PostgreSQL), with ``EventBounds``
(_events) trimming the stored events. The web side and the rollout thread write their
low-rate rows (commands, rollouts, sessions) in their own short transactions. Every method
here blocks on the database: callers on an event loop go through a thread. This package does
no MQTT and no HTTP.

Several controllers on one PostgreSQL each receive every status, meta and cmd/result but only
their share of telemetry and events (shared subscriptions), so ``refresh_shared`` (called by
the ingest thread) folds in the latest telemetry the others wrote, and every chart is read
from the database, which holds all of it.

What it takes is validated (agent.fleet.schemas): ``apply_batch`` gets objects that passed
their schema, and rows loaded at start are validated again (_records), so a record written
by an older controller cannot break the dashboard; a device whose stored meta fails is flagged
instead.

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
from pathlib import Path

from agent.fleet.registry._backends import open_backend
from agent.fleet.registry._batch import UPSERT_TELEMETRY, IngestBatch
from agent.fleet.registry._commands import CommandTable
from agent.fleet.registry._events import EventBounds
from agent.fleet.registry._history import HistoryQueries
from agent.fleet.registry._records import (
    DEVICE_COLUMNS,
    BatchOutcome,
    DeviceRecord,
    Incoming,
    load_stored,
    record_of,
    to_json,
)
from agent.fleet.registry._rollouts import RolloutTables
from agent.fleet.registry._sessions import SessionTable

# Shared database: how far back ``refresh_shared`` looks past the newest row it has seen, so a
# row another controller committed late (its batch took a while) is still picked up.
REFRESH_OVERLAP_S = 5.0


class Registry(CommandTable, RolloutTables, SessionTable, HistoryQueries):
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
        self._devices_lock = threading.Lock()
        self.devices: dict[str, DeviceRecord] = {}
        self._refreshed_to = 0.0  # the newest devices.last_seen refresh_shared has read
        self._load_devices()
        self._event_bounds = EventBounds(events_per_device, event_max_bytes)
        self._event_bounds.hold_stored(self.backend)

    @property
    def shared(self) -> bool:
        """Whether other controllers may write this database (PostgreSQL)."""
        return self.backend.shared

    def close(self) -> None:
        self.backend.close()

    def _load_devices(self) -> None:
        for row in self.backend.query(f"SELECT {DEVICE_COLUMNS} FROM devices"):
            record = record_of(row)
            self.devices[record.id] = record
            self._refreshed_to = max(self._refreshed_to, record.last_seen)

    def refresh_shared(self) -> int:
        """Fold in what other controllers on this database wrote since the last call: the
        latest telemetry of every device (their share of it), and devices only they have
        seen. A no-op on a database no one else writes. Returns the devices updated."""
        if not self.shared:
            return 0
        rows = self.backend.query(
            f"SELECT {DEVICE_COLUMNS} FROM devices WHERE last_seen > ?",
            (self._refreshed_to - REFRESH_OVERLAP_S,),
        )
        updated = 0
        for row in rows:
            self._refreshed_to = max(self._refreshed_to, row["last_seen"])
            record = self.devices.get(row["id"])
            if record is None:
                record = record_of(row)
                with self._devices_lock:
                    self.devices.setdefault(record.id, record)
                updated += 1
                continue
            stored_ts = row["telemetry_ts"]
            if stored_ts is None or (record.telemetry_ts or 0.0) >= stored_ts:
                continue
            telemetry = load_stored(record, "telemetry", row["telemetry"])
            if telemetry:
                record.telemetry, record.telemetry_ts = telemetry, stored_ts
                record.last_sample_ts = max(record.last_sample_ts, stored_ts)
            record.last_seen = max(record.last_seen, row["last_seen"])
            record.version += 1
            updated += 1
        return updated

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
        ingest = IngestBatch(self.telemetry_sample_s, self._event_bounds)
        for message in batch:
            ingest.add(self._record(message.device_id, message.received), message)
        with self.backend.transaction() as tx:
            ingest.write(tx)
        return ingest.outcome

    def persist_latest(self) -> None:
        """Write every device's latest telemetry and last_seen (at shutdown)."""
        rows = [
            (r.id, r.first_seen, r.last_seen, to_json(r.telemetry), r.telemetry_ts)
            for r in self.snapshot()
            if r.telemetry
        ]
        if rows:
            with self.backend.transaction() as tx:
                tx.executemany(UPSERT_TELEMETRY, rows)

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

    # --- reads ---------------------------------------------------------------------------

    def snapshot(self) -> list[DeviceRecord]:
        with self._devices_lock:
            return list(self.devices.values())
