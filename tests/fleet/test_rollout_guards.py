"""What keeps a rollout from doing harm it was not asked to: a controller whose lease another
took writes nothing and starts no one, a device is in one active rollout at a time, and a
canary reply that does not decode fails its device instead of passing it or stopping the
rollouts. Real broker, real controller (FleetService), simulated devices; time is the rollout
manager's clock, moved by the test (tests/support/clock.py).
"""

from __future__ import annotations

import pytest

from agent.fleet.rollout import RolloutManager
from tests.fleet import test_rollout_gate as gate
from tests.fleet.conftest import make_config, wait_for
from tests.fleet.test_rollout_gate import drive, rollout_of, start

clock, q2 = gate.clock, gate.q2  # its fixtures: the manager's clock, a hosted manifest

LONG_LEASE_S = 600.0  # renewed on its own every lease_s / 4: not within the test


@pytest.fixture
def fleet_config(tmp_path, broker):
    return make_config(tmp_path, broker, rollout_lease_s=LONG_LEASE_S)


def states(api, rollout_id: str) -> dict[str, str]:
    return {d["device_id"]: d["state"] for d in rollout_of(api, rollout_id)["devices"]}


def test_a_controller_whose_lease_was_taken_writes_nothing_and_starts_no_one(
    api, sim, fleet, clock, q2
):
    sim(3)
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 3, what="3 devices")
    rollout_id = start(api, manifest=q2, group="sim-*", rate_per_min=1, soak_s=300)["id"]
    wait_for(lambda: states(api, rollout_id)["sim-00000"] != "pending", what="the first start")
    registry, driver = fleet.controller.registry, fleet.controller.rollouts
    # Another controller on the same registry is asked for a rollback: it forces the lease.
    other = RolloutManager(fleet.controller, lease_s=LONG_LEASE_S, clock=clock)
    other.owner = "ctl-other"
    other.restore()
    other.rollback(rollout_id)
    stored = registry.rollout_rows(rollout_id)[0][0]
    assert (stored["state"], stored["lease_owner"]) == ("rolling_back", "ctl-other")
    last_event = registry.rollout_events(rollout_id)[-1]["id"]

    clock.advance(120)  # the next two devices are due, by the first driver's copy
    driver.tick()
    driver.tick()

    stored = registry.rollout_rows(rollout_id)[0]
    assert stored[0]["state"] == "rolling_back"
    assert {s["device_id"]: s["state"] for s in stored[1]}["sim-00001"] == "skipped"
    assert registry.rollout_events(rollout_id, after_id=last_event) == []
    assert registry.commands("sim-00001") == [] and registry.commands("sim-00002") == []
    assert driver.get(rollout_id).state == "rolling_back"  # the registry's copy, not its own


def test_a_device_in_an_active_rollout_is_refused_by_another(api, sim, fleet, clock, q2):
    sim(2)
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 2, what="2 devices")
    first = start(api, manifest=q2, group="sim-*", rate_per_min=1, soak_s=300)
    refused = api.post(
        "/api/rollouts", json={"manifest": q2, "devices": ["sim-00001"], "soak_s": 0}
    )
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "in_rollout" and "sim-00001" in error["message"]
    assert [r["id"] for r in api.get("/api/rollouts").json()["rollouts"]] == [first["id"]]


def test_a_device_busy_in_another_rollout_does_not_join(api, sim, fleet, clock, q2):
    devices = sim(3)
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 3, what="3 devices")
    busy, first_blue, late_blue = devices.devices

    def turn_blue(device) -> None:
        device.pool = "blue"
        devices.publish_meta(device)
        wait_for(
            lambda: api.get(f"/api/devices/{device.id}").json()["row"]["pool"] == "blue",
            what=f"{device.id} in pool blue",
        )

    elsewhere = start(api, manifest=q2, devices=[busy.id], soak_s=300)
    wait_for(lambda: states(api, elsewhere["id"])[busy.id] != "pending", what="its start")
    turn_blue(first_blue)
    blue = start(api, manifest=q2, pool="blue", rate_per_min=600, soak_s=300)
    turn_blue(busy)
    turn_blue(late_blue)  # after the busy one: the check that admits it sees both blue
    wait_for(lambda: late_blue.id in states(api, blue["id"]), what="the late device to join")
    assert busy.id not in states(api, blue["id"])
    assert states(api, elsewhere["id"])[busy.id] != "pending"


@pytest.mark.parametrize(
    "final_reply",
    [{"done": True, "error": "boom"}, {"done": True, "usage": "x"}],
    ids=["error-not-an-object", "usage-not-an-object"],
)
def test_a_canary_reply_that_does_not_decode_fails_the_device(
    api, sim, fleet, clock, q2, final_reply
):
    devices = sim(2)
    broken, sound = devices.devices
    broken.final_reply = final_reply
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 2, what="2 devices")
    # Each in its own rollout: the broken one's must not stop the other's.
    bad = start(api, manifest=q2, devices=[broken.id], soak_s=0, device_timeout_s=600)
    good = start(api, manifest=q2, devices=[sound.id], soak_s=0, device_timeout_s=600)
    final = drive(
        clock,
        lambda: (r := rollout_of(api, bad["id"]))["state"] in ("completed", "aborted") and r,
        what="the broken device's rollout to finish",
    )
    step = final["devices"][0]
    assert step["state"] in ("failed", "rolled_back") and step["outcome"] == "failed"
    assert step["error"].startswith("the canary reply is malformed")
    drive(
        clock,
        lambda: rollout_of(api, good["id"])["state"] == "completed",
        what="the sound device's rollout to complete",
    )
    assert states(api, good["id"]) == {sound.id: "done"}
