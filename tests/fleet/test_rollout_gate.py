"""Health-gated rollouts on a real controller and broker with simulated devices: abort on
evidence (a percentage over at least min_devices, and its rollback), a device that never
passes the gate timing out, and devices joining a dynamic target (not a pinned one).

Time is the rollout manager's clock, moved by the test (tests/support/clock.py): a soak or a
timeout passes in steps of the test, and no assertion is about how long anything took.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.fleet.conftest import wait_for
from tests.fleet.test_api import manifest_for
from tests.support.clock import ManualClock


@pytest.fixture
def clock(fleet) -> ManualClock:
    clock = ManualClock()
    fleet.controller.rollouts.clock = clock
    return clock


@pytest.fixture
def q2(api, ladder_model) -> str:
    """A hosted one-variant manifest (Q2_K), by name."""
    response = api.post(
        "/api/manifests",
        json={"name": "q2.json", "manifest": manifest_for(ladder_model("Q2_K"), "Q2_K")},
    )
    assert response.status_code == 201, response.text
    return "q2.json"


def drive(clock: ManualClock, predicate, *, step_s: float = 1.0, what: str):
    """Move the clock a step at a time until ``predicate`` holds (its value is returned)."""

    def stepped():
        value = predicate()
        if not value:
            clock.advance(step_s)
        return value

    return wait_for(stepped, timeout_s=60, what=what)


def rollout_of(api, rollout_id: str) -> dict:
    return api.get(f"/api/rollouts/{rollout_id}").json()


def finished(api, rollout_id: str, *states: str):
    return lambda: (r := rollout_of(api, rollout_id))["state"] in states and r


def start(api, **spec) -> dict:
    response = api.post("/api/rollouts", json=spec)
    assert response.status_code == 201, response.text
    return response.json()


def all_events(api, rollout_id: str) -> list[dict]:
    return api.get(f"/api/rollouts/{rollout_id}/events", params={"limit": 1000}).json()["events"]


def test_one_failure_among_ten_does_not_abort(api, sim, fleet, clock, q2):
    devices = sim(10)
    devices.devices[0].fail_commands = True  # the first to finish: 100 % of one, alone
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 10, what="10 devices")
    rollout = start(
        api,
        manifest=q2,
        group="sim-*",
        rate_per_min=600,
        abort_percent=20,
        min_devices=5,
        soak_s=60,
    )
    final = drive(
        clock,
        finished(api, rollout["id"], "completed", "aborted", "aborting"),
        what="the rollout to finish",
    )
    assert final["state"] == "completed", final["reason"]
    assert (final["succeeded"], final["failed"]) == (9, 1)
    by_id = {d["device_id"]: d for d in final["devices"]}
    assert by_id["sim-00000"]["state"] == "failed"
    assert by_id["sim-00000"]["error"].startswith("set_manifest failed: fetch_failed")
    assert not by_id["sim-00000"]["switched"]  # nothing to roll back
    decisions = Counter(e["decision"] for e in all_events(api, rollout["id"]))
    assert decisions["success"] == 9 and decisions["failure"] == 1 and "abort" not in decisions
    wait_for(lambda: sum(d.quant == "Q2_K" for d in devices.devices) == 9, what="nine on Q2_K")


def test_three_failures_among_ten_abort_and_roll_back_the_switched(api, sim, fleet, clock, q2):
    devices = sim(10)
    original = {d.id: d.quant for d in devices.devices}
    devices.devices[1].fail_commands = True
    devices.devices[4].fail_commands = True
    devices.devices[7].degraded_after_switch = True  # switches, then fails the health gate
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 10, what="10 devices")
    rollout = start(
        api,
        manifest=q2,
        group="sim-*",
        rate_per_min=600,
        abort_percent=20,
        min_devices=5,
        soak_s=60,
    )
    final = drive(
        clock, finished(api, rollout["id"], "completed", "aborted"), what="the rollout to stop"
    )
    assert final["state"] == "aborted"
    assert "more than abort_percent 20" in final["reason"]
    assert final["failed"] == 3 and final["finished"] >= 5
    by_id = {d["device_id"]: d for d in final["devices"]}
    for device_id in ("sim-00001", "sim-00004"):  # never switched: left as they failed
        assert by_id[device_id]["state"] == "failed" and not by_id[device_id]["switched"]
    degraded = by_id["sim-00007"]
    assert degraded["outcome"] == "failed" and degraded["state"] == "rolled_back"
    switched = [d for d in final["devices"] if d["switched"]]
    assert switched and all(d["state"] == "rolled_back" for d in switched)
    assert all(d["state"] in ("failed", "rolled_back", "skipped") for d in final["devices"])
    # Every device runs what it ran before the rollout.
    wait_for(lambda: {d.id: d.quant for d in devices.devices} == original, what="old quants")
    events = all_events(api, rollout["id"])
    abort = [e for e in events if e["decision"] == "abort"]
    assert len(abort) == 1 and abort[0]["reason"] == final["reason"]
    rolled_back = {e["device_id"] for e in events if e["decision"] == "rolled_back"}
    assert rolled_back == {d["device_id"] for d in switched}
    assert any(
        e["decision"] == "failure" and e["device_id"] == "sim-00007" and "degraded" in e["reason"]
        for e in events
    )


def test_a_device_that_never_becomes_healthy_times_out(api, sim, fleet, clock, q2):
    devices = sim(2)
    devices.devices[1].answer_prompts = False  # switches, reports ready, never answers the canary
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 2, what="2 devices")
    rollout = start(
        api,
        manifest=q2,
        group="sim-*",
        rate_per_min=600,
        abort_percent=50,
        soak_s=30,
        device_timeout_s=300,
    )
    final = drive(
        clock,
        finished(api, rollout["id"], "completed", "aborted"),
        step_s=5,
        what="the rollout to finish",
    )
    assert final["state"] == "completed"
    healthy, stuck = final["devices"]
    assert healthy["state"] == "done" and healthy["outcome"] == "succeeded"
    assert stuck["outcome"] == "failed" and stuck["state"] == "rolled_back"
    timeout = [e for e in all_events(api, rollout["id"]) if e["decision"] == "timeout"]
    assert [e["device_id"] for e in timeout] == [stuck["device_id"]]
    assert "within 300 s" in timeout[0]["reason"] and "canary" in timeout[0]["reason"]


def test_devices_that_join_mid_rollout_are_included_unless_pinned(api, sim, fleet, clock, q2):
    sim(2, id_prefix="store")
    sim(2, id_prefix="kiosk")  # a device is in one active rollout at a time: a set of its own
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 4, what="4 devices")
    common = {"manifest": q2, "rate_per_min": 600, "soak_s": 60}
    dynamic = start(api, **common, group="store*")
    pinned = start(api, **common, group="kiosk*", pinned=True)
    late_kiosk = sim(1, id_prefix="kiosk-late").devices[0]
    wait_for(lambda: api.get(f"/api/devices/{late_kiosk.id}").status_code == 200, what="it")
    late = sim(1, id_prefix="store-late").devices[0]
    # Both rollouts look for joiners in the same ticks; only the dynamic one takes its own.
    wait_for(
        lambda: late.id in {d["device_id"] for d in rollout_of(api, dynamic["id"])["devices"]},
        what="the late device to join the dynamic rollout",
    )
    done = drive(
        clock,
        lambda: all(rollout_of(api, r["id"])["state"] == "completed" for r in (dynamic, pinned)),
        what="both rollouts to complete",
    )
    assert done
    dynamic_final, pinned_final = rollout_of(api, dynamic["id"]), rollout_of(api, pinned["id"])
    assert [d["device_id"] for d in pinned_final["devices"]] == ["kiosk-00000", "kiosk-00001"]
    assert [d["device_id"] for d in dynamic_final["devices"]] == [
        "store-00000",
        "store-00001",
        late.id,
    ]
    assert {d["state"] for d in dynamic_final["devices"]} == {"done"}
    joins = [e for e in all_events(api, dynamic["id"]) if e["decision"] == "join"]
    assert [e["device_id"] for e in joins] == [late.id]
    wait_for(lambda: late.quant == "Q2_K", what="the late device on Q2_K")


def test_pacing_keeps_the_rate_and_max_in_progress(api, sim, fleet, clock, q2):
    sim(4)
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 4, what="4 devices")
    rollout = start(api, manifest=q2, group="sim-*", rate_per_min=10, max_in_progress=2, soak_s=100)

    def started() -> int:
        return sum(1 for d in rollout_of(api, rollout["id"])["devices"] if d["started_at"])

    wait_for(lambda: started() == 1, what="the first start")
    clock.advance(3)  # half an interval at 10/min: no one new
    wait_for(
        lambda: any(d["state"] == "soaking" for d in rollout_of(api, rollout["id"])["devices"]),
        what="the first device soaking",
    )
    assert started() == 1
    clock.advance(3)
    wait_for(lambda: started() == 2, what="the second start, one interval later")
    clock.advance(60)  # ten intervals, but two are in progress already
    wait_for(
        lambda: (
            sum(d["state"] == "soaking" for d in rollout_of(api, rollout["id"])["devices"]) == 2
        ),
        what="both soaking",
    )
    assert started() == 2
    final = drive(
        clock, finished(api, rollout["id"], "completed"), step_s=5, what="the rollout to complete"
    )
    assert {d["state"] for d in final["devices"]} == {"done"}


def test_a_filter_targets_by_inventory_and_a_bad_one_is_refused(api, sim, fleet, clock, q2):
    sim(5)  # boards in turn: three aarch64, then two x86_64
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 5, what="5 devices")
    rollout = start(api, manifest=q2, filter="arch=x86_64 and flag:avx2", soak_s=0)
    assert [d["device_id"] for d in rollout["devices"]] == ["sim-00003", "sim-00004"]
    refused = api.post("/api/rollouts", json={"manifest": q2, "filter": "ram_gib>>4"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "bad_filter"
    nothing = api.post("/api/rollouts", json={"manifest": q2, "filter": "arch=riscv64"})
    assert nothing.status_code == 400 and nothing.json()["error"]["message"].startswith("target")
