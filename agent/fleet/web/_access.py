"""Who may call: the dashboard session or bearer token a request carries, its CSRF token, and
the per-address budget of failed attempts.

A POST with a session must carry the session's CSRF token (form field ``csrf`` or header
``X-CSRF-Token``); a POST with a bearer token needs none, because browsers never attach it on
their own. Failed logins and wrong bearer tokens count per client address
(auth.FailureLimiter; past the limit: 429 rate_limited), and the slow hash checks (scrypt
logins, old-style token hashes) run in a worker thread one at a time, never on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import RedirectResponse, Response

from agent.errors import RateLimitedError
from agent.fleet.auth import Authenticator, FailureLimiter, Session
from agent.fleet.web._http import bad, client_host, error_response
from agent.log import get_logger

log = get_logger(__name__)

SESSION_COOKIE = "edge_fleet_session"
# Slow hash checks (logins, old-style token hashes) run one at a time in a worker thread; past
# this many waiting, a caller is turned away at once, so neither the wait nor memory grows.
SLOW_CHECKS_QUEUED = 8
LIMITED_DELAY_S = 1.0  # a limited address waits this long for its 429


class SessionLoader:
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


class Access:
    """The checks every handler starts with. ``failures`` and the slow-check gate are owned
    by the event loop: only handlers touch them."""

    def __init__(self, auth: Authenticator, failures: FailureLimiter) -> None:
        self.auth = auth
        self.failures = failures
        self._slow_gate = asyncio.Semaphore(1)
        self._slow_queued = 0

    def session(self, request: Request) -> Session | None:
        return self.auth.session(request.cookies.get(SESSION_COOKIE))

    async def attempt(self, host: str | None, check: Callable[[], Awaitable[Any]]) -> Any:
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

    def failed(self, host: str | None, what: str) -> None:
        # One line when an address runs out of attempts, not one per try or per refill.
        if self.failures.failed(host):
            log.warning("auth_rate_limited", client=host, after=what)

    async def slow_check(self, check: Any, secret: str) -> Any:
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
            await self.slow_check(self.auth.check_slow_token, token)
        )

    async def bearer_authorized(self, request: Request) -> bool:
        """For /v1: whether the request carries a valid API token. No session cookie counts
        there (the OpenAI API is for programs, and a cookie would need CSRF checks); a wrong
        token counts against the address as everywhere (RateLimitedError past the limit)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        host = client_host(request)
        if await self.attempt(host, lambda: self._token_ok(token.strip())):
            return True
        self.failed(host, "token")
        return False

    async def authorize(self, request: Request, form: Any = None) -> Response | None:
        """None when the caller may proceed; else the 401/403 response. A wrong bearer token
        counts against the client's address; a limited address gets 429 (RateLimitedError)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            host = client_host(request)
            if await self.attempt(host, lambda: self._token_ok(token.strip())):
                return None
            self.failed(host, "token")
        session = self.session(request)
        if session is None:
            return error_response(
                401, "unauthorized", "log in or send Authorization: Bearer <token>"
            )
        if request.method not in ("GET", "HEAD"):
            offered = request.headers.get("x-csrf-token") or (
                form.get("csrf") if form is not None else None
            )
            if offered is not None and not (isinstance(offered, str) and offered.isascii()):
                raise bad("X-CSRF-Token: must be the ASCII token from the page", "csrf")
            if not self.auth.csrf_matches(session, offered):
                return error_response(
                    403, "csrf_failed", "missing or wrong CSRF token; reload the page"
                )
        return None

    def page_guard(self, request: Request) -> Session | Response:
        """A page's session, or the redirect to /login that comes back to the page."""
        session = self.session(request)
        if session is None:
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        return session
