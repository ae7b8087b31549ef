"""Broker faults: mosquitto killed and restarted 10 times while 200 prompts are in flight.

The client is an ordinary at-least-once MQTT client: QoS 1, a persistent session, and a
re-send of any prompt still unanswered after a while. The daemon must answer every prompt
and generate each one exactly once (duplicates are answered from its idempotency record).
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.broker import Broker
from tests.support.daemon import BASE, RunningDaemon, wait_ready

PROMPTS = 200
RESTARTS = 10


class PromptClient:
    """At-least-once client: persistent session, re-subscribes on every connect."""

    def __init__(self, broker: Broker) -> None:
        self.finals: dict[str, list[dict]] = {}
        self.telemetry: list[dict] = []
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"user-{uuid.uuid4().hex[:6]}",
                                  protocol=paho.MQTTv5)
        self.client.max_queued_messages_set(0)  # unbounded: nothing dropped while the broker is away
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = 600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=session)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe(f"{BASE}/reply/+", 1)
        client.subscribe(f"{BASE}/telemetry", 0)

    def _on_message(self, client, userdata, message) -> None:
        body = json.loads(message.payload)
        with self.lock:
            if message.topic.endswith("/telemetry"):
                self.telemetry.append(body)
            elif body.get("done"):
                self.finals.setdefault(body["id"], []).append(body)

    def send(self, prompt_id: str) -> None:
        payload = json.dumps({"id": prompt_id, "prompt": f"Count to three ({prompt_id}):",
                              "max_tokens": 4, "temperature": 0.0, "seed": 1})
        self.client.publish(f"{BASE}/prompt", payload, qos=1)  # queued by paho while disconnected

    def unanswered(self, ids: list[str]) -> list[str]:
        with self.lock:
            return [i for i in ids if i not in self.finals]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.slow
def test_broker_killed_and_restarted_during_200_prompts(tmp_path, ladder_dir, fault_report) -> None:
    broker = Broker(tmp_path / "broker").start()
    daemon = RunningDaemon(tmp_path / "daemon", broker, ladder_dir, model={"pin": "Q2_K"},
                           runtime={"default_max_tokens": 4, "queue_size": 256},
                           telemetry={"interval_s": 1.0}).start()
    client = None
    try:
        wait_ready(daemon)
        client = PromptClient(broker)
        rng = random.Random(7)
        ids = [f"p{i:03d}" for i in range(PROMPTS)]

        restarts = 0

        def restart_broker() -> None:
            nonlocal restarts
            for n in range(RESTARTS):
                time.sleep(rng.uniform(0.5, 1.5))
                broker.stop(kill=n % 2 == 0)  # half SIGKILL (no goodbye), half SIGTERM
                time.sleep(rng.uniform(0.1, 0.8))
                broker.start()
                restarts += 1

        restarter = threading.Thread(target=restart_broker)
        restarter.start()
        for prompt_id in ids:
            client.send(prompt_id)
            time.sleep(0.05)
        restarter.join()

        resends = 0
        deadline = time.monotonic() + 300
        while (missing := client.unanswered(ids)) and time.monotonic() < deadline:
            time.sleep(10)
            for prompt_id in client.unanswered(ids):  # at-least-once: ask again
                client.send(prompt_id)
                resends += 1
        missing = client.unanswered(ids)

        # Exactly once: every final of one id is the same record, and the daemon generated
        # exactly one completion per id (its own counter, from telemetry).
        for prompt_id, finals in client.finals.items():
            assert all(f == finals[0] for f in finals), f"{prompt_id} answered differently twice"
            assert "error" not in finals[0], finals[0]
        time.sleep(2.5)
        with client.lock:
            generated = client.telemetry[-1]["requests_ok"]
        fault_report("broker killed and restarted during prompts", prompts=len(ids),
                     broker_restarts=restarts, answered=len(ids) - len(missing),
                     answered_ok=sum("error" not in f[0] for f in client.finals.values()),
                     no_final=len(missing), resends=resends, generated=generated)
        assert not missing, f"never answered: {missing}"
        assert generated == PROMPTS
    finally:
        if client:
            client.close()
        daemon.close()
        broker.stop()
