"""Payload validation is pure: plain bytes in, a struct or a RequestError naming the field out."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import RequestError, UnknownOpError
from agent.mqtt import payloads
from agent.mqtt.payloads import BenchArgs, PinArgs, decode_command, decode_prompt, reply_hint

LIMIT = 4096


def _prompt(**fields) -> bytes:
    return json.dumps({"id": "r1", "prompt": "hi", **fields}).encode()


def test_valid_prompt_and_chat_decode():
    request = decode_prompt(_prompt(max_tokens=8, seed=1, stop=["\n"]), max_bytes=LIMIT)
    assert (request.id, request.prompt, request.max_tokens, request.seed) == ("r1", "hi", 8, 1)
    chat = decode_prompt(
        json.dumps({"id": "c", "messages": [{"role": "user", "content": "yo"}]}).encode(),
        max_bytes=LIMIT,
    )
    assert chat.messages[0].content == "yo" and chat.prompt is None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"not json", "prompt"),
        (b"[1, 2]", "prompt"),
        (b'{"prompt": "hi"}', "id"),
        (b'{"id": 7, "prompt": "hi"}', "id"),
        (_prompt(max_tokens="8"), "max_tokens"),
        (_prompt(max_tokens=True), "max_tokens"),
        (_prompt(max_tokens=0), "max_tokens"),
        (_prompt(colour="red"), "colour"),
        (_prompt(temperature=-1), "temperature"),
        (_prompt(top_p=0), "top_p"),
        (_prompt(reply_to="a/+/b"), "reply_to"),
        (_prompt(stop=[""]), "stop"),
        (json.dumps({"id": "x"}).encode(), "messages"),
        (json.dumps({"id": "x", "prompt": "a", "messages": []}).encode(), "messages"),
        (json.dumps({"id": "x", "messages": [{"role": "god", "content": "a"}]}).encode(), "messages[0].role"),
        (json.dumps({"id": "x", "messages": [{"role": "user"}]}).encode(), "messages[0].content"),
        (json.dumps({"id": "a/b", "prompt": "a"}).encode(), "id"),
        (json.dumps({"id": "", "prompt": "a"}).encode(), "id"),
        (b"\xff\xfe", "prompt"),
    ],
)
def test_invalid_prompt_names_the_field(raw, field):
    with pytest.raises(RequestError) as caught:
        decode_prompt(raw, max_bytes=LIMIT)
    assert caught.value.code == "bad_request"
    assert caught.value.details["field"] == field
    assert caught.value.message.startswith(f"{field}: ")


def test_oversized_payload_is_rejected_before_parsing():
    raw = _prompt(prompt="x" * LIMIT)
    with pytest.raises(RequestError, match="over mqtt.max_payload_bytes=4096") as caught:
        decode_prompt(raw, max_bytes=LIMIT)
    assert caught.value.details["field"] == "payload"
    assert reply_hint(raw, max_bytes=LIMIT) == payloads.ReplyHint()


def test_commands_check_args_per_op():
    assert decode_command(b'{"id": "c1", "op": "drain"}', max_bytes=LIMIT).op == "drain"
    pin = decode_command(b'{"id": "c2", "op": "pin", "args": {"quant": "Q4_K_M"}}', max_bytes=LIMIT)
    assert pin.args == PinArgs(quant="Q4_K_M")
    assert decode_command(b'{"id": "c3", "op": "bench"}', max_bytes=LIMIT).args == BenchArgs()
    with pytest.raises(UnknownOpError) as unknown:
        decode_command(b'{"id": "c4", "op": "format_disk"}', max_bytes=LIMIT)
    assert unknown.value.code == "unknown_op"
    with pytest.raises(RequestError) as bad_arg:
        decode_command(b'{"id": "c5", "op": "pin", "args": {"quant": 4}}', max_bytes=LIMIT)
    assert bad_arg.value.details["field"] == "args.quant"
    with pytest.raises(RequestError) as extra_arg:
        decode_command(b'{"id": "c6", "op": "drain", "args": {"now": true}}', max_bytes=LIMIT)
    assert extra_arg.value.details["field"] == "args.now"
    with pytest.raises(RequestError) as missing:
        decode_command(b'{"id": "c7", "op": "set_manifest", "args": {}}', max_bytes=LIMIT)
    assert missing.value.details["field"] == "args.source"


def test_reply_hint_salvages_only_usable_id_and_reply_to():
    assert reply_hint(b'{"id": "a", "reply_to": "x/y", "max_tokens": "bad"}', max_bytes=LIMIT) == (
        payloads.ReplyHint(id="a", reply_to="x/y")
    )
    assert reply_hint(b'{"id": 3, "reply_to": "x/#"}', max_bytes=LIMIT) == payloads.ReplyHint()
    assert reply_hint(b"garbage", max_bytes=LIMIT) == payloads.ReplyHint()
    assert reply_hint(b'"a string"', max_bytes=LIMIT) == payloads.ReplyHint()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
prompt_like = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values | st.text(max_size=10),
        "prompt": json_values,
        "messages": json_values,
        "max_tokens": json_values,
        "temperature": json_values,
        "reply_to": json_values | st.text(max_size=10),
        "stream": json_values,
    },
)


@settings(max_examples=500, deadline=None)
@given(body=prompt_like | json_values, junk=st.binary(max_size=40))
def test_any_input_gives_a_request_or_a_bad_request(body, junk):
    for raw in (json.dumps(body).encode(), junk):
        try:
            request = decode_prompt(raw, max_bytes=LIMIT)
        except RequestError as exc:
            assert exc.code == "bad_request" and exc.details.get("field")
        else:
            assert isinstance(request.id, str) and (request.prompt is None) != (request.messages is None)
        hint = reply_hint(raw, max_bytes=LIMIT)
        assert hint.id is None or isinstance(hint.id, str)


def test_status_round_trips():
    status = payloads.status("ready", session=3, version="0.1.0", ts=12.5)
    assert payloads.decode_status(payloads.encode(status)) == status
    assert msgspec.json.decode(payloads.encode(status))["state"] == "ready"
