"""Shared-subscription pools through the daemon: two real agents with the same ``mqtt.pool``
on a real Mosquitto share the pool's prompts, and when one is killed the other answers all."""

from __future__ import annotations

import json
import signal
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.support.daemon import RunningDaemon, wait_ready
from tests.support.observer import Observers

POOL = "testpool"
POOL_TOPIC = f"edge/v1/pool/{POOL}/prompt"
DEVICES = ("pool-a", "pool-b")
PROMPTS = 24


def ask(observer, n: int, tag: str) -> list[str]:
    """Publish ``n`` pool prompts without a reply topic: each is answered on the answering
    device's own ``reply/<id>``, which tells who answered it."""
    ids = [f"{tag}-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    for request_id in ids:
        observer.publish(POOL_TOPIC, json.dumps({"id": request_id, "prompt": "Count: one, two,",
                                                 "max_tokens": 2, "temperature": 0, "seed": 1,
                                                 "stream": False}).encode())
    return ids


def answers(observer, ids: list[str], timeout: float = 120) -> dict[str, list[str]]:
    """Wait until every id has a final; map id -> devices that sent a final for it."""
    wanted = set(ids)

    def finals() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for message in list(observer.messages):
            parts = message.topic.split("/")  # edge/v1/<device>/reply/<id>
            if len(parts) == 5 and parts[3] == "reply" and parts[4] in wanted:
                body = json.loads(message.payload)
                if body.get("done"):
                    assert "error" not in body, body
                    found.setdefault(parts[4], []).append(parts[2])
        return found

    observer.wait_for(lambda m: wanted <= finals().keys(), timeout)
    return finals()


@pytest.mark.slow
def test_pool_prompts_are_shared_and_survive_a_killed_agent(tmp_path: Path, broker, ladder_dir):
    agents = {device: RunningDaemon(tmp_path / device, broker, ladder_dir, device_id=device,
                                    mqtt={"pool": POOL}) for device in DEVICES}
    observers = Observers(broker)
    try:
        for agent in agents.values():
            agent.start()
        for agent in agents.values():
            wait_ready(agent)
        observer = observers.connect("edge/v1/+/reply/+", "edge/v1/+/status")
        # Both subscriptions are in place once each agent's retained meta is out after READY;
        # a round trip through each agent's own prompt topic proves it is subscribed and serving.
        for device in DEVICES:
            request_id = f"warm-{device}"
            observer.publish(f"edge/v1/{device}/prompt", json.dumps(
                {"id": request_id, "prompt": "Hi", "max_tokens": 1, "stream": False}).encode())
            observer.wait_for(lambda m, d=device, r=request_id: m.topic == f"edge/v1/{d}/reply/{r}")

        shared = answers(observer, ask(observer, PROMPTS, "shared"))
        assert all(len(devices) == 1 for devices in shared.values()), shared  # each answered once
        per_device = Counter(devices[0] for devices in shared.values())
        assert set(per_device) == set(DEVICES), per_device
        # A fair share, not an exact split: the broker may deliver a few more to one of them.
        assert min(per_device.values()) >= PROMPTS // 4, per_device

        killed, survivor = agents[DEVICES[1]], DEVICES[0]
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(10)
        # The broker has dropped the dead connection once it publishes that agent's Will.
        observer.wait_for(lambda m: m.topic == f"edge/v1/{DEVICES[1]}/status"
                          and json.loads(m.payload)["state"] == "lost", timeout=30)

        after = answers(observer, ask(observer, PROMPTS, "after-kill"))
        assert {devices[0] for devices in after.values()} == {survivor}, after
        assert all(len(devices) == 1 for devices in after.values()), after
    finally:
        observers.close()
        for agent in agents.values():
            agent.close()
