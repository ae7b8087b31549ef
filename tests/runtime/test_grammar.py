"""Structured output through the real engine and worker on the real SmolLM2 ladder:
``response_format`` (json_object, json_schema) and a raw GBNF ``grammar`` constrain the reply;
a grammar or schema llama.cpp cannot use is refused with ``bad_grammar`` and the worker keeps
serving (llama-cpp-python would otherwise add llama.cpp's NULL sampler to its chain: this test
fails loudly if an upgrade changes how a bad grammar is reported)."""

from __future__ import annotations

import json

import msgspec
import pytest

from agent.errors import GrammarError
from agent.runtime.request import GenerateRequest, validate_request
from tests.support.json_schema import problems

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
ALERT = [{"role": "user", "content": "Classify this alert as JSON: smoke in the kitchen."}]


@pytest.fixture
def engine(make_engine, selection_for):
    made = make_engine()
    made.load(selection_for("Q8_0"))
    return made


def final(engine, request_id: str, **fields) -> dict:
    if "prompt" not in fields:
        fields.setdefault("messages", ALERT)
    request = msgspec.convert({"id": request_id, "temperature": 0.0, "seed": 7, "max_tokens": 64,
                               **fields}, GenerateRequest)
    return list(engine.generate(request))[-1]


def test_a_json_schema_reply_parses_and_validates(engine):
    form = {"type": "json_schema", "json_schema": {"name": "alert", "schema": ALERT_SCHEMA}}
    for attempt in range(2):  # the second one uses the worker's cached grammar
        record = final(engine, f"schema-{attempt}", response_format=form)
        assert "error" not in record, record
        assert problems(json.loads(record["text"]), ALERT_SCHEMA) == []


def test_json_object_and_raw_gbnf_constrain_the_reply(engine):
    record = final(engine, "object", response_format={"type": "json_object"}, max_tokens=48)
    assert record["finish_reason"] == "stop", record  # a whole object, not cut at max_tokens
    assert isinstance(json.loads(record["text"]), dict)
    record = final(engine, "gbnf", grammar='root ::= "yes" | "no"')
    assert record["text"] in ("yes", "no")


@pytest.mark.parametrize(("fields", "field"), [
    ({"grammar": "root ::= ("}, "grammar"),  # llama.cpp cannot parse it
    ({"grammar": 'start ::= "x"'}, "grammar"),  # no root rule
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
     "response_format.json_schema"),
])
def test_a_bad_grammar_or_schema_is_refused_and_the_worker_keeps_serving(engine, fields, field):
    record = final(engine, f"bad-{field}", **fields)
    assert record["error"]["code"] == "bad_grammar"
    assert record["error"]["message"].startswith(field)
    assert "error" not in final(engine, "after-bad", prompt="Hello", max_tokens=4)


@pytest.mark.parametrize("fields", [
    {"grammar": " "},
    {"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_object", "json_schema": {"schema": {}}}},
])
def test_structured_output_fields_are_checked_before_the_worker(fields):
    request = msgspec.convert({"id": "x", "prompt": "hi", **fields}, GenerateRequest)
    with pytest.raises(GrammarError) as caught:
        validate_request(request)
    assert caught.value.code == "bad_grammar"
