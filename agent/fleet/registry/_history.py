"""The registry's history reads: a device's telemetry series, the fleet over time, events.

All of it is read from the database, which holds every controller's share (each controller
on a shared PostgreSQL writes only the telemetry and events it received), so any controller
gives the same answer. A mixin of ``Registry``: it needs only ``self.backend``. Every method
blocks on the database.
"""

from __future__ import annotations

from typing import Any

from agent.fleet.registry._backends import Backend
from agent.fleet.registry._records import from_json

# The fleet chart's states: what telemetry says; a sample with any other is counted as "other".
CHART_STATES = ("starting", "ready", "busy", "degraded", "draining")


class HistoryQueries:
    backend: Backend

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
        return [{**r, "body": from_json(r["body"])} for r in reversed(rows)]
