"""The fleet chart's history (Registry.fleet_history): devices by reported state and total
decode tok/s per bucket, from the stored telemetry samples, on SQLite and on PostgreSQL, and
complete when two controllers share one database and each ingested only part of the fleet."""

from __future__ import annotations

import time

from agent.fleet.registry import Incoming, Registry
from tests.fleet.conftest import BOTH_REGISTRIES


def telemetry(device: str, at: float, state: str, decode_tps: float) -> Incoming:
    return Incoming(
        "telemetry", device, {"ts": at, "state": state, "decode_tps": decode_tps}, at
    )


@BOTH_REGISTRIES
def test_history_counts_states_and_sums_tok_s_from_every_controller(registry_location):
    first = Registry(registry_location, telemetry_sample_s=0.0)
    second = Registry(registry_location, telemetry_sample_s=0.0)
    bucket_s = 60
    start = (int(time.time()) // bucket_s - 2) * bucket_s + 10  # well inside a bucket
    # One bucket: this controller's share of the fleet, and the other's.
    first.apply_batch([
        telemetry("pi-1", start, "ready", 20.0),
        telemetry("pi-1", start + 5, "ready", 30.0),  # one device, two samples: its mean
        telemetry("pi-2", start + 1, "busy", 10.0),
    ])
    second.apply_batch([
        telemetry("pi-3", start + 2, "degraded", 4.0),
        telemetry("pi-4", start + 3, "ready", 6.0),
        telemetry("pi-5", start + 4, "something-new", 1.0),
    ])
    # The next bucket: two devices went quiet.
    first.apply_batch([telemetry("pi-1", start + bucket_s, "busy", 8.0)])
    second.apply_batch([telemetry("pi-4", start + bucket_s, "ready", 2.0)])

    for registry in (first, second):
        history = registry.fleet_history(start - 10, bucket_s)
        assert [b["ts"] for b in history] == [start - 10, start - 10 + bucket_s]
        assert history[0]["counts"] == {"ready": 2, "busy": 1, "degraded": 1, "other": 1}
        assert history[0]["decode_tps"] == 25.0 + 10.0 + 4.0 + 6.0 + 1.0
        assert history[1]["counts"] == {"busy": 1, "ready": 1}
        assert history[1]["decode_tps"] == 8.0 + 2.0
        assert registry.fleet_history(start + bucket_s - 10, bucket_s) == history[1:]
    first.close()
    second.close()
