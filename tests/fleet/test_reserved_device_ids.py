"""Finding 2 of issue 10, on the controller: a device id that is a topic word of the contract
(`all`, `pool`, `cmd`, …) is never learned from its topics, and the API never addresses one, so
a call for "device all" cannot become the fleet-wide broadcast `edge/v1/all/cmd`. A real
controller (MQTT + HTTP) on a real mosquitto without an ACL; the reports are raw MQTT."""

from __future__ import annotations

import json
import time

from tests.fleet.conftest import wait_for
from tests.support.observer import Observers

WORDS = ("all", "pool", "cmd", "status", "reply", "$evil")


def test_reserved_ids_are_not_learned_and_not_addressed(api, sim, broker):
    observers = Observers(broker)
    try:
        fake = observers.connect("edge/v1/all/cmd", "edge/v1/+/cmd")
        for word in WORDS:
            status = {"state": "ready", "session": 1, "ts": time.time(), "version": "1"}
            fake.publish(f"edge/v1/{word}/status", json.dumps(status).encode())
            fake.publish(f"edge/v1/{word}/meta", json.dumps({"device_id": word}).encode())
        # A real (simulated) device reporting after them is the sign the controller read them all.
        device = sim(1).devices[0].id
        wait_for(lambda: device in {row["id"] for row in api.get("/api/devices").json()["devices"]},
                 what="the simulated device")
        listed = {row["id"] for row in api.get("/api/devices").json()["devices"]}
        assert listed.isdisjoint(WORDS), listed
        for word in WORDS[:3]:
            response = api.post(f"/api/devices/{word}/cmd", json={"op": "drain", "wait_s": 0})
            assert response.status_code in (400, 404), (word, response.status_code, response.text)
            assert "error" in response.json()
        # One connection publishes in order: once a real device's command arrives, any command
        # the calls above had published would have arrived before it.
        assert api.post(f"/api/devices/{device}/cmd", json={"op": "resume", "wait_s": 0}).is_success
        fake.wait_for(lambda m: m.topic == f"edge/v1/{device}/cmd")
        assert [m.topic for m in fake.messages] == [f"edge/v1/{device}/cmd"]
    finally:
        observers.close()
