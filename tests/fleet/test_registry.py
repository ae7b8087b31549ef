"""Registry: batched ingest, stale sessions, downsampling, retention, reload, migrations,
leases and sessions; each test on SQLite and on a real PostgreSQL (``BOTH_REGISTRIES``)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from agent.errors import ConfigError
from agent.fleet.registry import Incoming, Registry
from agent.fleet.registry._schema import MIGRATIONS
from agent.fleet.view import device_row, effective_state, fleet_summary
from tests.fleet.conftest import BOTH_REGISTRIES

ONLY_POSTGRESQL = pytest.mark.parametrize("registry_backend", ["postgresql"], indirect=True)


def status(device: str, state: str, session: int, at: float) -> Incoming:
    return Incoming(
        "status", device, {"state": state, "session": session, "ts": at, "version": "1"}, at
    )


def telemetry(device: str, at: float, decode_tps: float = 20.0, **extra) -> Incoming:
    return Incoming(
        "telemetry",
        device,
        {
            "ts": at,
            "decode_tps": decode_tps,
            "temp_c": 50.0,
            "mem_used_bytes": 1000,
            "interval_s": 1.0,
            **extra,
        },
        at,
    )


def test_sqlite_is_wal(tmp_path):
    Registry(tmp_path / "fleet.db").close()
    mode = sqlite3.connect(tmp_path / "fleet.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


@BOTH_REGISTRIES
def test_the_database_survives_a_restart(registry_location):
    path = registry_location
    registry = Registry(path)
    now = time.time()
    registry.apply_batch([status("pi-1", "ready", 5, now), telemetry("pi-1", now, 30.0)])
    registry.apply_batch(
        [telemetry("pi-1", now + 1, 31.5)]
    )  # inside the sample period: memory only
    registry.persist_latest()  # what ingest does at shutdown
    registry.close()

    reopened = Registry(path)
    record = reopened.devices["pi-1"]
    assert (record.state, record.session, record.telemetry["decode_tps"]) == ("ready", 5, 31.5)


@BOTH_REGISTRIES
def test_a_lost_from_an_older_session_is_ignored(registry_location):
    registry = Registry(registry_location)
    now = time.time()
    registry.apply_batch([status("pi-1", "ready", 1, now), status("pi-1", "ready", 2, now + 1)])
    outcome = registry.apply_batch(
        [status("pi-1", "lost", 1, now + 2)]
    )  # the old session's Will, late
    assert outcome.ignored_stale_status == 1
    assert registry.devices["pi-1"].state == "ready"
    registry.apply_batch([status("pi-1", "lost", 2, now + 3)])  # the current session's Will
    assert registry.devices["pi-1"].state == "lost"


@BOTH_REGISTRIES
def test_telemetry_is_downsampled_per_device(registry_location):
    registry = Registry(registry_location, telemetry_sample_s=10.0)
    start = time.time() - 100
    registry.apply_batch([telemetry("pi-1", start + s) for s in range(30)])  # 1 Hz for 30 s
    points = registry.series("pi-1")
    assert [round(p["ts"] - start) for p in points] == [0, 10, 20]
    # the latest value is still current even when it is not kept as a point
    assert registry.devices["pi-1"].telemetry["ts"] == start + 29


@BOTH_REGISTRIES
def test_retention_prunes_old_points_and_events(registry_location):
    registry = Registry(
        registry_location, telemetry_sample_s=0, telemetry_retention_s=60, events_retention_s=60
    )
    now = time.time()
    registry.apply_batch(
        [
            telemetry("pi-1", now - 120),
            telemetry("pi-1", now - 10),
            Incoming("events", "pi-1", {"event": "download", "ts": now - 120}, now),
            Incoming("events", "pi-1", {"event": "model_switch", "ts": now - 5}, now),
        ]
    )
    assert registry.prune(now) == 2
    assert len(registry.series("pi-1")) == 1
    assert [e["kind"] for e in registry.events("pi-1")] == ["model_switch"]


@BOTH_REGISTRIES
def test_command_results_update_the_sent_command(registry_location):
    registry = Registry(registry_location)
    registry.record_command("c1", "pi-1", "drain", {}, "api")
    assert registry.command("c1")["ok"] is None
    outcome = registry.apply_batch(
        [Incoming("cmd/result", "pi-1", {"id": "c1", "ok": True, "result": {"x": 1}}, time.time())]
    )
    assert outcome.cmd_results[0][1]["id"] == "c1"
    command = registry.command("c1")
    assert (command["ok"], command["result"]) == (True, {"x": 1})


@BOTH_REGISTRIES
def test_a_silent_device_is_stale_and_a_lost_one_stays_lost(registry_location):
    registry = Registry(registry_location)
    now = time.time()
    registry.apply_batch(
        [
            status("pi-1", "ready", 1, now - 10),
            telemetry("pi-1", now - 10),
            status("pi-2", "ready", 1, now),
            telemetry("pi-2", now),
            status("pi-3", "lost", 1, now - 100),
        ]
    )
    states = {
        r.id: effective_state(r, now, default_interval_s=5, stale_after_intervals=3)
        for r in registry.snapshot()
    }
    # pi-1 reports a 1 s interval: 10 s of silence is more than 3 intervals
    assert states == {"pi-1": "stale", "pi-2": "ready", "pi-3": "lost"}
    rows = [
        device_row(r, now, default_interval_s=5, stale_after_intervals=3)
        for r in registry.snapshot()
    ]
    summary = fleet_summary(rows)
    assert summary["counts"]["stale"] == 1 and summary["decode_tps_total"] == 20.0


@BOTH_REGISTRIES
def test_a_new_database_gets_every_migration_and_a_newer_one_is_refused(registry_location):
    registry = Registry(registry_location)
    versions = [
        row["version"] for row in registry.backend.query("SELECT version FROM schema_version")
    ]
    assert sorted(versions) == [m.version for m in MIGRATIONS]
    with registry.backend.transaction() as tx:
        tx.execute(
            "INSERT INTO schema_version (version, name, applied_ts) VALUES (?,?,?)",
            (MIGRATIONS[-1].version + 1, "from a newer controller", time.time()),
        )
    registry.close()
    with pytest.raises(ConfigError, match="newer"):
        Registry(registry_location)


def test_a_database_from_before_migrations_is_upgraded_in_place(tmp_path):
    """A controller from before schema_version made these tables; its rows stay."""
    path = tmp_path / "fleet.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE devices (id TEXT PRIMARY KEY, first_seen REAL NOT NULL,"
        " last_seen REAL NOT NULL, state TEXT, session INTEGER, status_ts REAL, version TEXT,"
        " meta TEXT, meta_ts REAL, telemetry TEXT, telemetry_ts REAL);"
        "CREATE TABLE rollouts (id TEXT PRIMARY KEY, created_ts REAL NOT NULL,"
        " spec TEXT NOT NULL, state TEXT NOT NULL, reason TEXT);"
        "INSERT INTO devices (id, first_seen, last_seen, state) VALUES ('pi-old', 1, 2, 'ready');"
        "INSERT INTO rollouts VALUES ('r1', 1, '{\"manifest\": \"m.json\"}', 'completed', NULL);"
    )
    old.commit()
    old.close()
    registry = Registry(path)
    assert registry.devices["pi-old"].state == "ready"
    assert registry.take_lease("r1", "ctl-a", 10)  # migration 2's lease columns exist
    assert [row["id"] for row, _ in registry.rollout_rows()] == ["r1"]


@BOTH_REGISTRIES
def test_a_rollout_lease_has_one_holder_until_it_expires(registry_location):
    registry = Registry(registry_location)
    registry.insert_rollout("r1", time.time(), '{"manifest": "m.json"}', "running", [])
    assert registry.take_lease("r1", "ctl-a", 30)
    assert not registry.take_lease("r1", "ctl-b", 30)
    # The holder renews, for the last time before it dies: a short lease, so that however
    # slow the machine, only waiting can make it expire.
    assert registry.take_lease("r1", "ctl-a", 0.05)
    time.sleep(0.2)
    assert registry.take_lease("r1", "ctl-b", 30)
    assert not registry.take_lease("r1", "ctl-a", 30)  # the old holder cannot take it back
    assert registry.take_lease("r1", "ctl-a", 30, force=True)  # a rollback asked of ctl-a
    registry.release_lease("r1", "ctl-a")
    assert registry.take_lease("r1", "ctl-b", 30)


@BOTH_REGISTRIES
def test_sessions_are_stored_by_digest_and_expire(registry_location):
    from agent.fleet.auth import Authenticator

    registry = Registry(registry_location)
    here = Authenticator(None, [], sessions=registry)
    there = Authenticator(None, [], sessions=Registry(registry_location))
    session = here.open_session("admin")
    assert there.session(session.id) is None and there.needs_load(session.id)
    loaded = there.load_session(session.id)
    assert (loaded.user, loaded.csrf) == ("admin", session.csrf)
    stored = registry.backend.query("SELECT key FROM sessions")
    assert [row["key"] for row in stored] != [session.id]  # the cookie itself is not stored
    here.close_session(session.id)
    assert there.load_session(session.id) is None and there.session(session.id) is None
    registry.save_session("k", "c", "admin", time.time() - 1)
    assert registry.load_session("k") is None
    registry.prune()
    assert [row["key"] for row in registry.backend.query("SELECT key FROM sessions")] == []


@ONLY_POSTGRESQL
def test_two_registries_on_one_database_see_each_others_telemetry(registry_location):
    """Each controller gets its share of telemetry; refresh_shared brings in the rest."""
    here, there = (
        Registry(registry_location, telemetry_sample_s=0),
        Registry(registry_location, telemetry_sample_s=0),
    )
    now = time.time()
    here.apply_batch([status("pi-1", "ready", 1, now), telemetry("pi-1", now, 10.0)])
    there.apply_batch([status("pi-1", "ready", 1, now), telemetry("pi-1", now + 1, 11.0)])
    assert here.refresh_shared() == 1 and there.refresh_shared() == 0
    assert here.devices["pi-1"].telemetry["decode_tps"] == 11.0
    there.apply_batch([telemetry("pi-2", now + 2, 12.0)])  # a device only ``there`` has heard
    here.refresh_shared()
    assert here.devices["pi-2"].telemetry["decode_tps"] == 12.0
    assert [p["decode_tps"] for p in here.series("pi-1")] == [10.0, 11.0]  # the whole chart
