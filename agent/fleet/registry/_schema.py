"""The registry's tables, as one ordered list of migrations that SQLite and PostgreSQL share.

Each migration is a version number, a name and its statements, written in the SQL both
engines accept; the only word they spell differently, an auto-numbered key, is ``{serial}``.
``schema_version`` holds the versions applied. Migration 1 is the schema controllers wrote
before there were migrations, with ``IF NOT EXISTS``, so their databases take it as a no-op.
Append new migrations at the end; never edit one that has shipped.
"""

from __future__ import annotations

from typing import NamedTuple


class Migration(NamedTuple):
    version: int
    name: str
    statements: tuple[str, ...]


SERIAL = {
    "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "postgresql": "BIGSERIAL PRIMARY KEY",
}

VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ts DOUBLE PRECISION NOT NULL)"
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "devices, telemetry, events, commands, rollouts",
        (
            """CREATE TABLE IF NOT EXISTS devices (
                id TEXT PRIMARY KEY,
                first_seen DOUBLE PRECISION NOT NULL,
                last_seen DOUBLE PRECISION NOT NULL,
                state TEXT,
                session BIGINT,
                status_ts DOUBLE PRECISION,
                version TEXT,
                meta TEXT,
                meta_ts DOUBLE PRECISION,
                telemetry TEXT,
                telemetry_ts DOUBLE PRECISION
            )""",
            """CREATE TABLE IF NOT EXISTS telemetry (
                device_id TEXT NOT NULL,
                ts DOUBLE PRECISION NOT NULL,
                decode_tps DOUBLE PRECISION,
                prefill_tps DOUBLE PRECISION,
                mem_bytes BIGINT,
                rss_bytes BIGINT,
                temp_c DOUBLE PRECISION,
                cpu_percent DOUBLE PRECISION,
                queue_depth BIGINT
            )""",
            "CREATE INDEX IF NOT EXISTS telemetry_by_device ON telemetry (device_id, ts)",
            "CREATE INDEX IF NOT EXISTS telemetry_by_ts ON telemetry (ts)",
            """CREATE TABLE IF NOT EXISTS events (
                id {serial},
                device_id TEXT NOT NULL,
                ts DOUBLE PRECISION NOT NULL,
                kind TEXT NOT NULL,
                body TEXT NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS events_by_device ON events (device_id, id)",
            """CREATE TABLE IF NOT EXISTS commands (
                id TEXT PRIMARY KEY,
                device_id TEXT NOT NULL,
                op TEXT NOT NULL,
                args TEXT NOT NULL,
                sent_ts DOUBLE PRECISION NOT NULL,
                done_ts DOUBLE PRECISION,
                ok INTEGER,
                result TEXT,
                source TEXT
            )""",
            "CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device_id, sent_ts)",
            """CREATE TABLE IF NOT EXISTS rollouts (
                id TEXT PRIMARY KEY,
                created_ts DOUBLE PRECISION NOT NULL,
                spec TEXT NOT NULL,
                state TEXT NOT NULL,
                reason TEXT
            )""",
            """CREATE TABLE IF NOT EXISTS rollout_devices (
                rollout_id TEXT NOT NULL,
                device_id TEXT NOT NULL,
                position INTEGER NOT NULL,
                state TEXT NOT NULL,
                previous TEXT,
                cmd_id TEXT,
                progress DOUBLE PRECISION,
                error TEXT,
                updated_ts DOUBLE PRECISION,
                PRIMARY KEY (rollout_id, device_id)
            )""",
        ),
    ),
    Migration(
        2,
        "dashboard sessions; rollout leases",
        (
            # Keyed by the SHA-256 of the cookie: whoever reads the database cannot log in.
            """CREATE TABLE sessions (
                key TEXT PRIMARY KEY,
                csrf TEXT NOT NULL,
                username TEXT NOT NULL,
                expires DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX sessions_by_expiry ON sessions (expires)",
            "ALTER TABLE rollouts ADD COLUMN lease_owner TEXT",
            "ALTER TABLE rollouts ADD COLUMN lease_expires DOUBLE PRECISION",
        ),
    ),
    Migration(
        3,
        "telemetry samples keep the state the device reported (the fleet chart)",
        ("ALTER TABLE telemetry ADD COLUMN state TEXT",),
    ),
    Migration(
        4,
        "health-gated rollouts: expectations, step details, decision events",
        (
            # What a device serving the rollout's target reports (agent.fleet.rollout._kinds).
            "ALTER TABLE rollouts ADD COLUMN expect TEXT",
            # A step's outcome, start, phase start, command index, canary (JSON).
            "ALTER TABLE rollout_devices ADD COLUMN detail TEXT",
            """CREATE TABLE rollout_events (
                id {serial},
                rollout_id TEXT NOT NULL,
                ts DOUBLE PRECISION NOT NULL,
                device_id TEXT,
                decision TEXT NOT NULL,
                reason TEXT NOT NULL
            )""",
            "CREATE INDEX rollout_events_by_rollout ON rollout_events (rollout_id, id)",
        ),
    ),
)


def statements(migration: Migration, dialect: str) -> list[str]:
    return [s.replace("{serial}", SERIAL[dialect]) for s in migration.statements]
