"""Home Assistant MQTT discovery: retained config messages that make a device's tokens/s,
state and model appear as sensors. Pure: returns (topic, payload) pairs, publishes nothing.

Off by default (``home_assistant.enabled``). The sensors read the device's own ``status``,
``telemetry`` and ``meta`` topics; availability follows the retained ``status`` (``lost`` and
``stopped`` mean offline), so no extra topic is published.
"""

from __future__ import annotations

from typing import Any

from agent.mqtt.topics import DeviceTopics

_ONLINE_TEMPLATE = (
    "{{ 'online' if value_json.state in ['ready', 'busy', 'degraded', 'draining', 'starting'] "
    "else 'offline' }}"
)


def node_name(device_id: str) -> str:
    """The Home Assistant node id of a device: ``-`` and ``.`` are not allowed in one."""
    return device_id.replace("-", "_").replace(".", "_")


def discovery_messages(
    topics: DeviceTopics, *, discovery_prefix: str, version: str
) -> list[tuple[str, dict[str, Any]]]:
    """The retained discovery configs for one device, as (topic, payload) pairs."""
    node = node_name(topics.device_id)
    device = {
        "identifiers": [f"edge_agent_{node}"],
        "name": f"edge-agent {topics.device_id}",
        "manufacturer": "edge-agent",
        "sw_version": version,
    }
    common = {
        "device": device,
        "availability_topic": topics.status,
        "availability_template": _ONLINE_TEMPLATE,
    }
    sensors = {
        "decode_tokens_per_s": {
            "name": "Decode tokens/s",
            "state_topic": topics.telemetry,
            "value_template": "{{ value_json.decode_tps }}",
            "unit_of_measurement": "tok/s",
            "state_class": "measurement",
        },
        "state": {
            "name": "State",
            "state_topic": topics.status,
            "value_template": "{{ value_json.state }}",
        },
        "model": {
            "name": "Model",
            "state_topic": topics.meta,
            "value_template": "{{ value_json.selection.model_id }} {{ value_json.selection.quant }}",
        },
    }
    return [
        (
            f"{discovery_prefix}/sensor/{node}/{key}/config",
            {**common, **fields, "unique_id": f"edge_agent_{node}_{key}", "object_id": f"edge_agent_{node}_{key}"},
        )
        for key, fields in sensors.items()
    ]
