"""A controller restarted mid-rollout resumes it where it was: a device mid-soak finishes its
soak from the time stored with it (not from the restart), a device that was waiting for its
canary's answer (which went to the old process) gets a new canary and passes, and no device
is started twice. Real broker, real controller processes' code (FleetService) on one SQLite
registry, simulated devices; time is the rollout manager's clock, moved by the test.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from agent.fleet.service import FleetService
from tests.fleet.conftest import wait_for
from tests.fleet.test_api import manifest_for
from tests.support.clock import ManualClock

SOAK_S = 100.0


def started(config, clock: ManualClock) -> FleetService:
    service = FleetService(config)
    service.controller.rollouts.clock = clock  # before its thread's first tick
    service.start()
    assert service.controller.mqtt.wait_connected(10)
    return service


def test_a_restarted_controller_resumes_mid_soak_and_mid_canary(
    fleet_config, sim, credentials, ladder_model
):
    clock = ManualClock()
    devices = sim(3)
    soaker, waiter, last = devices.devices
    waiter.answer_prompts = False  # its canary goes unanswered until after the restart
    headers = {"Authorization": f"Bearer {credentials.token}"}
    service = started(fleet_config, clock)
    try:
        with httpx.Client(base_url=service.url, headers=headers, timeout=30) as api:
            wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 3, what="devices")
            api.post(
                "/api/manifests",
                json={"name": "q2.json", "manifest": manifest_for(ladder_model("Q2_K"), "Q2_K")},
            )
            rollout_id = api.post(
                "/api/rollouts",
                json={
                    "manifest": "q2.json",
                    "group": "sim-*",
                    "rate_per_min": 600,
                    "max_in_progress": 2,
                    "soak_s": SOAK_S,
                    "device_timeout_s": 600,
                },
            ).json()["id"]

            def states() -> dict[str, str]:
                found = api.get(f"/api/rollouts/{rollout_id}").json()
                return {d["device_id"]: d["state"] for d in found["devices"]}

            wanted = {soaker.id: "soaking", waiter.id: "canary", last.id: "pending"}

            def stepped() -> bool:
                if states() == wanted:
                    return True
                clock.advance(1)
                return False

            wait_for(stepped, what="one device soaking, one waiting for its canary, one pending")
            soak_started = next(
                d
                for d in api.get(f"/api/rollouts/{rollout_id}").json()["devices"]
                if d["device_id"] == soaker.id
            )["since"]
            clock.advance(soak_started + SOAK_S - 10 - clock())  # ten seconds of soak left
            wait_for(lambda: states()[soaker.id] == "soaking", what="still soaking")
    finally:
        service.stop()

    waiter.answer_prompts = True
    service = started(fleet_config, clock)  # same registry, a new process's worth of state
    try:
        with httpx.Client(base_url=service.url, headers=headers, timeout=30) as api:
            # The waiter's canary is sent again by the new controller, and answered.
            wait_for(lambda: states()[waiter.id] == "soaking", what="the waiter past its canary")
            clock.advance(10 + 1e-3)  # what was left of the soaker's soak
            wait_for(lambda: states()[soaker.id] == "done", what="the soaker done")
            final = None

            def completed():
                nonlocal final
                final = api.get(f"/api/rollouts/{rollout_id}").json()
                if final["state"] != "completed":
                    clock.advance(5)
                return final["state"] == "completed"

            wait_for(completed, timeout_s=60, what="the rollout completed")
            events = api.get(f"/api/rollouts/{rollout_id}/events", params={"limit": 1000}).json()[
                "events"
            ]
    finally:
        service.stop()
    assert {d["state"] for d in final["devices"]} == {"done"}
    success = {e["device_id"]: e["ts"] for e in events if e["decision"] == "success"}
    # The soak counted across the restart, from when it began.
    assert success[soaker.id] - soak_started == pytest.approx(SOAK_S, abs=0.01)
    assert Counter(e["device_id"] for e in events if e["decision"] == "start") == {
        d.id: 1 for d in devices.devices
    }
    assert any(e["decision"] == "resume" for e in events)
    canaries = [e for e in events if e["decision"] == "canary"]
    assert sorted(e["device_id"] for e in canaries) == sorted(d.id for d in devices.devices)
