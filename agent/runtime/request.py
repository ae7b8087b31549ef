"""A generation request and the records a generation produces. Plain data.

The same shape arrives over MQTT (``prompt`` topic), from the CLI and from the fleet API.
Records produced for a request, in order: zero or more chunks ``{id, seq, delta}``, then
exactly one final record, either ``{id, done: True, text, finish_reason, usage, timings}``
or ``{id, done: True, error: {code, message}}``. ``usage`` is ``{prompt_tokens,
completion_tokens}``; ``timings`` is ``{ttft_ms, prefill_tokens_per_s, decode_tokens_per_s,
total_ms}``.

``validate_request`` checks ranges without a model (pure), once, where a request enters
(agent.mqtt.payloads, the CLI); prompt length against the context needs the model's
tokenizer and is checked by the worker, where the prompt is tokenized (``too_long``).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from agent.errors import GrammarError, RequestError


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str


MAX_GRAMMAR_CHARS = 16384  # a GBNF grammar; a JSON schema is bounded by the payload size


class JSONSchemaFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's ``response_format.json_schema``: the reply is JSON valid for ``schema``."""

    name: str = "response"
    schema: dict[str, Any]
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``text`` (unconstrained), ``json_object`` (any JSON object) or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class GenerateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    max_tokens: int | None = None  # None: the runtime's default_max_tokens
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    stop: list[str] = []
    seed: int | None = None
    stream: bool = True
    timeout_s: float | None = None  # None: the runtime's request_timeout_s
    reply_to: str | None = None  # MQTT only: where replies go when no Response Topic was set
    response_format: ResponseFormat | None = None  # structured output, as OpenAI's field
    grammar: str | None = None  # a raw GBNF grammar (llama.cpp's) the reply must match


MAX_STOP_STRINGS = 16  # each stop string is checked against the text after every token


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise RequestError(f"{field}: {message}", field=field)


def validate_request(request: GenerateRequest) -> None:
    """Raise RequestError naming the first field that is out of range. Pure."""
    _check(bool(request.id), "id", "must be a non-empty string")
    _check(
        (request.messages is None) != (request.prompt is None),
        "messages",
        "give exactly one of messages or prompt",
    )
    if request.messages is not None:
        _check(len(request.messages) > 0, "messages", "must not be empty")
    if request.prompt is not None:
        _check(request.prompt != "", "prompt", "must not be empty")
    if request.max_tokens is not None:
        _check(request.max_tokens >= 1, "max_tokens", f"must be >= 1, got {request.max_tokens}")
    _check(0.0 <= request.temperature <= 5.0, "temperature", f"must be in [0, 5], got {request.temperature}")
    _check(0.0 < request.top_p <= 1.0, "top_p", f"must be in (0, 1], got {request.top_p}")
    _check(request.top_k >= 0, "top_k", f"must be >= 0 (0: off), got {request.top_k}")
    _check(0.0 <= request.min_p <= 1.0, "min_p", f"must be in [0, 1], got {request.min_p}")
    _check(
        0.0 < request.repeat_penalty <= 5.0,
        "repeat_penalty",
        f"must be in (0, 5], got {request.repeat_penalty}",
    )
    _check(len(request.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} strings")
    _check(all(request.stop), "stop", "stop strings must not be empty")
    if request.seed is not None:
        _check(0 <= request.seed < 2**32, "seed", f"must be in [0, 2**32), got {request.seed}")
    if request.timeout_s is not None:
        _check(request.timeout_s > 0, "timeout_s", f"must be > 0, got {request.timeout_s}")
    _check_structure(request)


def _check_structure(request: GenerateRequest) -> None:
    """The structured-output fields; the worker checks that llama.cpp can use them."""
    problem = None
    grammar, form = request.grammar, request.response_format
    if grammar is not None and not grammar.strip():
        problem = ("grammar", "must not be empty")
    elif grammar is not None and len(grammar) > MAX_GRAMMAR_CHARS:
        problem = ("grammar", f"at most {MAX_GRAMMAR_CHARS} characters")
    elif form is not None and (form.type == "json_schema") != (form.json_schema is not None):
        problem = ("response_format.json_schema", "give it exactly when type is json_schema")
    elif form is not None and form.type != "text" and grammar is not None:
        problem = ("grammar", "give either grammar or a JSON response_format, not both")
    if problem:
        raise GrammarError(f"{problem[0]}: {problem[1]}", field=problem[0])
