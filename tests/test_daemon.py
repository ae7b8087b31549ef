"""The daemon as users run it: `edge-agent run --config F` as a real subprocess, a real mosquitto,
the real SmolLM2 ladder, prompts sent with mosquitto_pub and paho, replies watched with paho.

Order does not matter: the module's daemon is only asked, never changed; the tests that change
its model or stop it (commands, graceful stop) get a daemon and a broker of their own."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.daemon import (
    BASE,
    RunningDaemon,
    finals,
    mosquitto_pub,
    wait_final,
    wait_ready,
)
from tests.support.observer import Observers


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, module_broker, ladder_dir):
    running = RunningDaemon(tmp_path_factory.mktemp("daemon"), module_broker, ladder_dir).start()
    wait_ready(running)
    yield running
    running.close()


@pytest.fixture
def watch(module_broker):
    observers = Observers(module_broker)
    yield observers.connect
    observers.close()


@pytest.fixture
def own_daemon(tmp_path, ladder_dir):
    """A daemon on a broker of this test's own, and a ``watch`` for that broker."""
    broker = Broker(tmp_path / "broker").start()
    observers = Observers(broker)
    running = RunningDaemon(tmp_path / "daemon", broker, ladder_dir).start()
    try:
        wait_ready(running)
        yield running, observers.connect
    finally:
        running.close()
        observers.close()
        broker.stop()


def test_ready_notify_and_retained_status_and_meta(daemon, watch):
    # Pinged from the main loop at half of WATCHDOG_USEC (2 s here), the first right after READY.
    notes = "\n".join(daemon.read_notifications(until="WATCHDOG=1", timeout=10))
    assert "READY=1" in notes and "STATUS=ready" in notes
    observer = watch(f"{BASE}/status", f"{BASE}/meta")
    status = json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/status").payload)
    assert status["state"] in ("ready", "busy") and status["session"] >= 1
    meta_message = observer.wait_for(lambda m: m.topic == f"{BASE}/meta")
    assert meta_message.retain
    meta = json.loads(meta_message.payload)
    assert meta["selection"]["quant"] == "Q4_K_M" and "Q4_K_M" in meta["selection"]["variants"]
    # The explain table is the select command's answer, not retained for every device.
    assert meta["selection"]["candidates"] == []
    assert meta["probe"]["cpu"]["logical_cores"] >= 1 and meta["version"]


def test_mqtt5_response_topic_and_correlation_data_from_mosquitto_pub(daemon, watch, module_broker):
    reply_topic = f"client/{uuid.uuid4().hex[:6]}/answers"
    observer = watch(reply_topic)
    mosquitto_pub(module_broker, f"{BASE}/prompt",
                  json.dumps({"id": "mp-1", "prompt": "The capital of France is", "max_tokens": 8,
                              "temperature": 0, "seed": 1}),
                  "-V", "mqttv5", "-D", "publish", "response-topic", reply_topic,
                  "-D", "publish", "correlation-data", "corr-42")
    final = wait_final(observer, reply_topic)
    assert final["id"] == "mp-1" and "error" not in final, final
    assert final["usage"]["completion_tokens"] >= 1 and final["timings"]["ttft_ms"] > 0
    chunks = [json.loads(m.payload) for m in observer.on(reply_topic) if "delta" in json.loads(m.payload)]
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and chunks
    assert "".join(c["delta"] for c in chunks) == final["text"]
    assert all(m.correlation_data == b"corr-42" for m in observer.on(reply_topic))


def test_chat_messages_with_reply_to_and_default_reply_topic(daemon, watch):
    observer = watch("mine/chat", f"{BASE}/reply/#")
    observer.publish(f"{BASE}/prompt", json.dumps({
        "id": "chat-1", "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 6, "temperature": 0, "reply_to": "mine/chat", "stream": False}).encode())
    observer.publish(f"{BASE}/prompt", json.dumps({"id": "plain-1", "prompt": "One, two,", "max_tokens": 4}).encode())
    chat = wait_final(observer, "mine/chat")
    assert chat["id"] == "chat-1" and chat["usage"]["completion_tokens"] >= 1
    assert len(observer.on("mine/chat")) == 1  # stream: false sends only the final
    plain = wait_final(observer, f"{BASE}/reply/plain-1")
    assert plain["id"] == "plain-1" and "error" not in plain, plain
    # What was streamed on the default reply topic is the text, within the asked-for budget.
    chunks = [json.loads(m.payload) for m in observer.on(f"{BASE}/reply/plain-1")
              if "delta" in json.loads(m.payload)]
    assert plain["text"] and "".join(c["delta"] for c in chunks) == plain["text"]
    assert 1 <= plain["usage"]["completion_tokens"] <= 4


def test_duplicates_are_answered_once(daemon, watch):
    observer = watch("dup/r")
    body = json.dumps({"id": "dup-1", "prompt": "Count: 1, 2,", "max_tokens": 12, "temperature": 0,
                       "reply_to": "dup/r"}).encode()
    observer.publish(f"{BASE}/prompt", body)
    observer.publish(f"{BASE}/prompt", body)  # while the first is in flight: ignored
    first = wait_final(observer, "dup/r")
    # A later request on the same topic is answered after anything the duplicate could cause.
    observer.publish(f"{BASE}/prompt", json.dumps({"id": "dup-marker", "prompt": "Hi", "max_tokens": 2,
                                                   "reply_to": "dup/r"}).encode())
    observer.wait_for(lambda m: any(f["id"] == "dup-marker" for f in finals(observer, "dup/r")), timeout=60)
    assert [f["id"] for f in finals(observer, "dup/r")] == ["dup-1", "dup-marker"]
    observer.publish(f"{BASE}/prompt", body)  # after it finished: the stored final again
    observer.wait_for(lambda m: len(finals(observer, "dup/r")) == 3, timeout=10)
    again = finals(observer, "dup/r")[2]
    assert again == first
    chunks = [json.loads(m.payload) for m in observer.on("dup/r") if "delta" in json.loads(m.payload)]
    assert [c["seq"] for c in chunks if c["id"] == "dup-1"].count(0) == 1  # generated once


def test_bad_input_gets_stable_codes_and_does_not_block(daemon, watch):
    observer = watch("bad/r", f"{BASE}/events", f"{BASE}/cmd/result")
    observer.publish(f"{BASE}/prompt", b"{not json", response_topic="bad/r", correlation_data=b"c1")
    observer.publish(f"{BASE}/prompt", json.dumps({"id": "b2", "prompt": "x", "max_tokens": "many",
                                                    "reply_to": "bad/r"}).encode())
    observer.publish(f"{BASE}/prompt", json.dumps({"id": "b3", "prompt": "x", "colour": 1,
                                                    "reply_to": "bad/r"}).encode())
    observer.publish(f"{BASE}/prompt", json.dumps({"id": "b4", "prompt": "x" * 5000,
                                                    "reply_to": "bad/r"}).encode(), response_topic="bad/r")
    observer.publish(f"{BASE}/prompt", b"\x00\x01 garbage with no way back")
    observer.publish(f"{BASE}/cmd", json.dumps({"id": "c-x", "op": "format_disk"}).encode())
    observer.publish(f"{BASE}/prompt", json.dumps({"id": "ok-after", "prompt": "Hi", "max_tokens": 3,
                                                    "reply_to": "bad/r"}).encode())
    observer.wait_for(lambda m: len(finals(observer, "bad/r")) == 5, timeout=60)
    answered = finals(observer, "bad/r")
    by_id = {f["id"]: f for f in answered if f["id"]}
    anonymous = sorted(f["error"]["message"] for f in answered if f["id"] is None)
    assert all(f["error"]["code"] == "bad_request" for f in answered if "error" in f)
    assert anonymous[0].startswith("payload:") and "max_payload_bytes" in anonymous[0]  # b4: not parsed
    assert anonymous[1].startswith("prompt: not valid JSON")  # answered via its Response Topic
    assert by_id["b2"]["error"]["message"].startswith("max_tokens:")
    assert by_id["b3"]["error"]["message"].startswith("colour:")
    assert "text" in by_id["ok-after"]
    event = json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/events"
                                         and json.loads(m.payload)["event"] == "rejected_input").payload)
    assert event["error"]["code"] == "bad_request"
    result = json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/cmd/result").payload)
    assert result == {"id": "c-x", "ok": False, "error": result["error"]} and result["error"]["code"] == "unknown_op"


def test_commands(own_daemon):
    _, watch = own_daemon
    observer = watch(f"{BASE}/cmd/result", f"{BASE}/status")

    def command(op: str, topic: str = f"{BASE}/cmd", **args) -> dict:
        command_id = f"{op}-{uuid.uuid4().hex[:6]}"
        observer.publish(topic, json.dumps({"id": command_id, "op": op, "args": args}).encode())
        return json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/cmd/result"
                                            and json.loads(m.payload)["id"] == command_id, timeout=120).payload)

    drained = command("drain")
    assert drained["ok"] and drained["result"]["state"] == "draining"
    observer.wait_for(lambda m: m.topic == f"{BASE}/status" and json.loads(m.payload)["state"] == "draining")
    assert command("resume")["result"]["state"] in ("ready", "busy")
    assert command("rebirth", topic="edge/v1/all/cmd")["ok"]  # broadcast reaches the device
    selected = command("select", pin="Q2_K")
    assert selected["ok"] and selected["result"]["quant"] == "Q2_K"
    explained = command("select")["result"]
    verdicts = {c["quant"]: c["verdict"] for c in explained["candidates"]}
    assert verdicts[explained["quant"]] == "chosen" and len(verdicts) > 1
    assert command("reload")["result"]["changed"] is False
    # A pin that cannot load is undone: the config's pin (Q4_K_M) holds again, not "no pin",
    # which the next reload would have turned into the best-fitting variant.
    assert not command("pin", quant="IQ2_XXS")["ok"]
    assert command("reload")["result"] == {"changed": False, "quant": "Q4_K_M"}
    bench = command("bench", max_tokens=4)
    assert bench["ok"] and bench["result"]["usage"]["completion_tokens"] >= 1
    fetched = command("fetch")
    assert fetched["ok"] and Path(fetched["result"]["path"]).exists()
    bad_manifest = command("set_manifest", source="http://127.0.0.1:9/manifest.json")
    # Nothing listens on port 9 (discard), so the manifest cannot be fetched at all.
    assert not bad_manifest["ok"] and bad_manifest["error"]["code"] == "manifest_invalid", bad_manifest
    assert "cannot fetch the manifest" in bad_manifest["error"]["message"]
    bad_args = command("pin", quant=7)
    assert bad_args["error"]["code"] == "bad_request" and bad_args["error"]["message"].startswith("args.quant")


def test_a_pin_that_keeps_the_model_still_updates_the_retained_meta(tmp_path, ladder_dir):
    """Pinning the quant that already runs changes no model, but meta's pin must say so:
    rollout plans and rollbacks read a device's pin from its retained meta."""
    broker = Broker(tmp_path / "broker").start()
    observers = Observers(broker)
    daemon = RunningDaemon(tmp_path / "daemon", broker, ladder_dir, model={"pin": None}).start()
    try:
        wait_ready(daemon)
        observer = observers.connect(f"{BASE}/meta", f"{BASE}/cmd/result")
        meta = json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/meta").payload)
        running = meta["selection"]["quant"]
        assert meta["pin"] is None
        observer.publish(f"{BASE}/cmd", json.dumps(
            {"id": "pin-same", "op": "pin", "args": {"quant": running}}).encode())
        result = json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/cmd/result",
                                              timeout=120).payload)
        assert result["ok"] and result["result"]["changed"] is False, result
        updated = observer.wait_for(lambda m: m.topic == f"{BASE}/meta"
                                    and json.loads(m.payload)["pin"] == running, timeout=30)
        assert json.loads(updated.payload)["selection"]["quant"] == running
    finally:
        daemon.close()
        observers.close()
        broker.stop()


def test_telemetry_is_published(daemon, watch):
    observer = watch(f"{BASE}/telemetry")
    first = json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/telemetry", timeout=10).payload)
    for key in ("cpu_percent", "mem", "queue_depth", "decode_tps", "ttft_ms", "requests_ok", "worker_rss_bytes", "seq"):
        assert key in first
    assert first["worker_rss_bytes"] > 0
    later = json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/telemetry"
                                         and json.loads(m.payload)["seq"] > first["seq"], timeout=10).payload)
    assert later["requests_ok"] >= 1


def test_broker_restart_mid_stream_loses_no_final(daemon, watch, module_broker):
    observer = watch("restart/r")
    observer.publish(f"{BASE}/prompt", json.dumps({"id": "rs-1", "prompt": "Tell a long story about a cat.",
                                                    "max_tokens": 96, "reply_to": "restart/r"}).encode())
    observer.wait_for(lambda m: m.topic == "restart/r", timeout=60)  # streaming has begun
    module_broker.restart(down_for_s=1.0)
    final = wait_final(observer, "restart/r", timeout=60)
    assert final["id"] == "rs-1" and "usage" in final, final


def test_graceful_stop_publishes_stopped_and_exits_zero(own_daemon):
    daemon, watch = own_daemon
    observer = watch(f"{BASE}/status")
    assert daemon.stop(signal.SIGTERM) == 0
    observer.wait_for(lambda m: json.loads(m.payload)["state"] == "stopped", timeout=10)
    notes = "\n".join(daemon.read_notifications())
    assert "STOPPING=1" in notes


def test_a_flood_of_commands_is_answered_busy_past_the_bound_and_nothing_is_lost(own_daemon):
    """Slow ops wait for the one model thread. A flood of them must not queue without end
    (nor push in-flight ids out of the ledger): past the bound each is answered ``busy`` at
    once, every id is answered exactly once, and a refused id sent again runs."""
    from agent.supervisor import MAX_COMMANDS_WAITING

    _, watch = own_daemon
    observer = watch(f"{BASE}/cmd/result")

    def send(command_id: str, op: str, **args) -> None:
        body = {"id": command_id, "op": op, "args": args}
        observer.publish(f"{BASE}/cmd", json.dumps(body).encode())

    def answers() -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {}
        for message in observer.on(f"{BASE}/cmd/result"):
            body = json.loads(message.payload)
            found.setdefault(body["id"], []).append(body)
        return found

    # Holds the model thread for seconds: a reply that does not end early.
    send("flood-bench", "bench", prompt="Count from 1 to 1000, separated by commas.",
         max_tokens=1024)
    flood = [f"flood-{n}" for n in range(3 * MAX_COMMANDS_WAITING)]
    for command_id in flood:
        send(command_id, "select")
    observer.wait_for(lambda m: len(answers()) == len(flood) + 1, timeout=180)
    got = answers()
    assert all(len(replies) == 1 for replies in got.values()), got
    busy = [i for i in flood if not got[i][0]["ok"]]
    assert busy, "no command was refused: the model thread's queue has no bound"
    assert all(got[i][0]["error"]["code"] == "busy" for i in busy)
    assert all(got[i][0]["ok"] for i in flood if i not in busy)

    send(busy[0], "select")  # forgotten when refused: it runs now
    observer.wait_for(lambda m: len(answers()[busy[0]]) == 2, timeout=60)
    assert answers()[busy[0]][1]["ok"]
