"""The shipped broker example (systemd/mosquitto/): a real mosquitto with its TLS listener,
password file and ACL keeps each device inside its own topics."""

from __future__ import annotations

import json

import pytest

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


def test_broadcast_reaches_devices_and_only_the_controller_sends_it(connect_as) -> None:
    device = connect_as("dev-a")
    controller = connect_as("controller")
    assert not device.subscribe("edge/v1/all/cmd").is_failure
    assert controller.publish("edge/v1/all/cmd", '{"id": "all", "op": "rebirth"}') == 0
    assert [topic for topic, _ in device.received()] == ["edge/v1/all/cmd"]
    # The controller writes prompts and commands, never a device's state.
    assert controller.publish("edge/v1/dev-a/status", '{"state": "ready"}') == NOT_AUTHORIZED


def test_pool_prompts_reach_no_device_under_the_pattern_acl(connect_as) -> None:
    # A pattern cannot say which pool a device is in: pools need the generated ACL
    # (tests/service/test_generated_acl.py). Before, every device read every pool's prompts.
    device = connect_as("dev-a")
    controller = connect_as("controller")
    for topic in ("$share/p1/edge/v1/pool/p1/prompt", "edge/v1/pool/p1/prompt", "edge/v1/pool/#"):
        device.subscribe(topic)
    assert controller.publish("edge/v1/pool/p1/prompt", '{"id": "pool"}') == 0
    assert device.received() == []
    assert device.publish("edge/v1/pool/p1/prompt", '{"id": "evil"}') == NOT_AUTHORIZED


@pytest.mark.parametrize(("account", "topic"), [
    ("all", "edge/v1/all/cmd"),  # every device obeys it
    ("pool", "edge/v1/pool/p1/prompt"),
    ("pool", "edge/v1/pool/reply/prompt"),  # a pool named like a topic word of the contract
    ("all", "edge/v1/all/status"),
])
def test_accounts_named_after_topic_words_write_nothing(connect_as, account, topic) -> None:
    intruder = connect_as(account)
    controller = connect_as("controller")
    assert intruder.connect_reason == 0
    assert not controller.subscribe("edge/v1/#").is_failure
    assert intruder.publish(topic, '{"id": "evil", "op": "drain"}') == NOT_AUTHORIZED
    assert [t for t, payload in controller.received(within_s=0.5) if "evil" in payload] == []


def test_a_real_agent_under_the_shipped_acl_works_and_a_second_device_is_denied(
        connect_as, agent_as) -> None:
    controller = connect_as("controller")
    assert not controller.subscribe("edge/v1/#").is_failure
    intruder = connect_as("dev-b")
    for topic in ("edge/v1/dev-a/prompt", "edge/v1/dev-a/cmd", "edge/v1/+/prompt"):
        intruder.subscribe(topic)
    agent = agent_as("dev-a")
    # Status (retained, after its subscriptions) reaches the controller through the ACL ...
    controller.wait_for(lambda t, p: t == "edge/v1/dev-a/status"
                        and json.loads(p)["state"] in ("ready", "busy"))
    controller.wait_for(lambda t, p: t == "edge/v1/dev-a/meta")
    # ... a prompt from the controller's account is answered on the device's reply topic ...
    prompt = {"id": "p-acl", "prompt": "Say hi", "max_tokens": 3, "temperature": 0,
              "reply_to": "edge/v1/dev-a/reply/p-acl"}
    assert controller.publish("edge/v1/dev-a/prompt", json.dumps(prompt)) == 0
    _, final = controller.wait_for(lambda t, p: t == "edge/v1/dev-a/reply/p-acl"
                                   and json.loads(p).get("done"))
    assert "usage" in json.loads(final) and "error" not in json.loads(final)
    # ... and so is a command (cmd/result is writable, cmd readable).
    assert controller.publish("edge/v1/dev-a/cmd", '{"id": "c-acl", "op": "rebirth"}') == 0
    controller.wait_for(lambda t, p: t == "edge/v1/dev-a/cmd/result"
                        and json.loads(p)["id"] == "c-acl" and json.loads(p)["ok"])
    # A second device reads none of it and cannot command the first.
    assert intruder.received(within_s=0.5) == []
    evil_cmd, evil_prompt = '{"id": "c-evil", "op": "drain"}', '{"id": "p-evil", "prompt": "x"}'
    assert intruder.publish("edge/v1/dev-a/cmd", evil_cmd) == NOT_AUTHORIZED
    assert intruder.publish("edge/v1/dev-a/prompt", evil_prompt) == NOT_AUTHORIZED
    # An account named `all` cannot command the whole fleet: the agent never sees it.
    broadcast = '{"id": "c-all", "op": "drain"}'
    assert connect_as("all").publish("edge/v1/all/cmd", broadcast) == NOT_AUTHORIZED
    assert controller.publish("edge/v1/dev-a/cmd", '{"id": "c-after", "op": "resume"}') == 0
    controller.wait_for(lambda t, p: t == "edge/v1/dev-a/cmd/result"
                        and json.loads(p)["id"] == "c-after")
    results = [json.loads(p)["id"] for t, p in controller.seen if t == "edge/v1/dev-a/cmd/result"]
    assert "c-evil" not in results and "c-all" not in results
    assert agent.process.poll() is None


def test_wrong_password_and_anonymous_are_refused(connect_as) -> None:
    assert connect_as("dev-a", "not-the-password").connect_reason.is_failure
    assert connect_as(None).connect_reason.is_failure


def test_plain_listener_serves_the_controller_on_loopback(connect_as) -> None:
    controller = connect_as("controller", tls=False)
    assert controller.connect_reason == 0
    assert not controller.subscribe("edge/v1/#").is_failure


def test_a_reply_inbox_is_read_by_its_account_alone(connect_as) -> None:
    # The controller asks for replies at edge/v1/reply/controller/<key>; any device may answer
    # there (a pool prompt reaches any member), and no other account reads it.
    controller, other = connect_as("controller"), connect_as("dev-b")
    assert not controller.subscribe("edge/v1/reply/controller/+").is_failure
    for topic in ("edge/v1/reply/controller/+", "edge/v1/reply/#", "edge/v1/#", "#"):
        other.subscribe(topic)
    assert connect_as("dev-a").publish("edge/v1/reply/controller/k1", '{"id": "r1"}') == 0
    assert controller.received() == [("edge/v1/reply/controller/k1", '{"id": "r1"}')]
    assert [t for t, _ in other.received(within_s=0.5) if t.startswith("edge/v1/reply/")] == []
