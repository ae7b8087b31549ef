"""Property-based fuzzing of the MQTT payload decoders (issue 10): prompt, cmd and their args.

The oracle does not ask the decoder what is valid: payloads built valid here must decode to
what was written; payloads with a defect put in on purpose must fail with that defect's code
and field; arbitrary bytes may do either, but only with the project's request errors.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import RequestError, UnknownOpError
from agent.mqtt import payloads

MAX = 64 * 1024


def fuzz(examples: int) -> settings:
    """Derandomized for CI. The tests below run 6,000 inputs together (issue 10: >= 5,000)."""
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.:", min_size=1, max_size=64)
texts = st.text(min_size=1, max_size=200).filter(lambda t: t != "")


@st.composite
def valid_prompt(draw) -> dict:
    body = {"id": draw(ids)}
    if draw(st.booleans()):
        body["prompt"] = draw(texts)
    else:
        body["messages"] = draw(st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=50)}),
            min_size=1, max_size=4))
    optional = {"max_tokens": st.integers(1, 4096), "temperature": st.floats(0, 5),
                "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 1000), "min_p": st.floats(0, 1),
                "repeat_penalty": st.floats(0.01, 5), "seed": st.integers(0, 2**32 - 1),
                "stop": st.lists(texts, max_size=4), "stream": st.booleans()}
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    return body


@fuzz(1500)
@given(valid_prompt())
def test_a_valid_prompt_decodes_to_what_was_sent(body: dict):
    request = payloads.decode_prompt(json.dumps(body).encode(), max_bytes=MAX)
    for key, value in body.items():
        got = getattr(request, key)
        if key == "messages":
            got = [{"role": m.role, "content": m.content} for m in got]
        assert got == value, key


DEFECTS = st.sampled_from([
    ("temperature", 5.5), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0),
    ("repeat_penalty", 0.0), ("max_tokens", 0), ("seed", -1), ("seed", 2**32), ("top_k", -1),
    ("stop", [""]), ("stop", ["x"] * 17), ("max_tokens", "many"), ("prompt", ""), ("id", "a/b"),
    ("id", "x" * 200), ("id", "a\nb"), ("colour", 1), ("timeout_s", 0), ("temperature", 1e400),
])


@fuzz(1500)
@given(valid_prompt(), DEFECTS)
def test_a_prompt_with_one_bad_field_is_bad_request_naming_it(body: dict, defect):
    field, value = defect
    body = {**body, field: value}
    if field == "prompt":
        body.pop("messages", None)
    raw = json.dumps(body).replace("Infinity", "1e400").encode()
    try:
        payloads.decode_prompt(raw, max_bytes=MAX)
    except RequestError as exc:
        assert exc.code == "bad_request" and exc.details["field"].split(".")[0] in (field, "prompt")
    else:
        raise AssertionError(f"{field}={value!r} was accepted")


ARGS = {
    "reload": st.just({}), "fetch": st.just({}), "drain": st.just({}), "resume": st.just({}),
    "rebirth": st.just({}),
    "select": st.fixed_dictionaries({}, optional={"pin": st.sampled_from(["Q4_K_M", "F16"]),
                                                  "profile": st.sampled_from(["default", "pi5"])}),
    "bench": st.fixed_dictionaries({}, optional={"prompt": texts, "max_tokens": st.integers(1, 4096)}),
    "pin": st.fixed_dictionaries({"quant": st.one_of(st.none(), st.sampled_from(["Q4_K_M", "Q8_0", "IQ2_XXS"]))}),
    "set_manifest": st.fixed_dictionaries({"source": st.sampled_from(["https://ctl/m.json", "/etc/edge/m.yaml"])}),
}


@fuzz(1500)
@given(st.sampled_from(sorted(ARGS)).flatmap(lambda op: st.tuples(st.just(op), ARGS[op])), ids)
def test_a_valid_command_decodes_with_its_args(op_args, command_id: str):
    op, args = op_args
    command = payloads.decode_command(json.dumps({"id": command_id, "op": op, "args": args}).encode(),
                                      max_bytes=MAX)
    assert (command.id, command.op) == (command_id, op)
    for key, value in args.items():
        assert getattr(command.args, key) == value


@fuzz(500)
@given(ids, st.text(min_size=1, max_size=30).filter(lambda op: op not in payloads.OPS))
def test_an_unknown_op_is_unknown_op(command_id: str, op: str):
    try:
        payloads.decode_command(json.dumps({"id": command_id, "op": op}).encode(), max_bytes=MAX)
    except UnknownOpError as exc:
        assert exc.code == "unknown_op" and len(exc.message) < 500
    else:
        raise AssertionError(f"op {op!r} was accepted")


@fuzz(1000)
@given(st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                     st.sampled_from(["id", "op", "args", "prompt", "messages", "quant", "source", "x"]),
                     inner, max_size=5), max_leaves=20).map(lambda v: json.dumps(v).encode()),
))
def test_arbitrary_payloads_raise_only_request_errors(raw: bytes):
    for decode in (payloads.decode_prompt, payloads.decode_command):
        try:
            decode(raw, max_bytes=MAX)
        except RequestError as exc:
            assert exc.code in ("bad_request", "unknown_op") and len(exc.message) < 2000
    payloads.reply_hint(raw, max_bytes=MAX)
