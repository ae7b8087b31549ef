"""The controller's HTTP side: dashboard pages, JSON API, SSE, /metrics and model hosting.

Starlette on uvicorn's event loop. Handlers read the registry's in-memory device records
on the loop; SQLite reads and writes, manifest parsing and publishing run in a worker thread
(``run_in_threadpool``), since nothing slow may hold the loop. Handlers act through
FleetController (send_command, send_prompt); the bridge from the controller's threads (paho's,
for reply records) into a streaming response is an asyncio queue fed with
``loop.call_soon_threadsafe``. /v1 (the OpenAI API) and /api/prompt live in agent.fleet.openai_api.

Auth: every page and API call needs a dashboard session (cookie, HttpOnly, SameSite=Strict)
or a bearer token; a POST with a session must also carry the session's CSRF token (form
field ``csrf`` or header ``X-CSRF-Token``), a POST with a bearer token needs none because
browsers never attach it on their own. Failed logins and wrong bearer tokens count per client
address (auth.FailureLimiter; past the limit: 429 rate_limited), and the slow hash checks
(scrypt logins, old-style token hashes) run in a worker thread one at a time, never on the
loop. /files (model hosting) and /api/health are public by default, /metrics when configured. Everything the pages use is served from /static:
no CDN. This module must not touch MQTT or SQL directly.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable
from urllib.parse import quote

import msgspec
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from agent.catalog.manifest import MAX_MANIFEST_BYTES
from agent.catalog.signing import SIGNATURE_SUFFIX
from agent.config import FleetConfig
from agent.errors import EdgeAgentError, RateLimitedError, RequestError, TooLargeError, shown
from agent.fleet.bodies import read_bounded, spool_body
from agent.fleet.auth import Authenticator, FailureLimiter, Session
from agent.fleet.controller import FleetController
from agent.fleet.hosting import MAX_BUILD_FILES, ModelDirectory
from agent.fleet.metrics import render_metrics
from agent.fleet.openai_api import OpenAIAPI, ReplyBuffer
from agent.fleet.plan import plan_rollout
from agent.fleet.registry import telemetry_point
from agent.fleet.schemas import Candidates
from agent.fleet.rollout import AgentWheelRef, RolloutSpec
from agent.fleet.table import (
    MAX_PER_PAGE,
    QUERY_FIELDS,
    FactsCache,
    TableQuery,
    parse_query,
    table_page,
)
from agent.fleet.view import (
    command_text,
    device_row,
    event_text,
    fleet_summary,
    format_bytes,
    hardware,
)
from agent.fleet.wheel_api import WheelAPI
from agent.fleet.wheelhouse import WheelHouse
from agent.log import get_logger

log = get_logger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "edge_fleet_session"
LOGIN_COOKIE = "edge_fleet_login"  # double-submit token that protects the login form itself
STREAM_TICK_S = 1.0
# Past this many devices the fleet stream slows to BIG_FLEET_TICK_S: each tick builds, filters
# and sorts the whole fleet's table in a thread to send one page of it.
BIG_FLEET_ROWS = 500
BIG_FLEET_TICK_S = 2.0
# The fleet chart: at most this many buckets over a window of at most HISTORY_MAX_WINDOW_S,
# and one answer per window reused for HISTORY_CACHE_S (each query reads the window's samples).
HISTORY_BUCKETS = 60
HISTORY_MAX_WINDOW_S = 7 * 86400
HISTORY_CACHE_S = 5.0
HISTORY_CACHE_ENTRIES = 8  # the dashboard offers a few windows; any other is rare
# A JSON API body: a manifest inline is the largest there is.
MAX_JSON_BODY_BYTES = MAX_MANIFEST_BYTES + 64 * 1024
PROMPT_GRACE_S = 30.0  # on top of the request's own timeout, for queueing on the device
HTTP_STATUS = {
    "bad_request": 400,
    "bad_filter": 400,
    "too_long": 400,
    "unknown_op": 400,
    "manifest_invalid": 400,
    "no_fit": 409,
    "in_rollout": 409,
    "too_large": 413,
    "busy": 429,
    "rate_limited": 429,
}
# Slow hash checks (logins, old-style token hashes) run one at a time in a worker thread; past
# this many waiting, a caller is turned away at once, so neither the wait nor memory grows.
SLOW_CHECKS_QUEUED = 8
LIMITED_DELAY_S = 1.0  # a limited address waits this long for its 429
EVENT_ID_MAX = 2**63 - 1  # SQLite's INTEGER


class ManifestPublish(msgspec.Struct, forbid_unknown_fields=True):
    """POST /api/manifests: a manifest document, or what to build one from."""

    name: Annotated[str, msgspec.Meta(max_length=128)]
    manifest: dict[str, Any] | Annotated[str, msgspec.Meta(max_length=MAX_MANIFEST_BYTES)] | None = None
    model_dir: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    files: Annotated[list[Annotated[str, msgspec.Meta(max_length=128)]],
                     msgspec.Meta(max_length=MAX_BUILD_FILES)] | None = None


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class _SessionLoader:
    """ASGI middleware: the dashboard session a request's cookie names is read (or re-read)
    from the registry in a thread before the handler runs, so handlers find it in memory and
    no query runs on the loop (a login on another controller is then valid here).

    A cookie the registry does not know counts as a failed attempt of its address, as a wrong
    token does: random cookies cannot keep the thread pool and the database busy."""

    def __init__(self, app: Any, auth: Authenticator, failures: FailureLimiter) -> None:
        self.app = app
        self.auth = auth
        self.failures = failures

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            connection = HTTPConnection(scope)
            session_id = connection.cookies.get(SESSION_COOKIE)
            host = connection.client.host if connection.client else None
            if self.auth.needs_load(session_id) and self.failures.take(host) == 0:
                if await run_in_threadpool(self.auth.load_session, session_id) is None:
                    self.failures.failed(host)
                else:
                    self.failures.refund(host)
        await self.app(scope, receive, send)


class FleetWeb:
    def __init__(
        self, controller: FleetController, config: FleetConfig, models: ModelDirectory | None = None
    ) -> None:
        self.controller = controller
        self.config = config
        self.registry = controller.registry
        self.models = models or ModelDirectory(
            config.model_dir, source_roots=config.publish_roots,
            upload_max_bytes=config.upload_max_bytes)
        self.auth = Authenticator(
            config.auth.admin_password_hash,
            config.auth.api_token_hashes,
            session_max_age_s=config.auth.session_max_age_s,
            sessions=controller.registry,
        )
        # Both owned by the event loop: only handlers touch them.
        self.failures = FailureLimiter(
            config.auth.failed_auth_limit, config.auth.failed_auth_window_s
        )
        self._slow_gate = asyncio.Semaphore(1)
        self._slow_queued = 0
        self._history: dict[int, tuple[float, dict[str, Any]]] = {}  # window_s -> (at, answer)
        self.facts = FactsCache()  # read from worker threads (see FactsCache)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["bytes"] = format_bytes
        self.templates.env.filters["ago"] = lambda ts: _ago(ts)
        self.openai = OpenAIAPI(controller, config, self.bearer_authorized, self._authorize)
        wheels = WheelHouse(config.wheel_dir, upload_max_bytes=config.upload_max_bytes)
        self.wheels = WheelAPI(wheels, controller.signing_key, config, self._authorize,
                               self._base_url)
        self.app = Starlette(
            routes=self._routes(),
            exception_handlers={EdgeAgentError: self._on_error},
            middleware=[Middleware(_SessionLoader, auth=self.auth, failures=self.failures)],
        )

    # --- plumbing ------------------------------------------------------------------------

    def _routes(self) -> list:
        return [
            Route("/", self.fleet_page),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login_submit, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/devices/{device_id}", self.device_page),
            Route("/models", self.models_page),
            Route("/models/publish", self.publish_form, methods=["POST"]),
            Route("/models/build", self.build_form, methods=["POST"]),
            Route("/rollouts/{rollout_id}", self.rollout_page),
            Route("/ui/stream", self.ui_stream),
            Route("/api/health", self.health),
            Route("/api/signing-key", self.signing_key),
            Route("/api/devices", self.api_devices),
            Route("/api/fleet/history", self.api_fleet_history),
            Route("/api/devices/{device_id}", self.api_device),
            Route("/api/devices/{device_id}/telemetry", self.api_telemetry),
            Route("/api/devices/{device_id}/events", self.api_events),
            Route("/api/devices/{device_id}/commands", self.api_commands),
            Route("/api/devices/{device_id}/prompt", self.api_prompt, methods=["POST"]),
            Route("/api/devices/{device_id}/cmd", self.api_cmd, methods=["POST"]),
            Route("/api/commands/{command_id}", self.api_command),
            Route("/api/manifests", self.api_manifests, methods=["GET", "POST"]),
            Route("/api/model-files/{name}", self.api_upload, methods=["PUT"]),
            Route("/api/rollouts", self.api_rollouts, methods=["GET", "POST"]),
            Route("/api/rollouts/{rollout_id}", self.api_rollout),
            Route("/api/rollouts/{rollout_id}/rollback", self.api_rollback, methods=["POST"]),
            Route("/api/rollouts/{rollout_id}/events", self.api_rollout_events),
            Route("/metrics", self.metrics),
            Route("/files/{name}", self.files, methods=["GET", "HEAD"]),
            *self.openai.routes(),
            *self.wheels.routes(),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ]

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EdgeAgentError)
        response = error_response(HTTP_STATUS.get(exc.code, 500), exc.code, exc.message)
        if isinstance(exc, RateLimitedError):
            response.headers["retry-after"] = str(exc.retry_after_s)
        return response

    def _session(self, request: Request) -> Session | None:
        return self.auth.session(request.cookies.get(SESSION_COOKIE))

    async def _attempt(self, host: str | None, check: Callable[[], Awaitable[Any]]) -> Any:
        """``check()`` as one of ``host``'s attempts: taken before it runs, so concurrent tries
        cannot all pass a spent budget, and given back when it passes or never ran."""
        retry_after = self.failures.take(host)
        if retry_after:
            # A timer, not work: an attacker's tight loop of 429s would otherwise cost the loop
            # as much as any request flood; this way each limited connection costs ~1 req/s.
            await asyncio.sleep(LIMITED_DELAY_S)
            raise RateLimitedError(
                f"too many failed logins or tokens from this address; retry in {retry_after} s",
                retry_after_s=retry_after,
            )
        try:
            result = await check()
        except RateLimitedError:  # too many checks queued: this one never ran
            self.failures.refund(host)
            raise
        if result:
            self.failures.refund(host)
        return result

    def _failed(self, host: str | None, what: str) -> None:
        # One line when an address runs out of attempts, not one per try or per refill.
        if self.failures.failed(host):
            log.warning("auth_rate_limited", client=host, after=what)

    async def _slow_check(self, check: Any, secret: str) -> Any:
        """``check(secret)`` (a slow hash) in a worker thread, one at a time: the loop stays
        free, and a flood holds one core and one scrypt's memory, not one per request."""
        if self._slow_queued >= SLOW_CHECKS_QUEUED:
            raise RateLimitedError("too many logins in progress; retry in a second", retry_after_s=1)
        self._slow_queued += 1
        try:
            async with self._slow_gate:
                return await run_in_threadpool(check, secret)
        finally:
            self._slow_queued -= 1

    async def _token_ok(self, token: str) -> bool:
        if self.auth.token_matches(token):
            return True
        return self.auth.has_slow_tokens and bool(
            await self._slow_check(self.auth.check_slow_token, token)
        )

    async def bearer_authorized(self, request: Request) -> bool:
        """For /v1: whether the request carries a valid API token. No session cookie counts
        there (the OpenAI API is for programs, and a cookie would need CSRF checks); a wrong
        token counts against the address as everywhere (RateLimitedError past the limit)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        host = _client_host(request)
        if await self._attempt(host, lambda: self._token_ok(token.strip())):
            return True
        self._failed(host, "token")
        return False

    async def _authorize(self, request: Request, form: Any = None) -> Response | None:
        """None when the caller may proceed; else the 401/403 response. A wrong bearer token
        counts against the client's address; a limited address gets 429 (RateLimitedError)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            host = _client_host(request)
            if await self._attempt(host, lambda: self._token_ok(token.strip())):
                return None
            self._failed(host, "token")
        session = self._session(request)
        if session is None:
            return error_response(
                401, "unauthorized", "log in or send Authorization: Bearer <token>"
            )
        if request.method not in ("GET", "HEAD"):
            offered = request.headers.get("x-csrf-token") or (
                form.get("csrf") if form is not None else None
            )
            if offered is not None and not (isinstance(offered, str) and offered.isascii()):
                raise _bad("X-CSRF-Token: must be the ASCII token from the page", "csrf")
            if not self.auth.csrf_matches(session, offered):
                return error_response(
                    403, "csrf_failed", "missing or wrong CSRF token; reload the page"
                )
        return None

    def _page_guard(self, request: Request) -> Session | Response:
        session = self._session(request)
        if session is None:
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        return session

    def _render(self, request: Request, name: str, session: Session, **context: Any) -> Response:
        context.update(csrf=session.csrf, user=session.user, page=name.removesuffix(".html"))
        response = self.templates.TemplateResponse(request, name, context)
        response.headers["cache-control"] = "no-store"
        response.headers["x-frame-options"] = "DENY"
        response.headers["content-security-policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
        )
        return response

    def _rows(self) -> list[dict[str, Any]]:
        now = time.time()
        return [
            device_row(
                record,
                now,
                default_interval_s=self.config.default_telemetry_interval_s,
                stale_after_intervals=self.config.stale_after_intervals,
            )
            for record in self.registry.snapshot()
        ]

    def _table(self, query: TableQuery) -> dict[str, Any]:
        """One page of the fleet table. Builds every row: call it in a thread."""
        now = time.time()
        records = self.registry.snapshot()
        pairs = [
            (
                record,
                device_row(
                    record,
                    now,
                    default_interval_s=self.config.default_telemetry_interval_s,
                    stale_after_intervals=self.config.stale_after_intervals,
                ),
            )
            for record in records
        ]
        return table_page(pairs, query, self.facts)

    def _record(self, device_id: str):
        return self.registry.devices.get(device_id)

    def _device_detail(self, device_id: str) -> dict[str, Any] | None:
        record = self._record(device_id)
        if record is None:
            return None
        row = device_row(
            record,
            time.time(),
            default_interval_s=self.config.default_telemetry_interval_s,
            stale_after_intervals=self.config.stale_after_intervals,
        )
        return {
            "row": row,
            "meta": record.meta,
            "telemetry": record.telemetry,
            "status": {"state": record.state, "session": record.session, "ts": record.status_ts},
        }

    def _base_url(self, request: Request) -> str:
        return (self.config.public_url or str(request.base_url)).rstrip("/")

    async def _json_body(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await read_bounded(request, MAX_JSON_BODY_BYTES) or b"{}")
        except RecursionError:  # [[[[…: nesting deeper than the parser's stack
            raise _bad("body: nested too deeply", "body") from None
        except ValueError as exc:
            raise _bad(f"body: not valid JSON ({exc})", "body") from None
        if not isinstance(body, dict):
            raise _bad("body: must be a JSON object", "body")
        return body

    # --- login ---------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        token = request.cookies.get(LOGIN_COOKIE) or _random()
        response = self.templates.TemplateResponse(
            request,
            "login.html",
            {
                "login_token": token,
                "error": None,
                "next": _safe_next(request.query_params.get("next")),
            },
        )
        response.set_cookie(
            LOGIN_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=self.config.auth.cookie_secure,
        )
        return response

    async def login_submit(self, request: Request) -> Response:
        form = await request.form()
        next_url = _safe_next(str(form.get("next") or "/"))
        cookie_token = request.cookies.get(LOGIN_COOKIE)
        if not cookie_token or form.get("login_token") != cookie_token:
            return error_response(403, "csrf_failed", "login form expired; reload /login")
        secret = str(form.get("secret") or "")
        host = _client_host(request)
        user = await self._attempt(host, lambda: self._slow_check(self.auth.check_login, secret))
        if user is None:
            log.warning("login_failed", client=host)
            self._failed(host, "login")
            response = self.templates.TemplateResponse(
                request,
                "login.html",
                {"login_token": cookie_token, "error": "wrong password or token", "next": next_url},
                status_code=401,
            )
            return response
        session = await run_in_threadpool(self.auth.open_session, user)
        log.info("login", user=user)
        response = RedirectResponse(next_url, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session.id,
            httponly=True,
            samesite="strict",
            secure=self.config.auth.cookie_secure,
            max_age=self.config.auth.session_max_age_s,
        )
        response.delete_cookie(LOGIN_COOKIE)
        return response

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        denied = await self._authorize(request, form)
        if denied:
            return denied
        await run_in_threadpool(self.auth.close_session, request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # --- pages ---------------------------------------------------------------------------

    async def fleet_page(self, request: Request) -> Response:
        session = self._page_guard(request)
        if isinstance(session, Response):
            return session
        try:
            query = parse_query(_table_params(request))
        except EdgeAgentError:  # a hand-edited address: the default view, not an error page
            query = TableQuery()
        try:
            table = await run_in_threadpool(self._table, query)
            problem = None
        except EdgeAgentError as exc:  # a filter that does not parse: say where, show none
            table = await run_in_threadpool(self._table, TableQuery(per_page=query.per_page))
            table["devices"], table["total"], problem = [], 0, exc.message
        return self._render(
            request, "fleet.html", session, rows=table["devices"], summary=table["summary"],
            table=table, query=query, filter_problem=problem,
        )

    async def device_page(self, request: Request) -> Response:
        session = self._page_guard(request)
        if isinstance(session, Response):
            return session
        device_id = request.path_params["device_id"]
        detail = self._device_detail(device_id)
        if detail is None:
            return PlainTextResponse(
                f"no device {device_id!r} known to this controller", status_code=404
            )
        meta = detail["meta"]
        selection = meta.get("selection") or {}
        commands = await run_in_threadpool(self.registry.commands, device_id, 10)
        return self._render(
            request,
            "device.html",
            session,
            device_id=device_id,
            row=detail["row"],
            meta=meta,
            hardware=hardware(meta),
            selection=selection,
            candidates=selection.get("candidates") or _explained(commands),
            variants=selection.get("variants") or [c["quant"] for c in selection.get("candidates", [])],
            events=_with_text(await run_in_threadpool(self.registry.events, device_id, limit=30)),
            commands=_commands_with_text(commands),
            meta_json=json.dumps(meta, indent=2, default=str),
        )

    async def models_page(self, request: Request) -> Response:
        session = self._page_guard(request)
        if isinstance(session, Response):
            return session
        return self._render(
            request,
            "models.html",
            session,
            manifests=await run_in_threadpool(self.models.manifests),
            rollouts=await run_in_threadpool(self._rollout_dicts),
            files_base=self._base_url(request) + "/files/",
            message=request.query_params.get("message"),
        )

    async def rollout_page(self, request: Request) -> Response:
        session = self._page_guard(request)
        if isinstance(session, Response):
            return session
        rollout_id = request.path_params["rollout_id"]
        # The manager's lock is held across registry round trips by its own thread.
        rollout = await run_in_threadpool(self.controller.rollouts.get, rollout_id)
        if rollout is None:
            return PlainTextResponse(
                f"no rollout {rollout_id!r} on this controller", status_code=404)
        return self._render(request, "rollout.html", session, rollout_id=rollout.id)

    async def publish_form(self, request: Request) -> Response:
        form = await request.form()
        denied = await self._authorize(request, form)
        if denied:
            return denied
        try:
            await run_in_threadpool(
                self.models.publish, str(form.get("name") or ""), str(form.get("manifest") or "")
            )
            message = f"published {form.get('name')}"
        except EdgeAgentError as exc:
            message = f"not published: {exc.message}"
        return RedirectResponse(f"/models?message={quote(message)}", status_code=303)

    async def build_form(self, request: Request) -> Response:
        """The Models page's "build from a folder on the controller" form."""
        form = await request.form()
        denied = await self._authorize(request, form)
        if denied:
            return denied
        name = str(form.get("name") or "")
        try:
            await run_in_threadpool(
                self.models.build_from_folder, name, str(form.get("model_dir") or ""))
            message = f"built and published {name}"
        except EdgeAgentError as exc:
            message = f"not published: {exc.message}"
        return RedirectResponse(f"/models?message={quote(message)}", status_code=303)

    async def ui_stream(self, request: Request) -> Response:
        denied = await self._authorize(request)
        if denied:
            return denied
        device_id = request.query_params.get("device")
        query = None if device_id else parse_query(_table_params(request))
        return StreamingResponse(
            self._ui_events(request, device_id, query),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _ui_events(
        self, request: Request, device_id: str | None, query: TableQuery | None
    ) -> AsyncIterator[str]:
        """Every tick: the fleet summary and the changed rows; for the fleet page, of the one
        page of the table ``query`` asks for (with the ids it holds, in order, and how many
        rows match); for a device page its new points, events and commands. Only changed rows
        are sent, so a quiet fleet costs almost nothing."""
        sent_versions: dict[str, tuple[int, str]] = {}
        last_event_id = 0
        last_point_ts = None
        last_commands = ""
        if device_id:
            known = await run_in_threadpool(self.registry.events, device_id, limit=1)
            last_event_id = known[-1]["id"] if known else 0
        while not await request.is_disconnected():
            table: dict[str, Any] | None = None
            if device_id:  # a device page needs its own row only, not the whole fleet's
                detail = self._device_detail(device_id)
                rows = [detail["row"]] if detail else []
            else:
                try:
                    table = await run_in_threadpool(self._table, query)
                except EdgeAgentError as exc:  # the page said so already; end the stream
                    yield f"data: {json.dumps({'error': exc.to_dict()})}\n\n"
                    return
                rows = table["devices"]
            changed = []
            for row in rows:
                key = (self.registry.devices[row["id"]].version, row["state"])
                if sent_versions.get(row["id"]) != key:
                    sent_versions[row["id"]] = key
                    changed.append(row)
            payload: dict[str, Any] = {
                "summary": fleet_summary(rows) if table is None else table["summary"],
                "rows": changed,
                "now": time.time(),
            }
            if table is not None:
                payload.update(
                    ids=[row["id"] for row in rows],
                    total=table["total"], page=table["page"], pages=table["pages"],
                )
            if device_id and (record := self._record(device_id)) is not None:
                if record.telemetry_ts != last_point_ts and record.telemetry:
                    last_point_ts = record.telemetry_ts
                    payload["point"] = {
                        "ts": record.telemetry_ts,
                        **telemetry_point(record.telemetry),
                    }
                events = await run_in_threadpool(
                    self.registry.events, device_id, after_id=last_event_id, limit=50
                )
                if events:
                    last_event_id = events[-1]["id"]
                    payload["events"] = _with_text(events)
                commands = await run_in_threadpool(self.registry.commands, device_id, 10)
                fingerprint = json.dumps(commands, default=str)
                if fingerprint != last_commands:
                    last_commands = fingerprint
                    payload["commands"] = _commands_with_text(commands)
            yield f"data: {json.dumps(payload, default=str)}\n\n"
            big = not device_id and len(self.registry.devices) > BIG_FLEET_ROWS
            await asyncio.sleep(BIG_FLEET_TICK_S if big else STREAM_TICK_S)

    # --- API -----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse(
            {
                "ok": True,
                "mqtt_connected": self.controller.connected,
                "devices": len(self.registry.devices),
            }
        )

    async def signing_key(self, request: Request) -> Response:
        """Public, like /files: the key devices pin."""
        key = self.controller.signing_key
        return JSONResponse(
            {"algorithm": "ed25519", "public_key": key.public_key, "key_id": key.key_id}
        )

    async def api_devices(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        query = parse_query(request.query_params, per_page=MAX_PER_PAGE)
        return JSONResponse(await run_in_threadpool(self._table, query))

    async def api_fleet_history(self, request: Request) -> Response:
        """The fleet chart: devices by state and total decode tok/s per bucket over a window,
        from the registry's telemetry samples (every controller's)."""
        if denied := await self._authorize(request):
            return denied
        window_s = max(60, _query_int(request, "window_s", 3600, high=HISTORY_MAX_WINDOW_S))
        cached = self._history.get(window_s)
        if cached is not None and time.monotonic() - cached[0] < HISTORY_CACHE_S:
            return JSONResponse(cached[1])
        sample_s = max(1, math.ceil(self.registry.telemetry_sample_s))
        bucket_s = max(sample_s, math.ceil(window_s / HISTORY_BUCKETS))
        now = time.time()
        since = (int(now) // bucket_s - window_s // bucket_s) * bucket_s
        buckets = await run_in_threadpool(self.registry.fleet_history, since, bucket_s)
        answer = {"bucket_s": bucket_s, "since": since, "now": now, "buckets": buckets}
        self._remember_history(window_s, answer)
        return JSONResponse(answer)

    def _remember_history(self, window_s: int, answer: dict[str, Any]) -> None:
        """Keep the answer for HISTORY_CACHE_S; a client may ask for any window in range, so
        expired answers go and at most HISTORY_CACHE_ENTRIES (the oldest first) stay."""
        at = time.monotonic()
        self._history = {w: e for w, e in self._history.items()
                         if w != window_s and at - e[0] < HISTORY_CACHE_S}
        while len(self._history) >= HISTORY_CACHE_ENTRIES:
            del self._history[next(iter(self._history))]  # inserted in time order
        self._history[window_s] = (at, answer)

    async def api_device(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        detail = self._device_detail(request.path_params["device_id"])
        if detail is None:
            return error_response(404, "not_found", "no such device")
        return JSONResponse(detail)

    async def api_telemetry(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        since = _query_float(request, "since", 0.0)
        points = await run_in_threadpool(
            self.registry.series, request.path_params["device_id"], since
        )
        return JSONResponse({"points": points})

    async def api_events(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        after = _query_int(request, "after", 0, high=EVENT_ID_MAX)
        events = await run_in_threadpool(
            self.registry.events, request.path_params["device_id"], after_id=after
        )
        return JSONResponse({"events": _with_text(events)})

    async def api_commands(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        commands = await run_in_threadpool(
            self.registry.commands, request.path_params["device_id"], 50
        )
        return JSONResponse({"commands": commands})

    async def api_command(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        found = await run_in_threadpool(self.registry.command, request.path_params["command_id"])
        if found is None:
            return error_response(404, "not_found", "no such command")
        return JSONResponse(found)

    async def api_cmd(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        device_id = request.path_params["device_id"]
        body = await self._json_body(request)
        if self._record(device_id) is None:
            return error_response(
                404, "not_found", f"no device {device_id!r} known to this controller"
            )
        op = body.get("op")
        if not isinstance(op, str):
            raise _bad("op: required, a string", "op")
        wait_s = min(_seconds(body, "wait_s", 30.0), 600.0)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict[str, Any]] = loop.create_future()

        def on_result(result: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        # Records the command in SQLite under the registry's write lock: off the loop.
        command_id = await run_in_threadpool(
            self.controller.send_command,
            device_id,
            op,
            body.get("args") or {},
            source="api",
            waiter=on_result if wait_s > 0 else None,
        )
        try:
            if wait_s > 0:
                result = await asyncio.wait_for(done, wait_s)
                return JSONResponse({"id": command_id, "device_id": device_id, "op": op, **result})
            return JSONResponse(
                {"id": command_id, "device_id": device_id, "op": op, "pending": True},
                status_code=202,
            )
        except asyncio.TimeoutError:
            return JSONResponse(
                {"id": command_id, "device_id": device_id, "op": op, "pending": True},
                status_code=202,
            )
        finally:
            self.controller.remove_waiter(command_id)

    async def api_prompt(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        device_id = request.path_params["device_id"]
        if self._record(device_id) is None:
            return error_response(
                404, "not_found", f"no device {device_id!r} known to this controller"
            )
        body = await self._json_body(request)
        sse = "text/event-stream" in request.headers.get("accept", "")
        loop = asyncio.get_running_loop()
        reply = ReplyBuffer(loop, f"device/{device_id}")
        # Validates and publishes (paho may block on a full queue): a thread, not the loop.
        sent = await run_in_threadpool(self.controller.send_prompt, device_id, body, reply.put)
        request_id = sent.request_id
        deadline = min(_seconds(body, "timeout_s", 300.0), 86400.0) + PROMPT_GRACE_S

        async def stream() -> AsyncIterator[str]:
            try:
                end = loop.time() + deadline
                while True:
                    try:
                        record = await asyncio.wait_for(reply.records.get(),
                                                        max(0.1, end - loop.time()))
                    except asyncio.TimeoutError:
                        record = {
                            "id": request_id,
                            "done": True,
                            "error": {
                                "code": "timeout",
                                "message": f"no final reply within {deadline:g} s",
                            },
                        }
                    line = json.dumps(record)
                    yield f"data: {line}\n\n" if sse else line + "\n"
                    if record.get("done"):
                        return
            finally:
                self.controller.remove_waiter(sent.key)

        if body.get("stream") is False:
            final: dict[str, Any] = {}
            async for line in stream():
                final = json.loads(line.removeprefix("data: "))
            return JSONResponse(final)
        return StreamingResponse(
            stream(),
            media_type="text/event-stream" if sse else "application/x-ndjson",
            headers={"cache-control": "no-store", "x-request-id": request_id},
        )

    async def api_manifests(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        if request.method == "POST":
            try:
                body = msgspec.convert(await self._json_body(request), ManifestPublish)
            except msgspec.ValidationError as exc:
                raise _bad(f"body: {exc}", "body") from None
            if sum(x is not None for x in (body.manifest, body.model_dir, body.files)) != 1:
                raise _bad("give one of manifest (a document), model_dir (a folder on the "
                           "controller) or files (uploaded GGUF file names)", "manifest")
            if body.model_dir is not None:  # manifest build, in a thread: it hashes every file
                path = await run_in_threadpool(
                    self.models.build_from_folder, body.name, body.model_dir)
            elif body.files is not None:
                path = await run_in_threadpool(self.models.build_from_uploads, body.name, body.files)
            else:
                path = await run_in_threadpool(self.models.publish, body.name, body.manifest)
            url = f"{self._base_url(request)}/files/{path.name}"
            return JSONResponse(
                {"name": path.name, "url": url, "signature_url": url + SIGNATURE_SUFFIX,
                 "key_id": self.controller.signing_key.key_id}, status_code=201)
        return JSONResponse(
            {
                "manifests": await run_in_threadpool(self.models.manifests),
                "files_base": self._base_url(request) + "/files/",
            }
        )

    async def api_upload(self, request: Request) -> Response:
        """One GGUF file as the raw request body, streamed to disk chunk by chunk (each write
        in a thread), never held whole in memory; refused past fleet.upload_max_bytes."""
        if denied := await self._authorize(request):
            return denied
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.models.upload_max_bytes:
            raise TooLargeError(f"larger than this controller takes ({self.models.upload_max_bytes}"
                                " bytes, fleet.upload_max_bytes)", field="file")
        upload = await run_in_threadpool(self.models.start_upload, request.path_params["name"])
        try:
            await spool_body(request, upload)
            path = await run_in_threadpool(upload.finish)
        except BaseException:
            await run_in_threadpool(upload.abort)
            raise
        return JSONResponse({"file": path.name, "size": upload.received}, status_code=201)

    async def api_rollouts(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        if request.method == "GET":
            return JSONResponse({"rollouts": await run_in_threadpool(self._rollout_dicts)})
        body = await self._json_body(request)
        dry_run = body.pop("dry_run", False)  # a plan (agent.fleet.plan): nothing is sent
        if not isinstance(dry_run, bool):
            raise _bad("dry_run: must be true or false", "dry_run")
        try:
            spec = msgspec.convert(body, RolloutSpec)
        except msgspec.ValidationError as exc:
            text, _, where = str(exc).partition(" - at `$.")
            field = where.rstrip("`") or "rollout"
            raise _bad(f"{field}: {text}", field) from None
        if spec.kind == "upgrade":  # the agent's own version, a wheel of this wheelhouse
            if dry_run:
                raise _bad("dry_run: a plan is for model rollouts", "dry_run")
            spec = await run_in_threadpool(self._with_agent_wheels, spec, self._base_url(request))
            rollout = await run_in_threadpool(self.controller.rollouts.create, spec, "", "")
            return JSONResponse(await self._created(rollout.id), status_code=201)
        hosted = self.models.resolve(spec.manifest)
        if spec.manifest.startswith(("http://", "https://")):
            source = location = spec.manifest
        elif hosted is not None:
            source, location = f"{self._base_url(request)}/files/{spec.manifest}", str(hosted)
        else:
            raise _bad(
                f"manifest: {shown(spec.manifest)} is neither a URL nor a manifest hosted here",
                "manifest",
            )
        if dry_run:  # runs the selector per device and reads GGUF headers: a thread
            plan = await run_in_threadpool(
                plan_rollout, spec, source, location, self.controller.registry.snapshot())
            return JSONResponse(plan)
        # Reads every device record, the manifest (a file or a URL) and writes the registry:
        # a thread, not the loop.
        rollout = await run_in_threadpool(
            self.controller.rollouts.create, spec, source, location
        )
        return JSONResponse(await self._created(rollout.id), status_code=201)

    async def _created(self, rollout_id: str) -> dict[str, Any] | None:
        """A new rollout as GET shows it, read under the manager's lock (its thread may be
        driving it already): a thread."""
        return await run_in_threadpool(self.controller.rollouts.describe, rollout_id)

    def _with_agent_wheels(self, spec: RolloutSpec, base: str) -> RolloutSpec:
        """``spec`` with every hosted agent wheel, as devices fetch it. Reads the wheelhouse."""
        wheels = {wheel.version: AgentWheelRef(url=f"{base}/files/wheels/{wheel.path}",
                                               sha256=wheel.sha256, size=wheel.size)
                  for wheel in self.wheels.house.index().agent}
        return msgspec.structs.replace(spec, wheels=wheels)

    def _rollout_dicts(self) -> list[dict[str, Any]]:
        """Every rollout as the API shows it. Takes the rollout manager's lock, which its
        thread holds across registry round trips: call it in a thread."""
        return [rollout.to_dict() for rollout in self.controller.rollouts.listing()]

    async def api_rollout(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        # The manager's lock is held across registry round trips by its own thread.
        found = await run_in_threadpool(
            self.controller.rollouts.describe, request.path_params["rollout_id"])
        if found is None:
            return error_response(404, "not_found", "no such rollout")
        return JSONResponse(found)

    async def api_rollout_events(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        rollout_id = request.path_params["rollout_id"]
        after = _query_int(request, "after", 0, high=2**53)
        limit = max(1, _query_int(request, "limit", 200, high=1000))
        if await run_in_threadpool(self.controller.rollouts.get, rollout_id) is None:
            return error_response(404, "not_found", "no such rollout")
        events = await run_in_threadpool(
            self.controller.rollouts.events, rollout_id, after, limit
        )
        return JSONResponse({"events": events})

    async def api_rollback(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        rollout_id = request.path_params["rollout_id"]
        await run_in_threadpool(self.controller.rollouts.rollback, rollout_id)
        return JSONResponse(await run_in_threadpool(self.controller.rollouts.describe, rollout_id))

    async def metrics(self, request: Request) -> Response:
        if not self.config.auth.metrics_public and (denied := await self._authorize(request)):
            return denied
        text = render_metrics(self._rows(), self.controller)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def files(self, request: Request) -> Response:
        if not self.config.auth.files_public and (denied := await self._authorize(request)):
            return denied
        name = request.path_params["name"]
        if (manifest := self.models.signed_name(name)) is not None:
            # Signed when asked (agent.fleet.hosting): reading and parsing are file work.
            signature = await run_in_threadpool(
                self.models.signature, manifest, self.controller.signing_key
            )
            if signature is None:
                return error_response(404, "not_found", "no such manifest (or it is not valid)")
            return PlainTextResponse(signature + "\n", headers={"cache-control": "no-store"})
        path = self.models.resolve(name)
        if path is None:
            return error_response(404, "not_found", "no such file")
        return FileResponse(path)  # Range, If-Range, ETag and Last-Modified come from Starlette


def _bad(message: str, field: str) -> EdgeAgentError:
    return RequestError(message, field=field)


def _table_params(request: Request) -> dict[str, str]:
    """The fleet table's query parameters of a page or stream address (others are its own)."""
    return {k: v for k, v in request.query_params.items() if k in QUERY_FIELDS}


def _with_text(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**event, "text": event_text(event["kind"], event["body"])} for event in events]


def _commands_with_text(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**command, "text": command_text(command)} for command in commands]


def _explained(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The explain table of the device's latest answered plain ``select`` (newer agents keep it
    out of their retained meta; one with a pin or profile is a what-if), checked as meta's
    candidates are: the device wrote it."""
    for command in commands:
        answered = command["ok"] and isinstance(command["result"], dict)
        what_if = any(value is not None for value in (command["args"] or {}).values())
        if command["op"] == "select" and not what_if and answered:
            try:
                facts = msgspec.convert(command["result"].get("candidates", []), Candidates)
            except msgspec.ValidationError:
                return []
            return msgspec.to_builtins(facts)
    return []


def _random() -> str:
    return secrets.token_urlsafe(24)


def _safe_next(value: str | None) -> str:
    """Only same-site paths: an open redirect after login would help phishing."""
    # Browsers read "/\\host" as "//host"; control characters are never part of a path here.
    if (
        not value
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or not value.isprintable()
    ):
        return "/"
    return value


def _client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def _query_int(request: Request, name: str, default: int, *, high: int) -> int:
    """A whole-number query parameter from 0 to ``high``; anything else is bad_request."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(high))) or int(raw) > high:
        raise _bad(f"{name}: a whole number from 0 to {high}", name)
    return int(raw)


def _query_float(request: Request, name: str, default: float) -> float:
    """A finite, non-negative number (a timestamp, seconds); anything else is bad_request."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw) if len(raw) <= 32 else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise _bad(f"{name}: a finite number, 0 or more", name)
    return value


def _seconds(body: dict[str, Any], field: str, default: float) -> float:
    """A JSON body's duration, or ``default`` when absent; NaN, infinities, negatives, booleans
    and strings are bad_request, so no handler waits forever or computes with NaN."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0
    ):
        raise _bad(f"{field}: a finite number of seconds, 0 or more", field)
    return float(value)


def _ago(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "never"
    seconds = max(0, time.time() - ts)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
