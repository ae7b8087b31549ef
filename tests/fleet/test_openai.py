"""The controller's /v1 with the official ``openai`` package as the client, against a real
controller (uvicorn), a real Mosquitto and two real agents running the SmolLM2 ladder, both in
one pool. The agents are shared by the module (two cores); the test that kills one runs last."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from structlog.testing import capture_logs

from tests.fleet.conftest import make_config, wait_for
from tests.support.daemon import RunningDaemon, wait_ready
from tests.support.json_schema import problems
from tests.support.observer import Observer, Observers

MODEL = "smollm2-135m-instruct"
POOL = "oapool"
DEVICES = ("oa-1", "oa-2")
HELLO = [{"role": "user", "content": "Say hello."}]
# Raw text the model keeps continuing at temperature 0: a generation that runs long.
LONG = "Count from 1 to 1000: 1, 2, 3, 4, 5, 6,"
ALERT_SCHEMA = {
    "type": "object",
    "properties": {
        "severity": {"type": "string", "enum": ["low", "medium", "high"]},
        "device": {"type": "string", "enum": ["smoke-detector", "door", "camera"]},
        "urgent": {"type": "boolean"},
    },
    "required": ["severity", "device", "urgent"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def agents(tmp_path_factory, module_broker, ladder_dir):
    # One queued request per device, so a few long generations make the whole fleet busy.
    running = {device: RunningDaemon(tmp_path_factory.mktemp(device), module_broker, ladder_dir,
                                     device_id=device,
                                     mqtt={"pool": POOL, "max_payload_bytes": 65536},
                                     runtime={"queue_size": 1}).start()
               for device in DEVICES}
    try:
        for daemon in running.values():
            wait_ready(daemon)
        yield running
    finally:
        for daemon in running.values():
            daemon.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, module_broker, agents):
    from agent.fleet.service import FleetService

    service = FleetService(make_config(tmp_path_factory.mktemp("fleet"), module_broker)).start()
    assert service.controller.mqtt.wait_connected(10)

    def both_serving() -> bool:
        rows = service.web.openai.router.rows()
        return sum(row["model"] == MODEL and row["state"] == "ready" for row in rows) == 2

    wait_for(both_serving, 60, "both agents ready with the model")
    yield service
    service.stop()


@pytest.fixture(scope="module")
def client(fleet, credentials) -> openai.OpenAI:
    # No retries: the tests look at the first answer, 429s included.
    return openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=credentials.token, max_retries=0,
                         timeout=120)


def idle(fleet) -> None:
    """Wait until no device reports queued work (routing reads the queue from telemetry)."""
    wait_for(lambda: all(not row["queue_depth"] for row in fleet.web.openai.router.rows()
                         if row["id"] in DEVICES), 60, "idle devices")


def fake_device(observers: Observers, fleet, device_id: str, state: str, **meta) -> Observer:
    """A plain MQTT client that the controller takes for a device in ``state``."""
    device = observers.connect(f"edge/v1/{device_id}/prompt")
    # A long telemetry interval: silent, it is still not stale during the test.
    device.publish(f"edge/v1/{device_id}/meta", json.dumps(
        {"device_id": device_id, "telemetry_interval_s": 3600, **meta}).encode())
    device.publish(f"edge/v1/{device_id}/status", json.dumps(
        {"state": state, "session": 1, "ts": time.time(), "version": "0.1.0"}).encode())
    wait_for(lambda: any(row["id"] == device_id and row["state"] == state
                         for row in fleet.web.openai.router.rows()), 30, f"{device_id} {state}")
    return device


def test_models_lists_what_is_servable_now_with_device_counts(client):
    listed = {model.id: model for model in client.models.list()}
    assert listed[MODEL].devices == 2
    assert listed[f"pool/{POOL}"].devices == 2
    assert all(listed[f"device/{device}"].devices == 1 for device in DEVICES)


def test_chat_not_streamed_has_usage_and_finish_reason(client):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3,
                                           temperature=0, seed=1)
    assert reply.object == "chat.completion" and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # three tokens cannot end a greeting
    assert reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 3


def test_chat_streamed_ends_with_usage_and_the_same_text(client):
    extensions = {"top_k": 1, "min_p": 0.0}  # the MQTT contract's sampling extensions
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_completion_tokens=6, temperature=0, seed=1, stream=True,
        stream_options={"include_usage": True}, extra_body=extensions))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6,
                                           temperature=0, seed=1, extra_body=extensions)
    assert whole.choices[0].message.content == text


def test_completions_streamed_and_not(client):
    whole = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4,
                                      temperature=0, seed=3, stop=["\n\n"])
    assert whole.object == "text_completion" and whole.usage.completion_tokens >= 1
    streamed = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4,
                                              temperature=0, seed=3, stop=["\n\n"], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_a_model_id_is_routed_across_both_devices(client, fleet):
    idle(fleet)

    def ask(index: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO, max_tokens=24, temperature=0, seed=index)
        assert raw.parse().choices[0].message.content
        return raw.headers["x-edge-device"]

    # Two at once: the first takes the best idle device, which then counts one request more.
    with ThreadPoolExecutor(2) as pool:
        served = list(pool.map(ask, range(2)))
    assert sorted(served) == sorted(DEVICES)


def test_device_and_pool_targets(client):
    for device in DEVICES:
        raw = client.chat.completions.with_raw_response.create(
            model=f"device/{device}", messages=HELLO, max_tokens=2, temperature=0)
        assert raw.headers["x-edge-device"] == device
        assert raw.parse().usage.completion_tokens == 2
    pooled = client.chat.completions.create(model=f"pool/{POOL}", messages=HELLO, max_tokens=2,
                                            temperature=0)
    assert pooled.usage.completion_tokens == 2 and pooled.choices[0].message.content


def test_a_json_schema_response_parses_and_validates(client):
    form = {"type": "json_schema", "json_schema": {"name": "alert", "schema": ALERT_SCHEMA}}
    for stream in (False, True):
        messages = [{"role": "user", "content": "Classify as JSON: smoke in the kitchen."}]
        if stream:
            chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64,
                                                    temperature=0, response_format=form,
                                                    stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=64, temperature=0,
                response_format=form).choices[0].message.content
        assert problems(json.loads(text), ALERT_SCHEMA) == []


def test_errors_have_openais_shape_and_status(client, fleet):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=7)
    assert bad.value.body["code"] == "bad_request" and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as grammar:
        client.chat.completions.create(model=MODEL, messages=HELLO,
                                       extra_body={"grammar": "root ::= ("})
    assert grammar.value.body["code"] == "bad_grammar"
    wrong = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_a_chunked_body_without_a_length_stops_at_the_limit(fleet, credentials):
    """Content-Length is only a claim: a chunked body (none given) is counted as it arrives,
    so a client cannot make the controller hold more than the limit. The dashboard API too."""
    def chunked(mib: int):  # no Content-Length: MiB chunks, just past the limit
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(mib):
            yield b"x" * (1 << 20)

    headers = {"Authorization": f"Bearer {credentials.token}"}
    # The limits: 1 MiB for /v1, a manifest's 4 MiB (and a little) for the dashboard API.
    for path, mib in (("/v1/chat/completions", 3), (f"/api/devices/{DEVICES[0]}/cmd", 6)):
        answer = httpx.post(f"{fleet.url}{path}", content=chunked(mib), headers=headers,
                            timeout=60)
        assert answer.status_code == 413, (path, answer.text)
        assert "too_large" in answer.text


def test_the_cli_prompts_a_model_and_a_pool(fleet, credentials, monkeypatch, capsys):
    from agent.cli import main

    monkeypatch.setenv("EDGE_AGENT_FLEET_URL", fleet.url)
    monkeypatch.setenv("EDGE_AGENT_FLEET_TOKEN", credentials.token)
    for target in (f"model/{MODEL}", f"pool/{POOL}"):
        assert main(["fleet", "prompt", target, "Say hi", "--max-tokens", "3", "--json"]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()
                   if line.startswith('{"id"')]
        assert records[-1]["done"] and records[-1]["usage"]["completion_tokens"] == 3


def test_429_with_retry_after_when_every_device_is_busy(client, fleet):
    idle(fleet)
    release = threading.Event()

    def long_one(_: int) -> openai.RateLimitError | None:
        try:
            stream = client.completions.create(model=MODEL, prompt=LONG, max_tokens=200,
                                               temperature=0, stream=True)
        except openai.RateLimitError as exc:
            return exc
        for _ in stream:
            if release.is_set():
                break
        stream.close()
        return None

    # Each device holds one running and one queued request (runtime.queue_size 1): six at once
    # are more than the fleet holds, so some find every device busy.
    with capture_logs() as logs, ThreadPoolExecutor(6) as pool:
        asked = [pool.submit(long_one, index) for index in range(6)]
        try:
            wait_for(lambda: sum(future.done() for future in asked) >= 2, 60, "two refusals")
        finally:
            release.set()
        refusals = [error for error in (future.result() for future in asked) if error]
    assert len(refusals) >= 2
    for refusal in refusals:
        assert refusal.body["code"] == "busy"
        assert int(refusal.response.headers["retry-after"]) >= 1
    # Each refused request was tried on both devices before the 429.
    busy = {entry["device"] for entry in logs if entry["event"] == "openai_failover"}
    assert busy == set(DEVICES)


def test_a_reply_record_with_wrong_types_is_a_502_not_a_crash(client, fleet, module_broker):
    """A device (here a hostile one: a plain MQTT client) answers a final whose error is a
    string and whose usage is text: the client gets bad_reply, and the controller serves on."""
    hostile = "dev-hostile"
    observers = Observers(module_broker)
    device = fake_device(observers, fleet, hostile, "ready")
    try:
        answers = [{"done": True, "error": "boom"},
                   {"done": True, "text": "x", "usage": {"prompt_tokens": "many"}}]

        def answer_each() -> None:
            topic = f"edge/v1/{hostile}/prompt"
            for index, record in enumerate(answers):
                device.wait_for(lambda m: len(device.on(topic)) > index, timeout=60)
                prompt = device.on(topic)[index]
                body = json.loads(prompt.payload)
                device.publish(body["reply_to"], json.dumps({"id": body["id"], **record}).encode(),
                               correlation_data=prompt.correlation_data)

        answering = threading.Thread(target=answer_each, daemon=True)
        answering.start()
        for _ in answers:
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(model=f"device/{hostile}", max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}])
            assert refused.value.status_code == 502
            assert refused.value.body["code"] == "bad_reply", refused.value.body
        answering.join(10)
        # Everyone else is still served.
        idle(fleet)
        reply = client.chat.completions.create(model=MODEL, max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content is not None
    finally:
        device.publish(f"edge/v1/{hostile}/status", json.dumps(
            {"state": "stopped", "session": 1, "ts": time.time(), "version": "0.1.0"}).encode())
        observers.close()


def test_a_pool_with_no_ready_member_is_503_at_once_and_an_unknown_pool_404(fleet, credentials,
                                                                             module_broker):
    """Without the check the broker holds a prompt for a pool nobody serves, and the client
    waits out the device timeout (minutes) for a 504."""
    quick = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=credentials.token, max_retries=0,
                          timeout=20)
    observers = Observers(module_broker)
    try:
        fake_device(observers, fleet, "ghost-1", "stopped", pool="ghostpool")
        with pytest.raises(openai.APIStatusError) as unserved:
            quick.chat.completions.create(model="pool/ghostpool", messages=HELLO, max_tokens=2)
        assert unserved.value.status_code == 503 and unserved.value.body["code"] == "no_model"
        with pytest.raises(openai.NotFoundError) as unknown:
            quick.chat.completions.create(model="pool/nobody", messages=HELLO, max_tokens=2)
        assert unknown.value.body["code"] == "model_not_found"
    finally:
        observers.close()


def test_a_device_flooding_a_reply_to_a_client_that_does_not_read_is_cut_off(fleet, credentials,
                                                                             module_broker):
    """A hostile device answers one streamed request with far more records than the client
    reads: the controller keeps at most MAX_BUFFERED_RECORDS of them, ends the reply with
    bad_reply, and drops the rest, instead of holding the whole flood in memory."""
    from agent.fleet.openai_api import MAX_BUFFERED_RECORDS

    hostile = "dev-flood"
    flood = MAX_BUFFERED_RECORDS * 8  # 1 KiB each: far past what the kernel's buffers take
    observers = Observers(module_broker)
    device = fake_device(observers, fleet, hostile, "ready")
    body = json.dumps({"model": f"device/{hostile}", "stream": True, "max_tokens": 4,
                       "messages": HELLO}).encode()
    host, port = fleet.url.removeprefix("http://").split(":")
    reader = socket.create_connection((host, int(port)), timeout=60)
    try:
        with capture_logs() as logs:
            reader.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                           b"Authorization: Bearer " + credentials.token.encode() + b"\r\n"
                           b"Content-Type: application/json\r\nConnection: close\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            topic = f"edge/v1/{hostile}/prompt"
            prompt = device.wait_for(lambda m: m.topic == topic, timeout=30)
            asked = json.loads(prompt.payload)
            delta = "x" * 1024
            for _ in range(flood):  # the client reads nothing meanwhile
                device.publish(asked["reply_to"], json.dumps(
                    {"id": asked["id"], "delta": delta}).encode(),
                    correlation_data=prompt.correlation_data)
            device.publish(asked["reply_to"], json.dumps(
                {"id": asked["id"], "done": True, "text": "", "finish_reason": "stop"}).encode(),
                correlation_data=prompt.correlation_data)
            wait_for(lambda: any(entry["event"] == "reply_overflow" for entry in logs), 60,
                     "the controller cutting the reply off")
        received = bytearray()
        while chunk := reader.recv(1 << 20):
            received += chunk
    finally:
        reader.close()
        device.publish(f"edge/v1/{hostile}/status", json.dumps(
            {"state": "stopped", "session": 1, "ts": time.time(), "version": "0.1.0"}).encode())
        observers.close()
    events = [line[6:] for line in received.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "bad_reply"
    assert MAX_BUFFERED_RECORDS // 2 < len(events) < flood // 2


def test_failover_when_the_chosen_device_is_killed_before_its_first_token(client, fleet, agents):
    idle(fleet)
    router = fleet.web.openai.router
    first, _ = router.claim(MODEL, frozenset())  # where the next request goes
    router.end(first)
    survivor = next(device for device in DEVICES if device != first)
    # SIGKILL: the device's status stays `ready` in the registry until its Will arrives
    # (will_delay_s), so the request goes to it, is never answered, and fails over then.
    agents[first].stop(signal.SIGKILL)
    with capture_logs() as logs:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO,
                                                              max_tokens=3, temperature=0)
    failovers = [entry for entry in logs if entry["event"] == "openai_failover"]
    assert [(entry["device"], entry["why"]) for entry in failovers] == [(first, "gone")]
    assert raw.headers["x-edge-device"] == survivor
    assert raw.parse().usage.completion_tokens == 3
