"""Registry: batched ingest into SQLite (WAL), stale sessions, downsampling, retention, reload."""

from __future__ import annotations

import sqlite3
import time

from agent.fleet.registry import Incoming, Registry
from agent.fleet.view import device_row, effective_state, fleet_summary


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


def test_database_is_wal_and_survives_a_restart(tmp_path):
    path = tmp_path / "fleet.db"
    registry = Registry(path)
    now = time.time()
    registry.apply_batch([status("pi-1", "ready", 5, now), telemetry("pi-1", now, 30.0)])
    registry.apply_batch(
        [telemetry("pi-1", now + 1, 31.5)]
    )  # inside the sample period: memory only
    registry.persist_latest()  # what ingest does at shutdown
    registry.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    reopened = Registry(path)
    record = reopened.devices["pi-1"]
    assert (record.state, record.session, record.telemetry["decode_tps"]) == ("ready", 5, 31.5)


def test_a_lost_from_an_older_session_is_ignored(tmp_path):
    registry = Registry(tmp_path / "fleet.db")
    now = time.time()
    registry.apply_batch([status("pi-1", "ready", 1, now), status("pi-1", "ready", 2, now + 1)])
    outcome = registry.apply_batch(
        [status("pi-1", "lost", 1, now + 2)]
    )  # the old session's Will, late
    assert outcome.ignored_stale_status == 1
    assert registry.devices["pi-1"].state == "ready"
    registry.apply_batch([status("pi-1", "lost", 2, now + 3)])  # the current session's Will
    assert registry.devices["pi-1"].state == "lost"


def test_telemetry_is_downsampled_per_device(tmp_path):
    registry = Registry(tmp_path / "fleet.db", telemetry_sample_s=10.0)
    start = time.time() - 100
    registry.apply_batch([telemetry("pi-1", start + s) for s in range(30)])  # 1 Hz for 30 s
    points = registry.series("pi-1")
    assert [round(p["ts"] - start) for p in points] == [0, 10, 20]
    # the latest value is still current even when it is not kept as a point
    assert registry.devices["pi-1"].telemetry["ts"] == start + 29


def test_retention_prunes_old_points_and_events(tmp_path):
    registry = Registry(
        tmp_path / "fleet.db", telemetry_sample_s=0, telemetry_retention_s=60, events_retention_s=60
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


def test_command_results_update_the_sent_command(tmp_path):
    registry = Registry(tmp_path / "fleet.db")
    registry.record_command("c1", "pi-1", "drain", {}, "api")
    assert registry.command("c1")["ok"] is None
    outcome = registry.apply_batch(
        [Incoming("cmd/result", "pi-1", {"id": "c1", "ok": True, "result": {"x": 1}}, time.time())]
    )
    assert outcome.cmd_results[0][1]["id"] == "c1"
    command = registry.command("c1")
    assert (command["ok"], command["result"]) == (True, {"x": 1})


def test_a_silent_device_is_stale_and_a_lost_one_stays_lost(tmp_path):
    registry = Registry(tmp_path / "fleet.db")
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
