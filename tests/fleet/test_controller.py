"""The controller on a real mosquitto with simulated devices: discovery, telemetry, lost, stale."""

from __future__ import annotations

import json
import time

import paho.mqtt.client as paho

from tests.fleet.conftest import BOTH_REGISTRIES, wait_for

pytestmark = BOTH_REGISTRIES


def publish(broker, topic: str, body: dict, retain: bool = True) -> None:
    client = paho.Client(
        callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id="test-publisher"
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, json.dumps(body), qos=1, retain=retain).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_devices_appear_with_meta_and_telemetry(fleet, sim):
    devices = sim(5)
    registry = fleet.controller.registry
    wait_for(
        lambda: len(registry.devices) == 5 and all(r.telemetry for r in registry.snapshot()),
        what="5 devices with telemetry",
    )
    record = registry.devices[devices.devices[0].id]
    assert record.state == "ready"
    assert record.meta["selection"]["quant"] == devices.devices[0].quant
    wait_for(lambda: len(registry.series(record.id)) >= 2, what="telemetry points in SQLite")
    assert fleet.controller.ingest.stats.rejected == 0


def test_a_killed_device_turns_lost_through_its_will(fleet, sim):
    devices = sim(3, own_connection=1)
    registry = fleet.controller.registry
    victim = devices.devices[0].id
    wait_for(
        lambda: registry.devices.get(victim) and registry.devices[victim].state == "ready",
        what="ready",
    )
    devices.kill(victim)
    wait_for(lambda: registry.devices[victim].state == "lost", what="the Will's lost")
    assert registry.devices[devices.devices[1].id].state == "ready"


def test_a_late_will_of_an_older_session_does_not_mark_the_device_lost(fleet, broker):
    registry = fleet.controller.registry
    publish(
        broker,
        "edge/v1/pi-9/status",
        {"state": "ready", "session": 200, "ts": time.time(), "version": "1"},
    )
    wait_for(
        lambda: "pi-9" in registry.devices and registry.devices["pi-9"].session == 200,
        what="session 200",
    )
    publish(
        broker,
        "edge/v1/pi-9/status",
        {"state": "lost", "session": 100, "ts": time.time(), "version": "1"},
    )
    wait_for(
        lambda: fleet.controller.ingest.stats.ignored_stale_status == 1,
        what="the stale lost counted",
    )
    assert registry.devices["pi-9"].state == "ready"


def test_invalid_payloads_are_counted_not_fatal(fleet, broker):
    publish(broker, "edge/v1/pi-8/status", {"state": "exploded"}, retain=False)
    publish(broker, "edge/v1/pi-8/telemetry", {"ts": time.time(), "decode_tps": 3}, retain=False)
    registry = fleet.controller.registry
    wait_for(lambda: "pi-8" in registry.devices, what="the valid telemetry")
    assert fleet.controller.ingest.stats.rejected == 1
    assert registry.devices["pi-8"].state is None


def test_a_silent_device_shows_stale(fleet, sim, api):
    devices = sim(2, interval_s=0.3)
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 2, what="2 devices")
    devices._stop.set()  # telemetry stops without any status: a device that froze
    wait_for(
        lambda: api.get("/api/devices").json()["summary"]["counts"]["stale"] == 2,
        timeout_s=10,
        what="both devices stale",
    )
