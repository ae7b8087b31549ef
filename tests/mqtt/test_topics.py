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
