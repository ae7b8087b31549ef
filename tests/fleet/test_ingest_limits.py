"""Ingest's limits and schemas on plain data: what a device sends that is kept, and what is not.

The attacks against the running controller are in test_ingest_hostile.py; these pin the rules
(sizes, rate, overflow, schemas, stored bounds) one at a time, against a real SQLite registry.
"""

from __future__ import annotations

import json
import sqlite3
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.catalog.selection import Candidate, MemoryEstimate, Selection
from agent.config import FleetIngestConfig
from agent.errors import RequestError
from agent.fleet import schemas
from agent.fleet.ingest import STATUS_KEPT, Ingest
from agent.fleet.registry import Incoming, Registry
from agent.fleet.view import device_row
from agent.hardware.device import (
    CPUCluster,
    CPUInfo,
    DeviceInfo,
    GPUInfo,
    LlamaBuildInfo,
    MemoryInfo,
    PowerInfo,
)
from agent.hardware.probe import probe
from tests.fleet.conftest import simulate_fleet


def agent_meta(device: DeviceInfo) -> dict:
    """The meta agent.presence.Presence.meta publishes, every part filled in."""
    estimate = MemoryEstimate(ram_bytes=200 << 20, vram_bytes=0, weights_bytes=100 << 20)
    candidate = Candidate(
        quant="Q4_K_M", file="m.Q4_K_M.gguf", size=100 << 20, quality=0.96, n_ctx=2048,
        kv_type="f16", n_gpu_layers=0, estimate=estimate, predicted_tokens_per_s=30.0,
        verdict="chosen", reason="best quality that fits",
    )
    selection = Selection(
        model_id="m", quant="Q4_K_M", file="m.Q4_K_M.gguf", size=100 << 20, sha256="a" * 64,
        urls=["https://mirror/m.Q4_K_M.gguf"], quality=0.96, n_ctx=2048, estimate=estimate,
        candidates=[candidate], manifest_url="https://fleet/files/m.json", profile="desktop",
    )
    return {
        "device_id": "pi-1", "version": "0.1.0", "session": int(time.time() * 1000),
        "probe": msgspec.to_builtins(device),
        "profile": {"name": "desktop", "reasons": ["x86_64"]},
        "selection": msgspec.to_builtins(selection), "selection_source": "manifest",
        "problem": None, "runtime": msgspec.to_builtins(device.llama), "pool": None,
        "protocol": "5", "signing": {"required": False, "allow_unsigned": True},  # newer field
    }


FULL_DEVICE = DeviceInfo(
    cpu=CPUInfo(vendor="ARM", model="Cortex-A76", arch="aarch64", physical_cores=4,
                logical_cores=4, flags=["neon", "dotprod"],
                clusters=[CPUCluster(cpus=[0, 1, 2, 3], max_mhz=2400.0, part="Cortex-A76",
                                     count=4)]),
    memory=MemoryInfo(total_bytes=8 << 30, available_bytes=6 << 30, cgroup_limit_bytes=4 << 30,
                      budget_bytes=4 << 30),
    gpus=[GPUInfo(vendor="jetson", name="Orin", vram_total_bytes=None, unified_memory=True,
                  driver="r36", compute_capability="8.7")],
    board="Raspberry Pi 5", os="Debian 12", kernel="6.6", disk_free_bytes=20 << 30,
    temperatures_c={"cpu_thermal": 51.5}, power=PowerInfo(battery_percent=80.0, on_ac_power=True),
    llama=LlamaBuildInfo(version="0.3.36", gpu_offload=False, system_info="CPU : NEON = 1 |",
                         features=["neon"]),
    bandwidth_gbps=12.5, probe_ms=40.0,
)


@pytest.mark.parametrize("device", [FULL_DEVICE, probe(measure_bandwidth=False)],
                         ids=["every-field", "this-machine"])
def test_what_the_agent_and_the_simulator_send_is_accepted(device):
    assert schemas.validate("meta", agent_meta(device))
    sim = simulate_fleet.SimDevice(id="s", index=0, session=1, pool=None, quant="Q4_K_M",
                                   board=simulate_fleet.BOARDS[4], interval_s=1.0)
    assert schemas.validate("meta", json.loads(json.dumps(sim.meta())))
    assert schemas.validate("telemetry", json.loads(json.dumps(sim.telemetry(time.time()))))


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        ("meta", {"probe": {"cpu": "a string"}}, "meta.probe.cpu"),
        ("meta", {"selection": {"candidates": [{"quant": 7}]}},
         "meta.selection.candidates[0].quant"),
        ("meta", {"pool": "p" * 1000}, "meta.pool"),
        ("status", {"state": "ready", "session": 2**70, "ts": 1.0, "version": "1"},
         "status.session"),
        ("status", {"state": "exploded", "session": 1, "ts": 1.0, "version": "1"}, "status.state"),
        ("telemetry", {"decode_tps": True}, "telemetry.decode_tps"),
        ("telemetry", {"ts": 1e300}, "telemetry.ts"),
        ("telemetry", {"mem": {"total_bytes": -1}}, "telemetry.mem.total_bytes"),
        ("events", ["not", "an", "object"], "events"),
        ("events", {"event": "x", "deep": json.loads("[" * 40 + "]" * 40)}, "events"),
        ("cmd/result", {"id": 5, "ok": True}, "cmd/result.id"),
    ],
)
def test_garbage_is_refused_with_the_field_named(kind, body, field):
    with pytest.raises(RequestError) as refused:
        schemas.validate(kind, body)
    assert refused.value.details["field"] == field
    assert len(refused.value.message) <= schemas.REASON_CHARS


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=30,
)
KEYS = st.sampled_from(["probe", "cpu", "selection", "candidates", "state", "session", "ts", "mem",
                        "id", "ok", "error", "event", "gpus", "memory", "quant", "decode_tps"])
OBJECTS = st.dictionaries(KEYS, JSON | st.dictionaries(KEYS, JSON, max_size=4), max_size=6)


@settings(max_examples=5000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(schemas.SCHEMAS)), body=OBJECTS | JSON)
def test_any_json_is_accepted_or_refused_with_bad_request_and_never_breaks_a_row(kind, body):
    try:
        accepted = schemas.validate(kind, body)
    except RequestError as exc:
        assert exc.code == "bad_request"
        return
    if kind in ("meta", "telemetry"):  # what the dashboard renders from an accepted record
        registry = Registry(":memory:")
        registry.apply_batch([Incoming(kind, "d", accepted, time.time())])
        device_row(registry.devices["d"], time.time(), default_interval_s=10,
                   stale_after_intervals=3)
        registry.close()


def good_status(session: int, state: str = "ready") -> bytes:
    body = {"state": state, "session": session, "ts": time.time(), "version": "1"}
    return json.dumps(body).encode()


def telemetry(**extra) -> bytes:
    return json.dumps({"ts": time.time(), "decode_tps": 20.0, **extra}).encode()


def make_ingest(tmp_path, **limits) -> Ingest:
    return Ingest(Registry(tmp_path / "fleet.db"), limits=FleetIngestConfig(**limits))


def test_oversize_and_garbage_are_dropped_counted_and_flagged_on_the_devices_row(tmp_path):
    ingest = make_ingest(tmp_path)
    assert not ingest.offer("edge/v1/bad/telemetry", telemetry(pad="x" * 9000))
    assert ingest.offer("edge/v1/bad/meta", b'{"probe": {"cpu": "a string"}}')
    assert ingest.offer("edge/v1/good/telemetry", telemetry())
    ingest.flush()
    registry = ingest.registry
    assert ingest.stats.dropped["too_large"] == 1 and ingest.stats.dropped["bad_request"] == 1
    bad = device_row(registry.devices["bad"], time.time(), default_interval_s=10,
                     stale_after_intervals=3)
    assert "telemetry: too_large" in bad["problem"] and "meta: bad_request" in bad["problem"]
    assert registry.devices["good"].problems == {}
    events = registry.events("bad")
    assert {e["body"]["kind"] for e in events} <= {"telemetry", "meta"} and events
    assert all(e["kind"] == "rejected_input" for e in events)
    # the next valid message of the same topic clears that part of the flag
    ingest.offer("edge/v1/bad/telemetry", telemetry())
    ingest.flush()
    assert list(registry.devices["bad"].problems) == ["meta"]


def test_a_device_past_its_rate_loses_its_own_messages_only(tmp_path):
    ingest = make_ingest(tmp_path, device_rate_per_s=1.0, device_burst=5)
    accepted = sum(
        ingest.offer("edge/v1/noisy/events", json.dumps({"event": "spam", "i": i}).encode())
        for i in range(50)
    )
    assert accepted == 5
    assert ingest.offer("edge/v1/quiet/events", b'{"event": "download"}')
    ingest.flush()
    assert ingest.stats.dropped["rate_limited"] == 45
    assert "rate_limited" in ingest.registry.devices["noisy"].problems["events"]
    assert "quiet" not in {d for d, r in ingest.registry.devices.items() if r.problems}


def test_a_full_queue_drops_new_messages_and_status_meta_are_coalesced(tmp_path):
    ingest = make_ingest(tmp_path, queue_max=3)
    results = [ingest.offer(f"edge/v1/d{i}/telemetry", telemetry()) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert ingest.stats.dropped["queue_full"] == 2
    for session in range(10):  # a retained meta/status storm: only the latest few are kept
        ingest.offer("edge/v1/d0/meta", json.dumps({"session": session}).encode())
        ingest.offer("edge/v1/d0/status", good_status(100 + session))
    assert ingest.backlog == 3 + 1 + 1
    ingest.offer("edge/v1/d0/status", good_status(1, "lost"))  # a late Will of an old session
    ingest.flush()
    record = ingest.registry.devices["d0"]
    assert (record.meta["session"], record.state, record.session) == (9, "ready", 109)
    assert ingest.stats.coalesced == 9 + (10 + 1 - STATUS_KEPT)


def test_stored_events_are_bounded_per_device_and_per_event(tmp_path):
    registry = Registry(tmp_path / "fleet.db", events_per_device=50, event_max_bytes=1024)
    now = time.time()
    for start in range(0, 500, 25):
        registry.apply_batch(
            [Incoming("events", "flooder", {"event": "e", "i": i, "ts": now}, now)
             for i in range(start, start + 25)]
            + [Incoming("events", "calm", {"event": "e", "i": start, "ts": now}, now)]
        )
    kept = registry.events("flooder", limit=10_000)
    assert 50 <= len(kept) <= 55 and kept[-1]["body"]["i"] == 499
    assert len(registry.events("calm", limit=10_000)) == 20
    registry.close()
    # a database from before the bounds: oversize events and too many, fixed on open
    with sqlite3.connect(tmp_path / "fleet.db") as db:
        db.executemany(
            "INSERT INTO events (device_id, ts, kind, body) VALUES (?,?,?,?)",
            [("old", now, "e", json.dumps({"blob": "x" * 4096}))] * 3
            + [("old", now, "e", json.dumps({"i": i})) for i in range(80)],
        )
    reopened = Registry(tmp_path / "fleet.db", events_per_device=50, event_max_bytes=1024)
    old = reopened.events("old", limit=10_000)
    assert len(old) == 50 and all("blob" not in e["body"] for e in old)


def test_a_bad_record_stored_by_an_older_controller_is_flagged_not_loaded(tmp_path):
    path = tmp_path / "fleet.db"
    Registry(path).close()
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO devices (id, first_seen, last_seen, state, meta, telemetry)"
            " VALUES (?,?,?,?,?,?)",
            [
                ("bad", 1.0, 1.0, "ready", json.dumps({"probe": {"cpu": "a string"}}), "{oops"),
                ("good", 1.0, 1.0, "ready", json.dumps({"pool": "a"}), json.dumps({"temp_c": 5})),
            ],
        )
    registry = Registry(path)
    bad, good = registry.devices["bad"], registry.devices["good"]
    assert bad.meta == {} and bad.telemetry == {} and set(bad.problems) == {"meta", "telemetry"}
    assert good.meta == {"pool": "a"} and good.telemetry == {"temp_c": 5} and not good.problems


def test_a_device_clock_far_off_cannot_dodge_retention_or_skew_the_lag(tmp_path):
    ingest = make_ingest(tmp_path)
    future = time.time() + 10 * 365 * 86400
    ingest.offer("edge/v1/d/telemetry", json.dumps({"ts": future, "decode_tps": 1.0}).encode())
    ingest.offer("edge/v1/d/events", json.dumps({"event": "x", "ts": future}).encode())
    ingest.flush()
    assert ingest.stats.last_age_s < 60
    assert ingest.registry.events("d")[0]["ts"] < time.time() + 1
    assert ingest.registry.prune(now=time.time() + 40 * 86400) >= 2


def test_reserved_ids_and_a_byte_flood_from_many_ids_are_dropped_before_queueing(tmp_path):
    ingest = make_ingest(tmp_path, queue_max_bytes=10_000)
    for word in ("all", "pool", "$SYS", "status"):
        assert not ingest.offer(f"edge/v1/{word}/meta", b'{"probe": {"cpu": "a string"}}')
    assert ingest.stats.dropped["bad_device_id"] == 4
    meta = json.dumps({"pool": "p", "pad": "x" * 3000}).encode()
    accepted = [ingest.offer(f"edge/v1/d{i}/meta", meta) for i in range(10)]
    assert accepted == [True] * 3 + [False] * 7 and ingest.stats.dropped["queue_full"] == 7
    ingest.flush()
    devices = ingest.registry.devices
    assert devices["d2"].meta["pool"] == "p" and not devices["d2"].problems
    assert set(devices) == {f"d{i}" for i in range(10)}  # the dropped ones still get a flagged row
    assert "queue_full" in devices["d9"].problems["meta"] and devices["d9"].meta == {}
    assert ingest.offer("edge/v1/d9/meta", meta)  # the queue emptied with the flush

