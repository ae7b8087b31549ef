"""/login and /logout: the password form, its own double-submit token, and the session cookie
(HttpOnly, SameSite=Strict) a right password opens."""

from __future__ import annotations

import secrets

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from agent.config import FleetAuthConfig
from agent.fleet.web._access import SESSION_COOKIE, Access
from agent.fleet.web._http import client_host, error_response
from agent.log import get_logger

log = get_logger(__name__)

LOGIN_COOKIE = "edge_fleet_login"  # double-submit token that protects the login form itself


class LoginPages:
    def __init__(self, access: Access, templates: Jinja2Templates,
                 config: FleetAuthConfig) -> None:
        self.access = access
        self.auth = access.auth
        self.templates = templates
        self.config = config

    async def form(self, request: Request) -> Response:
        token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
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
            secure=self.config.cookie_secure,
        )
        return response

    async def submit(self, request: Request) -> Response:
        form = await request.form()
        next_url = _safe_next(str(form.get("next") or "/"))
        cookie_token = request.cookies.get(LOGIN_COOKIE)
        if not cookie_token or form.get("login_token") != cookie_token:
            return error_response(403, "csrf_failed", "login form expired; reload /login")
        secret = str(form.get("secret") or "")
        host = client_host(request)
        user = await self.access.attempt(
            host, lambda: self.access.slow_check(self.auth.check_login, secret))
        if user is None:
            log.warning("login_failed", client=host)
            self.access.failed(host, "login")
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
            secure=self.config.cookie_secure,
            max_age=self.config.session_max_age_s,
        )
        response.delete_cookie(LOGIN_COOKIE)
        return response

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        denied = await self.access.authorize(request, form)
        if denied:
            return denied
        await run_in_threadpool(self.auth.close_session, request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response


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
