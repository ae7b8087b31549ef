"""The shipped broker example (systemd/mosquitto/): a real mosquitto with its TLS listener,
password file and ACL keeps each device inside its own topics."""

from __future__ import annotations

import json

NOT_AUTHORIZED = 0x87


def test_device_reads_its_own_prompts_and_cmds_and_the_controller_sees_its_traffic(connect_as) -> None:
    device = connect_as("dev-a")
    controller = connect_as("controller")
    assert device.connect_reason == 0 and controller.connect_reason == 0
    assert not device.subscribe("edge/v1/dev-a/prompt").is_failure
    assert not device.subscribe("edge/v1/dev-a/cmd").is_failure
    assert not controller.subscribe("edge/v1/#").is_failure

    prompt = json.dumps({"id": "p1", "prompt": "hi"})
    assert controller.publish("edge/v1/dev-a/prompt", prompt) == 0
    assert controller.publish("edge/v1/dev-a/cmd", json.dumps({"id": "c1", "op": "drain"})) == 0
    got = device.received()
    assert ("edge/v1/dev-a/prompt", prompt) in got
    assert any(topic == "edge/v1/dev-a/cmd" for topic, _ in got)

    # Everything the device publishes under its own prefix reaches the controller.
    for suffix in ("status", "telemetry", "reply/p1", "cmd/result"):
        assert device.publish(f"edge/v1/dev-a/{suffix}", "{}") == 0
    seen = {topic for topic, _ in controller.received()}
    assert {f"edge/v1/dev-a/{s}" for s in ("status", "telemetry", "reply/p1", "cmd/result")} <= seen


def test_device_cannot_publish_into_another_devices_topics(connect_as) -> None:
    intruder = connect_as("dev-a")
    victim = connect_as("dev-b")
    controller = connect_as("controller")
    assert not victim.subscribe("edge/v1/dev-b/prompt").is_failure
    assert not controller.subscribe("edge/v1/#").is_failure

    for topic in ("edge/v1/dev-b/prompt", "edge/v1/dev-b/cmd", "edge/v1/dev-b/status",
                  "edge/v1/dev-b/reply/x", "edge/v1/all/cmd", "edge/v1/pool/p1/prompt"):
        assert intruder.publish(topic, '{"id": "evil"}') == NOT_AUTHORIZED, topic
    assert victim.received() == []
    assert [t for t, _ in controller.received(within_s=0.5) if "evil" in _] == []
    # A forged retained status is not stored either: a late subscriber sees none.
    late = connect_as("controller")
    assert not late.subscribe("edge/v1/dev-b/status").is_failure
    assert late.received(within_s=0.5) == []


def test_device_cannot_read_another_devices_prompts(connect_as) -> None:
    snooper = connect_as("dev-a")
    controller = connect_as("controller")
    # mosquitto 2.0 grants these SUBACKs and checks read access on every delivery, so the
    # proof is what arrives: of all these, only the device's own prompt.
    for topic in ("edge/v1/dev-b/prompt", "edge/v1/dev-b/cmd", "edge/v1/+/prompt", "edge/v1/#"):
        snooper.subscribe(topic)
    assert controller.publish("edge/v1/dev-b/prompt", '{"id": "for-b"}') == 0
    assert controller.publish("edge/v1/dev-b/cmd", '{"id": "cmd-b", "op": "drain"}') == 0
    assert controller.publish("edge/v1/dev-a/prompt", '{"id": "for-a"}') == 0
    got = snooper.received()
    assert got and all(topic == "edge/v1/dev-a/prompt" for topic, _ in got), got
    assert all("for-a" in payload for _, payload in got)


def test_pool_and_broadcast_reach_devices_and_only_the_controller_sends_them(connect_as) -> None:
    device = connect_as("dev-a")
    controller = connect_as("controller")
    assert not device.subscribe("$share/p1/edge/v1/pool/p1/prompt").is_failure
    assert not device.subscribe("edge/v1/all/cmd").is_failure
    assert controller.publish("edge/v1/pool/p1/prompt", '{"id": "pool"}') == 0
    assert controller.publish("edge/v1/all/cmd", '{"id": "all", "op": "rebirth"}') == 0
    topics = [topic for topic, _ in device.received()]
    assert sorted(topics) == ["edge/v1/all/cmd", "edge/v1/pool/p1/prompt"]
    # The controller writes prompts and commands, never a device's state.
    assert controller.publish("edge/v1/dev-a/status", '{"state": "ready"}') == NOT_AUTHORIZED


def test_wrong_password_and_anonymous_are_refused(connect_as) -> None:
    assert connect_as("dev-a", "not-the-password").connect_reason.is_failure
    assert connect_as(None).connect_reason.is_failure


def test_plain_listener_serves_the_controller_on_loopback(connect_as) -> None:
    controller = connect_as("controller", tls=False)
    assert controller.connect_reason == 0
    assert not controller.subscribe("edge/v1/#").is_failure
