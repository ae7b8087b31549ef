"""A generation request and the records a generation produces. Plain data.

The same shape arrives over MQTT (``prompt`` topic), from the CLI and from the fleet API.
Records produced for a request, in order: zero or more chunks ``{id, seq, delta}``, then
exactly one final record, either ``{id, done: True, text, finish_reason, usage, timings}``
or ``{id, done: True, error: {code, message}}``.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str


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
