import pytest

from agent.mqtt import topics
from agent.mqtt.topics import DeviceTopics


def test_device_topics_follow_the_contract():
    t = DeviceTopics("pi-7")
    assert t.status == "edge/v1/pi-7/status"
    assert t.cmd_result == "edge/v1/pi-7/cmd/result"
    assert t.reply("r1") == "edge/v1/pi-7/reply/r1"
    assert t.broadcast_cmd == "edge/v1/all/cmd"
    assert topics.shared_pool_subscription("kitchen") == "$share/kitchen/edge/v1/pool/kitchen/prompt"
    assert topics.device_of("edge/v1/pi-7/telemetry") == ("pi-7", "telemetry")
    assert topics.device_of("edge/v1/pool/kitchen/prompt") is None


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "x\x00"])
def test_device_id_must_be_one_level(bad):
    with pytest.raises(ValueError):
        DeviceTopics(bad)


@pytest.mark.parametrize(("topic", "ok"), [("a/b", True), ("a/+", False), ("#", False), ("$SYS/x", False), ("", False), ("\ud800", False)])
def test_publish_topic_validity(topic, ok):
    assert topics.is_valid_publish_topic(topic) is ok


@pytest.mark.parametrize("word", sorted(topics.RESERVED_DEVICE_IDS) + ["$SYS", "$share"])
def test_reserved_topic_words_are_never_device_ids(word):
    assert not topics.is_valid_device_id(word)
    with pytest.raises(ValueError, match="reserved|use letters"):
        DeviceTopics(word)
    # The controller learns no device from them: a device named `all` reporting status is ignored.
    assert topics.device_of(f"edge/v1/{word}/status") is None


def test_device_ids_near_the_reserved_words_stay_valid():
    for name in ("all-1", "pool2", "Status", "reply.x", "9_a", "a" * 64):
        assert DeviceTopics(name).status == f"edge/v1/{name}/status"
        assert topics.device_of(f"edge/v1/{name}/status") == (name, "status")


@pytest.mark.parametrize("bad", ["dev 1", "kïtchen", "dev$", "-dev", ".dev", "_dev", "a" * 65, "dev\t"])
def test_device_ids_outside_the_safe_names_are_refused(bad):
    # The ACL generator and install.sh refuse these: the topic helpers must not accept them either,
    # or a device could run under an id its broker account can never have.
    with pytest.raises(ValueError, match="use letters, digits"):
        DeviceTopics(bad)
    assert topics.device_of(f"edge/v1/{bad}/status") is None


@pytest.mark.parametrize(("topic_filter", "topic", "hit"), [
    ("a/+/c", "a/b/c", True), ("a/+/c", "a/b/d", False), ("a/+", "a/b/c", False),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("a/b", "a/b", True), ("a/b", "a/b/c", False),
    ("+/#", "x", True), ("#", "anything/at/all", True), ("a/+/#", "a", False),
])
def test_filter_matching_follows_mqtt(topic_filter, topic, hit):
    assert topics.is_valid_filter(topic_filter)
    assert topics.filter_matches(topic_filter, topic) is hit


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "$SYS/#", "x\x00"])
def test_invalid_filters(bad):
    assert not topics.is_valid_filter(bad)


POLICY = topics.ReplyPolicy.for_device(DeviceTopics("pi-7"), discovery_prefix="homeassistant",
                                       allowed=["edge/v1/app-1/inbox/#", "edge/v1/+/answers"])


@pytest.mark.parametrize("topic", [
    "edge/v1/pi-7/reply/r1", "edge/v1/pi-7/reply/ctl/r1",  # its own reply/ subtree
    "edge/v1/app-1/inbox/x/y", "edge/v1/anyone/answers",  # mqtt.reply_topics
    "client/42/answers", "edge/v1x/a", "homeassistantx/a",  # outside the protected trees
])
def test_reply_policy_allows(topic):
    assert POLICY.refusal(topic) is None


@pytest.mark.parametrize("topic", [
    "edge/v1/pi-8/cmd", "edge/v1/pi-8/prompt", "edge/v1/pi-8/status", "edge/v1/all/cmd",
    "edge/v1/pool/p/prompt", "edge/v1/pi-7/status", "edge/v1/pi-7/cmd", "edge/v1/pi-7/reply",
    "edge/v1/pi-7/replyx/1", "edge/v1", "homeassistant/sensor/x/config", "homeassistant",
    "edge/v1/app-1/outbox", "$SYS/x", "$share/g/x", "a/+/b", "a/#",
])
def test_reply_policy_refuses(topic):
    assert POLICY.refusal(topic)
