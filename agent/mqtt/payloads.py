"""Payload schemas of the MQTT contract and their validation. Pure: bytes in, structs or errors out.

Used by the daemon (decode ``prompt`` and ``cmd``, encode everything it publishes) and by the
fleet controller (decode ``status``/``meta``/``telemetry``, encode prompts and commands).
Validation errors are :class:`agent.errors.RequestError` (``bad_request``) or
:class:`agent.errors.UnknownOpError` (``unknown_op``) whose message starts with the field path,
e.g. ``messages[0].role: Expected `str`, got `int```. Nothing here does I/O or touches paho.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

import msgspec

from agent.errors import RequestError, UnknownOpError
from agent.mqtt.topics import is_valid_level, is_valid_publish_topic
from agent.runtime.request import GenerateRequest, validate_request

MAX_ID_CHARS = 128  # ids become a topic level and a key of the idempotency record

State = Literal["starting", "ready", "busy", "degraded", "draining", "stopped", "lost"]


class Status(msgspec.Struct, kw_only=True):
    """Retained ``status``; the Will carries the same ``session`` with state ``lost``."""

    state: State
    session: int
    ts: float
    version: str


class _Args(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NoArgs(_Args):
    pass


class SelectArgs(_Args):
    pin: str | None = None  # plan as if this quant were pinned
    profile: str | None = None  # plan with this profile instead of the matched one


class BenchArgs(_Args):
    prompt: str = "Write one sentence about the sea."
    max_tokens: int = 32


class PinArgs(_Args):
    quant: str | None  # None removes the pin


class SetManifestArgs(_Args):
    source: str  # path or http(s) URL of the manifest


# What an agent wheel may weigh; edge-agent's own is well under 1 MiB.
MAX_WHEEL_BYTES = 64 * 1024 * 1024


class UpgradeArgs(_Args):
    """Move the agent to another edge-agent version (agent.upgrade): a wheel from the controller."""

    # A PEP 440 version; it names a directory, so no '/' and nothing else a path could use.
    version: Annotated[str, msgspec.Meta(pattern=r"^[0-9][0-9A-Za-z.+!]{0,63}$")]
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s/?#@]+(/[^\s]*)?$", max_length=2048)]
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}$")]
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_WHEEL_BYTES)]  # the Downloader checks it too


# Every op of the contract and the shape of its ``args``.
OPS: dict[str, type[_Args]] = {
    "reload": NoArgs,
    "select": SelectArgs,
    "fetch": NoArgs,
    "drain": NoArgs,
    "resume": NoArgs,
    "rebirth": NoArgs,
    "bench": BenchArgs,
    "pin": PinArgs,
    "set_manifest": SetManifestArgs,
    "upgrade": UpgradeArgs,
}


class _RawCommand(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    op: str
    args: dict[str, Any] = {}


class Command(msgspec.Struct, kw_only=True):
    id: str
    op: str
    args: _Args


class ReplyHint(msgspec.Struct, kw_only=True):
    """What could be salvaged from an invalid payload to send its error somewhere."""

    id: str | None = None
    reply_to: str | None = None


_NAMED_FIELD = re.compile(r"Object (missing required|contains unknown) field `(.*)`")
_prompt_decoder = msgspec.json.Decoder(GenerateRequest)
_command_decoder = msgspec.json.Decoder(_RawCommand)
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def encode(value: Any) -> bytes:
    """JSON bytes of a struct, dict or list."""
    return _encoder.encode(value)


def _field_error(exc: msgspec.DecodeError, what: str) -> RequestError:
    text = str(exc)
    message, marker, where = text.partition(" - at `$")
    parent = where.rstrip("`").lstrip(".") if marker else ""
    named = _NAMED_FIELD.fullmatch(message)
    if named and named.group(2):  # missing or unknown field: the path is the field itself
        path = f"{parent}.{named.group(2)}" if parent else named.group(2)
        return RequestError(f"{path}: {named.group(1)} field", field=path)
    if marker:
        path = parent or what
        return RequestError(f"{path}: {message}", field=path)
    if isinstance(exc, msgspec.ValidationError):
        return RequestError(f"{what}: {text}", field=what)
    return RequestError(f"{what}: not valid JSON ({text})", field=what)


def check_size(payload: bytes, max_bytes: int) -> None:
    if len(payload) > max_bytes:
        raise RequestError(
            f"payload: {len(payload)} bytes is over mqtt.max_payload_bytes={max_bytes}",
            field="payload",
        )


def _check_id(value: str) -> None:
    if not is_valid_level(value) or len(value) > MAX_ID_CHARS or not value.isprintable():
        raise RequestError(
            f"id: must be 1-{MAX_ID_CHARS} printable characters without '/', '+' or '#'",
            field="id",
        )


def _require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise RequestError(f"{path}: {message}", field=path)


def decode_prompt(payload: bytes, *, max_bytes: int) -> GenerateRequest:
    """A ``prompt`` payload as a GenerateRequest, or RequestError naming the field."""
    check_size(payload, max_bytes)
    try:
        request = _prompt_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise _field_error(exc, "prompt") from None
    _check_id(request.id)
    validate_request(request)
    _require(
        request.reply_to is None or is_valid_publish_topic(request.reply_to),
        "reply_to", "must be a topic without wildcards",
    )
    return request


def decode_command(payload: bytes, *, max_bytes: int) -> Command:
    """A ``cmd`` payload with its ``args`` checked against the op, or RequestError/UnknownOpError."""
    check_size(payload, max_bytes)
    try:
        raw = _command_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise _field_error(exc, "cmd") from None
    _check_id(raw.id)
    args_type = OPS.get(raw.op)
    if args_type is None:
        raise UnknownOpError(
            f"op: unknown op {raw.op[:64]!r}; known: {', '.join(sorted(OPS))}", field="op"
        )
    try:
        args = msgspec.convert(raw.args, args_type)
    except msgspec.ValidationError as exc:
        error = _field_error(exc, "args")
        path = error.details["field"]
        raise RequestError(
            f"args.{error.message}" if path != "args" else error.message, field=f"args.{path}"
        ) from None
    if isinstance(args, BenchArgs):
        _require(1 <= args.max_tokens <= 4096, "args.max_tokens", "must be in [1, 4096]")
    if isinstance(args, PinArgs) and args.quant is not None:
        _require(is_valid_level(args.quant) and len(args.quant) <= 32, "args.quant", "not a quant name")
    if isinstance(args, SetManifestArgs):
        _require(bool(args.source.strip()), "args.source", "must not be empty")
    return Command(id=raw.id, op=raw.op, args=args)


def reply_hint(payload: bytes, *, max_bytes: int) -> ReplyHint:
    """The ``id`` and ``reply_to`` of an invalid payload, where they are themselves usable."""
    if len(payload) > max_bytes:
        return ReplyHint()  # never parse what is over the limit
    try:
        body = _any_decoder.decode(payload)
    except msgspec.DecodeError:
        return ReplyHint()
    if not isinstance(body, dict):
        return ReplyHint()
    found_id = body.get("id")
    reply_to = body.get("reply_to")
    return ReplyHint(
        id=found_id if isinstance(found_id, str) and found_id and len(found_id) <= MAX_ID_CHARS else None,
        reply_to=reply_to if isinstance(reply_to, str) and is_valid_publish_topic(reply_to) else None,
    )


def error_final(request_id: str | None, error: dict[str, Any]) -> dict[str, Any]:
    """A final reply record carrying an error (``error`` as from EdgeAgentError.to_dict())."""
    return {"id": request_id, "done": True, "error": error}


def cmd_result(command_id: str | None, *, result: Any = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    if error is not None:
        return {"id": command_id, "ok": False, "error": error}
    return {"id": command_id, "ok": True, "result": result}


def event(name: str, /, **fields: Any) -> dict[str, Any]:
    """An ``events`` record: ``{event, ts, ...}``."""
    return {"event": name, "ts": round(time.time(), 3), **fields}


def status(state: State, *, session: int, version: str, ts: float | None = None) -> Status:
    return Status(state=state, session=session, ts=round(time.time() if ts is None else ts, 3), version=version)


def decode_status(payload: bytes) -> Status:
    """For controllers: a retained ``status`` payload."""
    try:
        return msgspec.json.decode(payload, type=Status)
    except msgspec.DecodeError as exc:
        raise _field_error(exc, "status") from None
