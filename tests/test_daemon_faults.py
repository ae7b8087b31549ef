"""The daemon under faults: kill -9 (the Will), a prompt sent while it was away (persistent
session), and thousands of malformed payloads through the real broker."""

from __future__ import annotations

import json
import signal
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.daemon import BASE, RunningDaemon, wait_final, wait_ready
from tests.support.observer import Observer, Observers


@pytest.fixture
def observer_for(broker):
    observers = Observers(broker)
    yield observers.connect
    observers.close()


@pytest.mark.slow
def test_kill_9_marks_lost_after_will_delay_and_queued_prompt_is_answered_on_return(
    tmp_path, broker, ladder_dir, observer_for
):
    daemon = RunningDaemon(tmp_path / "d", broker, ladder_dir).start()
    try:
        wait_ready(daemon)
        observer = observer_for(f"{BASE}/status", "away/r")
        ready = json.loads(observer.wait_for(lambda m: json.loads(m.payload)["state"] == "ready").payload)
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
        killed_at = time.monotonic()
        lost = json.loads(observer.wait_for(lambda m: json.loads(m.payload)["state"] == "lost", timeout=15).payload)
        assert time.monotonic() - killed_at >= 1.5  # will_delay_s is 2
        assert lost["session"] == ready["session"]
        retained = Observer(broker.host, broker.port)
        retained.subscribe(f"{BASE}/status")
        assert json.loads(retained.wait_for(lambda m: m.retain).payload)["state"] == "lost"
        retained.close()

        # Sent while the device is down: the broker keeps it in the device's persistent session.
        observer.publish(f"{BASE}/prompt", json.dumps({"id": "while-away", "prompt": "Hello", "max_tokens": 4,
                                                        "reply_to": "away/r"}).encode())
        daemon.close()
        daemon = RunningDaemon(tmp_path / "d", broker, ladder_dir).start()  # same state_dir
        wait_ready(daemon)
        final = wait_final(observer, "away/r")
        assert final["id"] == "while-away" and "usage" in final
        back = json.loads(observer.wait_for(lambda m: json.loads(m.payload)["state"] == "ready"
                                            and json.loads(m.payload)["session"] > ready["session"]).payload)
        assert back["session"] == ready["session"] + 1
        assert daemon.stop() == 0
    finally:
        daemon.close()


def certainly_invalid(body: bytes, limit: int) -> bool:
    """Invalid by the prompt contract (DESIGN.md), decided without the daemon's own decoder:
    too big, not JSON, not an object, a field the contract lacks, or not exactly one of
    ``prompt`` and ``messages``. Anything else may be valid and is not sent."""
    if len(body) > limit:
        return True
    try:
        value = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        return True
    if not isinstance(value, dict) or "extra" in value:
        return True
    return (value.get("prompt") is None) == (value.get("messages") is None)


@pytest.mark.slow
def test_thousands_of_malformed_payloads_get_bad_request_and_a_valid_prompt_still_works(
    tmp_path, broker, ladder_dir, observer_for
):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    limit = 2048
    daemon = RunningDaemon(tmp_path / "d", broker, ladder_dir, mqtt={"max_payload_bytes": limit}).start()
    try:
        wait_ready(daemon)
        observer = observer_for("fuzz/r", "fine/r", f"{BASE}/events")
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
            max_leaves=8,
        )
        fields = st.sampled_from(["id", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop",
                                  "seed", "stream", "reply_to", "timeout_s", "extra"])
        bodies = st.one_of(
            st.binary(max_size=64),
            st.dictionaries(fields, json_values, max_size=5).map(lambda d: json.dumps(d).encode()),
            json_values.map(lambda v: json.dumps(v).encode()),
            st.integers(limit + 1, limit * 3).map(lambda n: b'{"id": "big", "prompt": "' + b"x" * n + b'"}'),
        )
        replyable: list[int] = []

        @settings(max_examples=3000, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=bodies, with_response_topic=st.booleans())
        def publish(body: bytes, with_response_topic: bool) -> None:
            if not certainly_invalid(body, limit):
                return  # perhaps valid: not what this test sends
            properties = None
            if with_response_topic:
                properties = Properties(PacketTypes.PUBLISH)
                properties.ResponseTopic = "fuzz/r"
                properties.CorrelationData = str(len(replyable)).encode()
                replyable.append(len(replyable))
            elif b'"reply_to"' in body or b'"id"' in body:
                return  # could name a reply path of its own; covered by the replyable half
            observer.client.publish(f"{BASE}/prompt", body, qos=0, properties=properties)

        publish()
        assert len(replyable) > 1000
        observer.wait_for(lambda m: len(observer.on("fuzz/r")) >= len(replyable), timeout=120)
        replies = observer.on("fuzz/r")
        assert sorted(int(m.correlation_data) for m in replies) == replyable  # each answered once
        assert {json.loads(m.payload)["error"]["code"] for m in replies} == {"bad_request"}
        observer.wait_for(lambda m: m.topic == f"{BASE}/events"
                          and json.loads(m.payload)["event"] == "rejected_input")

        observer.publish(f"{BASE}/prompt", json.dumps({"id": "still-fine", "prompt": "Hi", "max_tokens": 3,
                                                        "reply_to": "fine/r"}).encode())
        assert "usage" in wait_final(observer, "fine/r")
        assert daemon.process.poll() is None
    finally:
        daemon.close()
