"""Finding 7 of issue 10: a prompt must not make the device publish into the fleet's topics.

A real `edge-agent run` on a real mosquitto WITHOUT an ACL (so a device that obeyed would really
write there), prompts sent by a paho client with an MQTT 5 Response Topic or a `reply_to`, and an
observer subscribed to `#` that sees everything the device publishes."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.support.daemon import BASE, RunningDaemon, wait_final, wait_ready
from tests.support.observer import Observer, Observers

ALLOWED = "edge/v1/app-1/inbox"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, module_broker, ladder_dir):
    running = RunningDaemon(tmp_path_factory.mktemp("daemon"), module_broker, ladder_dir,
                            mqtt={"reply_topics": [f"{ALLOWED}/#"]}).start()
    wait_ready(running)
    yield running
    running.close()


@pytest.fixture
def everything(module_broker, daemon):
    observers = Observers(module_broker)
    yield observers.connect("#")
    observers.close()


def _prompt(request_id: str, **extra) -> bytes:
    return json.dumps({"id": request_id, "prompt": "Say hi", "max_tokens": 3, "temperature": 0,
                       **extra}).encode()


def _carrying(observer: Observer, request_id: str) -> list[str]:
    """Topics the device wrote with ``request_id`` in the JSON (replies, chunks, errors)."""
    found = []
    for message in list(observer.messages):
        if message.topic == f"{BASE}/prompt":  # the request itself
            continue
        try:
            body = json.loads(message.payload)
        except ValueError:
            continue
        if isinstance(body, dict) and body.get("id") == request_id:
            found.append(message.topic)
    return found


REFUSED = [
    "edge/v1/dev-other/cmd",  # another device's commands: its cmd handler would parse the reply
    "edge/v1/dev-other/status",
    f"{BASE}/status",  # its own retained status
    f"{BASE}/cmd",
    "edge/v1/all/cmd",
    "homeassistant/sensor/evil/config",  # Home Assistant discovery
    "edge/v1/reply/ctl-1",  # the inbox tree takes <requester>/<key>, nothing shallower or deeper
    "edge/v1/reply/ctl-1/k/extra",
]


@pytest.mark.parametrize("how", ["response_topic", "reply_to"])
@pytest.mark.parametrize("target", REFUSED)
def test_a_reply_topic_inside_the_fleet_tree_is_refused_and_nothing_is_written_there(
        daemon, everything, target, how):
    request_id = f"r-{uuid.uuid4().hex[:8]}"
    if how == "response_topic":
        everything.publish(f"{BASE}/prompt", _prompt(request_id), response_topic=target,
                           correlation_data=b"c-1")
    else:
        everything.publish(f"{BASE}/prompt", _prompt(request_id, reply_to=target))
    # The refusal goes to the device's own default reply topic: the only other address there is.
    final = wait_final(everything, f"{BASE}/reply/{request_id}")
    assert final["error"]["code"] == "bad_request"
    assert final["error"]["details"]["field"] == how
    # ... and an event tells the fleet which topic was asked for.
    event = everything.wait_for(
        lambda m: m.topic == f"{BASE}/events"
        and target in json.loads(m.payload).get("error", {}).get("message", ""))
    assert json.loads(event.payload)["event"] == "rejected_input"
    # A prompt sent after it is answered after it (one queue): had the refused one run, its
    # records would be on `target` by now.
    after = f"after-{request_id}"
    everything.publish(f"{BASE}/prompt", _prompt(after))
    assert "usage" in wait_final(everything, f"{BASE}/reply/{after}")
    assert _carrying(everything, request_id) == [f"{BASE}/reply/{request_id}"]
    assert [m for m in everything.on(target) if request_id.encode() in m.payload] == []


def test_a_refused_response_topic_is_answered_on_the_requesters_reply_to(daemon, everything):
    request_id = f"r-{uuid.uuid4().hex[:8]}"
    everything.publish(f"{BASE}/prompt", _prompt(request_id, reply_to="client/7/answers"),
                       response_topic="edge/v1/dev-other/cmd", correlation_data=b"c-2")
    final = wait_final(everything, "client/7/answers")
    assert final["error"]["code"] == "bad_request" and final["id"] == request_id
    assert everything.on("client/7/answers")[-1].correlation_data == b"c-2"
    assert "edge/v1/dev-other/cmd" not in _carrying(everything, request_id)


@pytest.mark.parametrize("topic", [f"{ALLOWED}/r1", f"{BASE}/reply/ctl-1/r1", "client/9/answers",
                                   "edge/v1/reply/ctl-1/k1"])  # a requester's reply inbox
def test_allowlisted_own_and_outside_reply_topics_are_answered(daemon, everything, topic):
    request_id = f"ok-{uuid.uuid4().hex[:8]}"
    everything.publish(f"{BASE}/prompt", _prompt(request_id), response_topic=topic,
                       correlation_data=b"c-3")
    final = wait_final(everything, topic)
    assert final["id"] == request_id and "usage" in final and "error" not in final
    assert set(_carrying(everything, request_id)) == {topic}
