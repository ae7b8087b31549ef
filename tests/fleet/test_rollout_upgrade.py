"""Rollouts of kind ``upgrade``: what the kind sends and calls healthy (pure, on device
records), and what the controller's API accepts. A real agent moved by one, and rolled back
by itself, is tests/service/test_container.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.fleet.registry import DeviceRecord
from agent.fleet.rollout import KINDS, AgentWheelRef, RolloutSpec
from tests.fleet.conftest import wait_for
from tests.fleet.test_wheelhouse import make_wheel

KIND = KINDS["upgrade"]
WHEELS = {version: AgentWheelRef(url=f"http://ctl/files/wheels/agent/{version}/w.whl",
                                 sha256=digit * 64, size=1000)
          for version, digit in (("0.1.0", "1"), ("0.2.0", "2"))}
SPEC = RolloutSpec(kind="upgrade", version="0.2.0", wheels=WHEELS, devices=["dev-1"])


def record(state: str | None, version: str | None) -> DeviceRecord:
    return DeviceRecord(id="dev-1", first_seen=0.0, last_seen=0.0, state=state,
                        agent_version=version)


def test_devices_are_sent_the_upgrade_op_with_the_hosted_wheel() -> None:
    assert KIND.start_commands(SPEC, "") == [("upgrade", {
        "version": "0.2.0", "url": WHEELS["0.2.0"].url, "sha256": "2" * 64, "size": 1000})]


@pytest.mark.parametrize("state, version, serving", [
    ("ready", "0.2.0", True),
    ("busy", "0.2.0", True),
    ("ready", "0.1.0", False),  # still, or again (rolled back by itself), the old version
    ("stopped", "0.2.0", False),  # the restart passes through stopped and starting
    ("starting", "0.2.0", False),
    (None, None, False),
])
def test_serving_is_ready_at_the_rollouts_version(state, version, serving) -> None:
    expect = KIND.expectations(SPEC, "")
    assert KIND.serving(expect, record(state, version))[0] is serving


def test_a_device_is_rolled_back_to_the_version_it_ran_when_that_one_is_hosted() -> None:
    previous = KIND.previous_of(record("ready", "0.1.0"))
    assert KIND.rollback_commands(SPEC, previous) == [("upgrade", {
        "version": "0.1.0", "url": WHEELS["0.1.0"].url, "sha256": "1" * 64, "size": 1000})]
    assert KIND.rollback_commands(SPEC, KIND.previous_of(record("ready", "0.0.1"))) is None


def test_the_restart_is_not_a_failure_but_the_devices_own_rollback_is() -> None:
    assert not {"stopped", "starting", "lost"} & KIND.fatal_states
    assert "agent_rolled_back" in KIND.fatal_events


def test_an_upgrade_rollout_of_a_version_the_controller_does_not_host_is_refused(api) -> None:
    response = api.post("/api/rollouts", json={"kind": "upgrade", "version": "9.9.9",
                                               "devices": ["dev-1"]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith("version: ")


def test_an_upgrade_rollout_sends_the_wheel_the_wheelhouse_hosts(api, fleet, sim,
                                                                  tmp_path: Path) -> None:
    device = sim(1).devices[0].id
    wait_for(lambda: api.get(f"/api/devices/{device}").status_code == 200, what="the device")
    wheel = make_wheel(tmp_path / "edge_agent-0.2.0-py3-none-any.whl", "edge-agent", "0.2.0")
    assert api.put(f"/api/wheels/{wheel.name}", content=wheel.read_bytes()).status_code == 201
    hosted = api.get("/api/wheels").json()["agent"][0]
    # What a client says about the wheels is replaced by what the controller hosts.
    response = api.post("/api/rollouts", json={
        "kind": "upgrade", "version": "0.2.0", "devices": [device],
        "wheels": {"0.2.0": {"url": "http://elsewhere/evil.whl", "sha256": "0" * 64, "size": 1}}})
    assert response.status_code == 201, response.text
    assert response.json()["kind"] == "upgrade"
    sent = wait_for(lambda: fleet.controller.registry.commands(device), what="the upgrade sent")
    assert sent[0]["op"] == "upgrade"
    assert sent[0]["args"] == {"version": "0.2.0", "sha256": hosted["sha256"], "size": hosted["size"],
                               "url": f"{fleet.url}/files/wheels/{hosted['path']}"}
    refused = api.post("/api/rollouts", json={"kind": "upgrade", "version": "0.2.0",
                                              "manifest": "q2.json", "devices": [device]})
    assert refused.status_code == 400 and refused.json()["error"]["message"].startswith("kind: ")
