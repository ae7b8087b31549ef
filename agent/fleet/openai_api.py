"""The fleet as an OpenAI server: /v1/models, /v1/chat/completions and /v1/completions.

Any OpenAI client (the openai SDK, LangChain, Home Assistant, curl) calls the controller as one
server, with an API token as its Bearer key. ``model`` says where a request goes:

- a model id from the manifests (``smollm2-135m-instruct``): a ready device that has that model
  loaded, fewest queued requests first (its last telemetry plus what this controller sent it
  since), then the highest measured decode tok/s. When that device answers ``busy``, or goes
  away before its first token, the request goes to the next one;
- ``device/<id>``: that device only;
- ``pool/<name>``: the pool's shared subscription; the broker gives it to one member (503 at
  once when no member is ready: the broker would otherwise hold it until the timeout).

The device's MQTT records become OpenAI's shapes: with ``stream``, SSE ``chat.completion.chunk``
(or ``text_completion``) events ending with ``data: [DONE]``, else one JSON object. Nothing goes
to the client before the device's first record, so whatever fails before the first token is a
plain HTTP error (every device busy: 429 with Retry-After; the model loaded nowhere: 503, or
404 when no device has it at all) and failover is invisible to the client. Errors have OpenAI's
shape, ``{"error": {message, type, param, code}}``, with the project's stable codes.

Request bodies are parsed with msgspec into bounded structs. Routing (a registry snapshot and a
sort) and publishing run in a worker thread, never on the event loop. A request crosses:
uvicorn's loop -> a worker thread (route, publish) -> broker -> device -> broker -> the MQTT
I/O thread -> the loop (``call_soon_threadsafe``), one hand-off each way.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agent.config import FleetConfig
from agent.errors import EdgeAgentError, RateLimitedError, TooLargeError
from agent.fleet.bodies import read_bounded
from agent.fleet.controller import FleetController, SentPrompt
from agent.fleet.view import device_row
from agent.log import get_logger
from agent.runtime.request import ResponseFormat

log = get_logger(__name__)

MAX_BODY_BYTES = 1024 * 1024
FIRST_RECORD_S = 330.0  # queueing on a device plus prefill; the device's own timeout ends it sooner
RECORD_GAP_S = 330.0  # between two records of one reply
GONE_CHECK_S = 0.25  # how often a request waiting for its first token looks at its device
BUSY_RETRY_AFTER_S = 1
SERVING_STATES = frozenset({"ready", "busy"})  # effective states that take prompts
GONE_STATES = frozenset({"lost", "stopped", "draining", "degraded"})  # reported by the device
FINISH_REASONS = frozenset({"stop", "length"})
MAX_BUFFERED_RECORDS = 4096  # per reply, waiting for its client; each is at most one MQTT payload

STATUS = {
    "bad_request": 400, "too_long": 400, "bad_grammar": 400, "unauthorized": 401,
    "model_not_found": 404, "busy": 429, "rate_limited": 429, "worker_crashed": 502,
    "no_model": 503, "timeout": 504, "bad_reply": 502, "too_large": 413,
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error"}

Short = Annotated[str, msgspec.Meta(max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_BODY_BYTES)]


Count = Annotated[int, msgspec.Meta(ge=0, le=10**9)]


class _RecordUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0


class _RecordError(msgspec.Struct, kw_only=True):
    code: Short = "internal"
    message: Text = ""


class ReplyRecord(msgspec.Struct, kw_only=True):
    """What the handlers read of a device's reply record (other fields pass untouched)."""

    done: bool = False
    delta: Text = ""
    text: Text = ""
    finish_reason: Short | None = None
    usage: _RecordUsage | None = None
    error: _RecordError | None = None


def checked_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record if its known fields have their types, else a final ``bad_reply``: a device
    wrote it, and a wrong type must not become a 500 or a broken stream."""
    try:
        msgspec.convert(record, ReplyRecord)
    except msgspec.ValidationError as exc:
        return {"done": True, "error": {"code": "bad_reply",
                                        "message": f"the device's reply record: {exc}"[:500]}}
    return record


class TextPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["text"]
    text: Text


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], msgspec.Meta(max_length=64)]
    name: Short | None = None


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False


class _Request(msgspec.Struct, kw_only=True):
    """What /v1/chat/completions and /v1/completions share. Unknown fields are ignored, as
    OpenAI's server does (SDKs send new ones); the ones that would change the answer are not."""

    model: Short
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    stop: Short | Annotated[list[Short], msgspec.Meta(max_length=16)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, lt=2**32)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1  # one choice: one device, one generation
    user: Short | None = None
    response_format: ResponseFormat | None = None
    # The MQTT contract's sampling extensions (llama.cpp's samplers).
    top_k: Annotated[int, msgspec.Meta(ge=0, le=100_000)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0, le=5)] | None = None
    grammar: Annotated[str, msgspec.Meta(max_length=16384)] | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] | None = None
    tools: list[Any] | None = None  # refused when given: no device runs tools


class ChatRequest(_Request, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1, max_length=512)]
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None


class CompletionRequest(_Request, kw_only=True):
    prompt: Text | Annotated[list[Text], msgspec.Meta(min_length=1, max_length=1)]


class PromptTarget(msgspec.Struct, kw_only=True):
    """POST /api/prompt's own field; the rest of the body is the MQTT contract's prompt, checked
    by the contract's decoder (GenerateRequest) when it is sent."""

    target: Short


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, code: str, message: str, *, param: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.retry_after_s = code, message, param, retry_after_s

    @classmethod
    def of(cls, error: EdgeAgentError) -> APIError:
        return cls(error.code, error.message, param=error.details.get("field"),
                   retry_after_s=getattr(error, "retry_after_s", None))

    def response(self) -> JSONResponse:
        status = STATUS.get(self.code, 500)
        body = {"error": {"message": self.message, "type": ERROR_TYPES.get(status, "server_error"),
                          "param": self.param, "code": self.code}}
        response = JSONResponse(body, status_code=status)
        if self.retry_after_s is not None:
            response.headers["retry-after"] = str(self.retry_after_s)
        return response


@dataclass(frozen=True)
class Target:
    kind: Literal["model", "device", "pool"]
    name: str


def parse_target(model: str) -> Target:
    kind, slash, name = model.partition("/")
    if slash and kind in ("device", "pool"):
        if not name:
            raise APIError("bad_request", f"model: {kind}/ needs a name", param="model")
        return Target(kind, name)  # type: ignore[arg-type]
    return Target("model", model)


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def prompt_body(request: ChatRequest | CompletionRequest) -> dict[str, Any]:
    """The MQTT ``prompt`` payload (less id and reply topic) that asks for this request."""
    body: dict[str, Any] = {"stream": True}  # chunks always: the first one ends failover
    if isinstance(request, ChatRequest):
        body["messages"] = [{"role": "system" if m.role == "developer" else m.role,
                             "content": _text(m.content)} for m in request.messages]
        max_tokens = request.max_completion_tokens or request.max_tokens
    else:
        body["prompt"] = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        max_tokens = request.max_tokens
    if request.tools:
        raise APIError("bad_request", "tools: devices do not run tools", param="tools")
    sampling = {"max_tokens": max_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "seed": request.seed, "top_k": request.top_k,
                "min_p": request.min_p, "repeat_penalty": request.repeat_penalty,
                "grammar": request.grammar, "timeout_s": request.timeout_s}
    body.update({name: value for name, value in sampling.items() if value is not None})
    if request.stop is not None:
        body["stop"] = [request.stop] if isinstance(request.stop, str) else request.stop
    if request.response_format is not None and request.response_format.type != "text":
        body["response_format"] = msgspec.to_builtins(request.response_format)
    return body


class Router:
    """Which devices serve a model id now, best first, from the registry's in-memory records.

    Called from worker threads; ``_sent`` (requests this controller has in flight per device,
    which the device's telemetry reports only seconds later) is guarded by its lock."""

    def __init__(self, controller: FleetController, config: FleetConfig) -> None:
        self.registry = controller.registry
        self.config = config
        self._sent: dict[str, int] = {}
        self._lock = threading.Lock()

    def rows(self) -> list[dict[str, Any]]:
        now = time.time()
        return [device_row(record, now, default_interval_s=self.config.default_telemetry_interval_s,
                           stale_after_intervals=self.config.stale_after_intervals)
                for record in self.registry.snapshot()]

    def claim(self, model_id: str, exclude: frozenset[str]) -> tuple[str | None, bool]:
        """The best device for ``model_id``, counted as sent to (``end`` gives it back), and
        whether any device has the model at all. Ranking and counting are one step, so two
        requests at once never both take the same idle device."""
        rows = self.rows()
        known = any(row["model"] == model_id for row in rows)
        serving = [row for row in rows if row["model"] == model_id
                   and row["state"] in SERVING_STATES and row["id"] not in exclude]
        with self._lock:
            ranked = self._ranked(serving)
            if not ranked:
                return None, known
            device_id = ranked[0]["id"]
            self._sent[device_id] = self._sent.get(device_id, 0) + 1
        return device_id, known

    def _ranked(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Fewest queued (telemetry + sent since), then the fastest decode; with the lock."""
        return sorted(rows, key=lambda row: ((row["queue_depth"] or 0) + self._sent.get(row["id"], 0),
                                             -(row["decode_tps"] or 0.0), row["id"]))

    def begin(self, device_id: str) -> None:
        with self._lock:
            self._sent[device_id] = self._sent.get(device_id, 0) + 1

    def end(self, device_id: str) -> None:
        with self._lock:
            left = self._sent.get(device_id, 0) - 1
            if left > 0:
                self._sent[device_id] = left
            else:
                self._sent.pop(device_id, None)

    def pool_states(self, pool: str) -> set[str]:
        """The effective states of the pool's members."""
        return {row["state"] for row in self.rows() if row["pool"] == pool}

    def servable(self) -> list[dict[str, Any]]:
        """/v1/models: each model id, device and pool that takes a prompt now."""
        counts: dict[str, int] = {}
        for row in self.rows():
            if row["state"] not in SERVING_STATES:
                continue
            names = [f"device/{row['id']}"]
            if row["model"]:
                names.append(row["model"])
            if row["pool"]:
                names.append(f"pool/{row['pool']}")
            for name in names:
                counts[name] = counts.get(name, 0) + 1
        return [{"id": name, "object": "model", "created": 0, "owned_by": "edge-fleet",
                 "devices": count} for name, count in sorted(counts.items())]


class ReplyBuffer:
    """One reply's records, handed from the dispatch thread to the loop.

    At most MAX_BUFFERED_RECORDS wait for a client that reads slower than the device writes
    (or not at all): past that the reply ends with ``bad_reply`` and later records are
    dropped, so a device that floods one reply cannot grow the controller's memory."""

    def __init__(self, loop: asyncio.AbstractEventLoop, source: str) -> None:
        self.loop = loop
        self.source = source  # for the log: the device or pool asked
        self.records: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ended = False  # the loop's: a final is queued, nothing more goes in

    def put(self, record: dict[str, Any]) -> None:  # the dispatch thread
        self.loop.call_soon_threadsafe(self._queue, checked_record(record))

    def _queue(self, record: dict[str, Any]) -> None:  # the loop
        if self._ended:
            return
        if self.records.qsize() >= MAX_BUFFERED_RECORDS - 1 and not record.get("done"):
            log.warning("reply_overflow", source=self.source, buffered=self.records.qsize())
            record = {"done": True, "error": {"code": "bad_reply", "message": (
                f"the device sent more than {MAX_BUFFERED_RECORDS} records ahead of the "
                "client; the rest of the reply was dropped")}}
        self._ended = bool(record.get("done"))
        self.records.put_nowait(record)


class _Exchange(ReplyBuffer):
    """One prompt on one device (or pool), and what routing it took."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target: str) -> None:
        super().__init__(loop, target)
        self.device: str | None = None  # None for a pool: the broker picks the device
        self.sent: SentPrompt | None = None


class Dispatcher:
    """Routing and failover: sends a prompt to the device (or pool) a target names and waits
    for its first record, trying the next device where a model id allows; then hands out the
    exchange's records. ``close`` gives back what a send took (its waiter, its device's count)."""

    def __init__(self, controller: FleetController, router: Router) -> None:
        self.controller = controller
        self.registry = controller.registry
        self.router = router

    async def start(self, target: Target, body: dict[str, Any]
                    ) -> tuple[_Exchange, dict[str, Any]]:
        """Send the prompt and wait for its first record, failing over where the target allows.
        Returns the exchange and a first record that is not an error; raises APIError when
        nothing serves the request (an error the device answered at once included)."""
        loop = asyncio.get_running_loop()
        tried: dict[str, str] = {}  # device -> why it was left: busy | gone
        while True:
            exchange = _Exchange(loop, f"{target.kind}/{target.name}")
            try:
                await run_in_threadpool(self._send, exchange, target, body, tried)
                first = await self._first(exchange)
            except BaseException:  # nothing serves it, a bad prompt, or the client went away
                await self.close(exchange)
                raise
            code = "gone" if first is None else _error_code(first)
            if code is None:
                return exchange, first
            await self.close(exchange)
            device = exchange.device
            if code not in ("busy", "gone") or target.kind != "model" or device is None:
                raise self._refusal(target, code, first)
            log.info("openai_failover", model=target.name, device=device, why=code)
            tried[device] = code

    def _send(self, exchange: _Exchange, target: Target, body: dict[str, Any],
              tried: dict[str, str]) -> None:
        """Worker thread, one hop for both: pick the device and publish the prompt to it, with
        a fresh id for each device tried."""
        request = {**body, "id": uuid.uuid4().hex}
        if target.kind == "pool":
            self._check_pool(target.name)
            exchange.sent = self.controller.send_pool_prompt(target.name, request, exchange.put)
            return
        device = self._pick(target, tried)
        exchange.source = f"device/{device}"
        try:
            exchange.sent = self.controller.send_prompt(device, request, exchange.put)
        except BaseException:
            self.router.end(device)
            raise
        exchange.device = device

    def _pick(self, target: Target, tried: dict[str, str]) -> str:
        """The device to send to (counted as sent to: ``end`` gives it back); APIError when
        none can take it."""
        if target.kind == "device":
            record = self.registry.devices.get(target.name)
            if record is None:
                raise APIError("model_not_found", f"model: no device {target.name!r} is known",
                               param="model")
            if record.state in GONE_STATES:
                raise APIError("no_model", f"device {target.name!r} is {record.state}")
            self.router.begin(target.name)
            return target.name
        device, known = self.router.claim(target.name, frozenset(tried))
        if device is not None:
            return device
        if tried and all(why == "busy" for why in tried.values()):
            raise APIError("busy", f"every device with {target.name!r} is busy; retry shortly",
                           retry_after_s=BUSY_RETRY_AFTER_S)
        if known:
            raise APIError("no_model", f"no device with {target.name!r} is ready now")
        raise APIError("model_not_found", f"model: no device has {target.name!r}; "
                       "GET /v1/models lists what is servable", param="model")

    def _check_pool(self, pool: str) -> None:
        """APIError unless a member of ``pool`` takes prompts now: with none, the broker would
        hold the prompt and the client would wait for the timeout."""
        states = self.router.pool_states(pool)
        if not states:
            raise APIError("model_not_found", f"model: no device is in pool {pool!r}",
                           param="model")
        if not states & SERVING_STATES:
            raise APIError("no_model", f"no member of pool {pool!r} is ready now")

    @staticmethod
    def _refusal(target: Target, code: str, first: dict[str, Any] | None) -> APIError:
        if first is None:
            return APIError("no_model", f"{target.kind} {target.name!r} went away before "
                            "answering; send the request again")
        error = first["error"]
        details = error.get("details")
        return APIError(code, str(error.get("message", code)),
                        param=details.get("field") if isinstance(details, dict) else None,
                        retry_after_s=BUSY_RETRY_AFTER_S if code == "busy" else None)

    async def _first(self, exchange: _Exchange) -> dict[str, Any] | None:
        """The first record, or None when the device went away before it."""
        waited = 0.0
        while waited < FIRST_RECORD_S:
            try:
                return await asyncio.wait_for(exchange.records.get(), GONE_CHECK_S)
            except asyncio.TimeoutError:
                waited += GONE_CHECK_S
            if exchange.device is not None:
                record = self.registry.devices.get(exchange.device)
                if record is None or record.state in GONE_STATES:
                    return None
        return _timeout_record(FIRST_RECORD_S)

    async def close(self, exchange: _Exchange) -> None:
        if exchange.sent is not None:
            self.controller.remove_waiter(exchange.sent.key)
            exchange.sent = None
            if exchange.device is not None:
                self.router.end(exchange.device)

    async def records(self, exchange: _Exchange, first: dict[str, Any]
                      ) -> AsyncIterator[dict[str, Any]]:
        record = first
        while True:
            yield record
            if record.get("done"):
                return
            try:  # without a timer when the next token is already there (wait_for makes a task)
                record = exchange.records.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    record = await asyncio.wait_for(exchange.records.get(), RECORD_GAP_S)
                except asyncio.TimeoutError:
                    record = _timeout_record(RECORD_GAP_S)


class OpenAIAPI:
    """The /v1 handlers, and ``POST /api/prompt``: the project's prompt (NDJSON records, as
    /api/devices/{id}/prompt) to any target, for the dashboard and ``edge-agent fleet prompt``."""

    def __init__(self, controller: FleetController, config: FleetConfig,
                 authorized: Callable[[Request], Awaitable[bool]],
                 authorize_dashboard: Callable[[Request], Awaitable[Response | None]]) -> None:
        self.dispatcher = Dispatcher(controller, Router(controller, config))
        self.router = self.dispatcher.router
        self._authorized = authorized
        self._authorize_dashboard = authorize_dashboard

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/api/prompt", self.api_prompt, methods=["POST"]),
        ]

    # --- handlers ------------------------------------------------------------------------

    async def _guard(self, request: Request) -> None:
        try:
            ok = await self._authorized(request)
        except RateLimitedError as exc:
            raise APIError.of(exc) from None
        if not ok:
            raise APIError("unauthorized", "send Authorization: Bearer <API token>")

    async def models(self, request: Request) -> Response:
        try:
            await self._guard(request)
        except APIError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": await run_in_threadpool(self.router.servable)})

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, ChatRequest)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, CompletionRequest)

    async def _complete(self, request: Request, kind: type[ChatRequest | CompletionRequest]
                        ) -> Response:
        try:
            await self._guard(request)
            parsed = await self._parse(request, kind)
            body = prompt_body(parsed)
            exchange, first = await self.dispatcher.start(parse_target(parsed.model), body)
        except APIError as exc:
            return exc.response()
        except EdgeAgentError as exc:
            return APIError.of(exc).response()
        reply = _Reply(parsed, exchange)
        headers = {"cache-control": "no-store"}
        if exchange.device:
            headers["x-edge-device"] = exchange.device
        if parsed.stream:
            return StreamingResponse(self._stream(reply, first), media_type="text/event-stream",
                                     headers=headers)
        try:
            final = await self._final(reply, first)
        finally:
            await self.dispatcher.close(exchange)
        if "error" in final:
            return APIError(final["error"].get("code", "internal"),
                            final["error"].get("message", "")).response()
        return JSONResponse(reply.whole(final), headers=headers)

    async def api_prompt(self, request: Request) -> Response:
        """``{target, ...prompt fields}``: target as /v1's ``model`` (a model id,
        ``device/<id>``, ``pool/<name>``); the reply's records as NDJSON, errors before the
        first record as an HTTP error."""
        if denied := await self._authorize_dashboard(request):
            return denied
        try:
            raw = await self._body(request)
            target = _decode(raw, PromptTarget).target
            body = _decode(raw, dict[str, Any])
            for own in ("target", "id", "reply_to"):  # each device tried gets a fresh id
                body.pop(own, None)
            exchange, first = await self.dispatcher.start(parse_target(target),
                                                          {**body, "stream": True})
        except APIError as exc:
            return exc.response()
        except EdgeAgentError as exc:
            return APIError.of(exc).response()

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for record in self.dispatcher.records(exchange, first):
                    yield msgspec.json.encode(record) + b"\n"
            finally:
                await self.dispatcher.close(exchange)

        headers = {"cache-control": "no-store"}
        if exchange.device:
            headers["x-edge-device"] = exchange.device
        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)

    async def _parse(self, request: Request, kind: type[msgspec.Struct]) -> Any:
        return _decode(await self._body(request), kind)

    async def _body(self, request: Request) -> bytes:
        try:
            return await read_bounded(request, MAX_BODY_BYTES)
        except TooLargeError as exc:
            raise APIError.of(exc) from None

    # --- responses ------------------------------------------------------------------------

    async def _final(self, reply: _Reply, first: dict[str, Any]) -> dict[str, Any]:
        async for record in self.dispatcher.records(reply.exchange, first):
            if record.get("done"):
                return record
        raise AssertionError("unreachable: records ends with a final record")

    async def _stream(self, reply: _Reply, first: dict[str, Any]) -> AsyncIterator[bytes]:
        try:
            yield reply.event(reply.chunk(role=True))
            async for record in self.dispatcher.records(reply.exchange, first):
                if not record.get("done"):
                    yield reply.event(reply.chunk(text=str(record.get("delta", ""))))
                    continue
                if "error" in record:
                    error = APIError(record["error"].get("code", "internal"),
                                     record["error"].get("message", ""))
                    yield reply.event(msgspec.json.decode(error.response().body))
                else:
                    yield reply.event(reply.chunk(finish=_finish_reason(record)))
                    if reply.include_usage:
                        yield reply.event(reply.usage_chunk(record))
                yield b"data: [DONE]\n\n"
                return
        finally:
            await self.dispatcher.close(reply.exchange)


class _Reply:
    """OpenAI's objects for one request: chat.completion(.chunk) or text_completion."""

    def __init__(self, request: ChatRequest | CompletionRequest, exchange: _Exchange) -> None:
        self.chat = isinstance(request, ChatRequest)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.model = request.model
        self.created = int(time.time())
        self.exchange = exchange
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, *, text: str = "", role: bool = False, finish: str | None = None
              ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if finish is None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, final: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": _usage(final)}

    def whole(self, final: dict[str, Any]) -> dict[str, Any]:
        text = str(final.get("text", ""))
        finish = _finish_reason(final)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(final)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice], "usage": _usage(final)}

    @staticmethod
    def event(body: dict[str, Any]) -> bytes:
        return b"data: " + msgspec.json.encode(body) + b"\n\n"


def _decode(raw: bytes, kind: Any) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError as exc:
        text, _, where = str(exc).partition(" - at `$")
        param = where.rstrip("`").lstrip(".") or None
        raise APIError("bad_request", f"{param or 'body'}: {text}"[:500], param=param) from None


def _error_code(record: dict[str, Any]) -> str | None:
    error = record.get("error") if record.get("done") else None
    return error.get("code") if isinstance(error, dict) else None


def _finish_reason(final: dict[str, Any]) -> str:
    reason = final.get("finish_reason")
    return reason if reason in FINISH_REASONS else "stop"


def _usage(final: dict[str, Any]) -> dict[str, int]:
    usage = final.get("usage") if isinstance(final.get("usage"), dict) else {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _timeout_record(seconds: float) -> dict[str, Any]:
    return {"done": True, "error": {"code": "timeout",
                                    "message": f"no reply from the device within {seconds:g} s"}}


