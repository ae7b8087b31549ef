"""Home Assistant discovery: with it on, the daemon publishes retained sensor configs whose
templates read fields the device really publishes on the topics they name."""

from __future__ import annotations

import json
import re

from tests.support.daemon import BASE, RunningDaemon, wait_ready
from tests.support.observer import Observer


def field_path(template: str) -> list[str]:
    return re.search(r"value_json\.([\w.]+)", template).group(1).split(".")


def test_discovery_sensors_read_real_fields(tmp_path, broker, ladder_dir) -> None:
    daemon = RunningDaemon(tmp_path / "daemon", broker, ladder_dir, model={"pin": "Q2_K"},
                           home_assistant={"enabled": True}, telemetry={"interval_s": 1.0}).start()
    observer = Observer(broker.host, broker.port)
    try:
        wait_ready(daemon)
        observer.subscribe("homeassistant/#")
        for topic in (f"{BASE}/telemetry", f"{BASE}/meta", f"{BASE}/status"):
            observer.subscribe(topic)
        # Every state topic has a message: a retained one arrives just after its SUBACK, so
        # a telemetry message can come first.
        observer.wait_for(lambda m: all(observer.on(f"{BASE}/{kind}")
                                        for kind in ("telemetry", "meta", "status")), 30)
        configs = [m for m in observer.messages if m.topic.startswith("homeassistant/sensor/")]
        assert {m.topic.rsplit("/", 2)[1] for m in configs} == {"decode_tokens_per_s", "state", "model"}
        assert all(m.retain for m in configs)
        for message in configs:
            config = json.loads(message.payload)
            assert config["availability_topic"] == f"{BASE}/status"
            payload = json.loads(observer.on(config["state_topic"])[-1].payload)
            for template in re.findall(r"value_json\.[\w.]+", config["value_template"]):
                value = payload
                for key in field_path(template):
                    assert key in value, f"{message.topic}: {template} is not in {config['state_topic']}"
                    value = value[key]
    finally:
        observer.close()
        daemon.close()
