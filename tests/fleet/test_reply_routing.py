"""Replies go only to the controller that asked: two real controllers on one real Mosquitto
and one real agent. Each asks for its replies in its own inbox (MQTT 5 Response Topic +
Correlation Data) and subscribes to nothing else, so each receives its own replies, once, and
none of the other's. Before, every controller subscribed to ``edge/v1/+/reply/+`` and received
every reply of the fleet."""

from __future__ import annotations

import queue
import uuid

import pytest

from agent.fleet.controller import FleetController
from tests.fleet.conftest import make_config, wait_for
from tests.support.daemon import RunningDaemon, wait_ready
from tests.support.observer import Observers

DEVICE = "dev-reply"
PROMPTS = 3


@pytest.fixture(scope="module")
def agent(tmp_path_factory, module_broker, ladder_dir):
    running = RunningDaemon(tmp_path_factory.mktemp("agent"), module_broker, ladder_dir,
                            device_id=DEVICE).start()
    wait_ready(running)
    yield running
    running.close()


@pytest.fixture
def controllers(tmp_path, module_broker, agent):
    started = []
    for name in ("ctl-a", "ctl-b"):
        config = make_config(tmp_path / name, module_broker, controller_id=name)
        (tmp_path / name).mkdir()
        controller = FleetController(config).start()
        assert controller.mqtt.wait_connected(10)
        started.append(controller)
    yield started
    for controller in started:
        controller.stop()


def ask(controller: FleetController, request_id: str, *, stream: bool) -> list[dict]:
    """Send one prompt to the agent and return every record its waiter received."""
    records: queue.Queue[dict] = queue.Queue()
    sent = controller.send_prompt(DEVICE, {"id": request_id, "prompt": "Count: one, two,",
                                           "max_tokens": 4, "temperature": 0, "seed": 1,
                                           "stream": stream}, records.put)
    got = []
    try:
        while not got or not got[-1].get("done"):
            got.append(records.get(timeout=60))
    finally:
        controller.remove_waiter(sent.key)
    return got


def test_each_controller_receives_only_the_replies_it_asked_for(controllers, module_broker):
    first, second = controllers
    everything = Observers(module_broker)
    seen = everything.connect("edge/v1/reply/#")
    try:
        wait_for(lambda: DEVICE in first.registry.devices and DEVICE in second.registry.devices,
                 30, "both controllers to learn the device")
        asked: dict[str, list[list[dict]]] = {"ctl-a": [], "ctl-b": []}
        for index in range(PROMPTS):
            for controller in (first, second):
                stream = index % 2 == 0
                records = ask(controller, f"{controller.config.controller_id}-{index}-"
                                          f"{uuid.uuid4().hex[:6]}", stream=stream)
                assert "usage" in records[-1] and "error" not in records[-1], records[-1]
                assert all(r["id"] == records[-1]["id"] for r in records)
                asked[controller.config.controller_id].append(records)
        for controller in (first, second):
            name = controller.config.controller_id
            own = sum(len(records) for records in asked[name])
            # Every message that reached the controller's inbox was one of its own records.
            wait_for(lambda: controller.reply_counts["delivered"] >= own, 10, "the last records")
            assert controller.reply_counts == {"delivered": own, "unmatched": 0}

            def inbox() -> list:
                return [m for m in seen.messages if m.topic.startswith(f"edge/v1/reply/{name}/")]

            # The broker carried each record once, to this inbox.
            wait_for(lambda: len(inbox()) >= own, 10, "the observer to see the last records")
            assert len(inbox()) == own
    finally:
        everything.close()
