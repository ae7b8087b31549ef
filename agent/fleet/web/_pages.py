"""The dashboard's pages (fleet, device, models, rollout) and the Models page's two forms,
rendered from agent/fleet/templates with a strict Content-Security-Policy. Everything the
pages use is served from /static: no CDN."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from agent.errors import EdgeAgentError
from agent.fleet.auth import Session
from agent.fleet.controller import FleetController
from agent.fleet.hosting import ModelDirectory
from agent.fleet.schemas import Candidates
from agent.fleet.table import TableQuery, parse_query
from agent.fleet.view import format_bytes, hardware
from agent.fleet.web._access import Access
from agent.fleet.web._http import table_params
from agent.fleet.web._rows import DeviceRows, commands_with_text, with_text

TEMPLATES = Path(__file__).parent.parent / "templates"
PAGE_HEADERS = {
    "cache-control": "no-store",
    "x-frame-options": "DENY",
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'"
    ),
}


def dashboard_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["bytes"] = format_bytes
    templates.env.filters["ago"] = _ago
    return templates


class Pages:
    def __init__(self, controller: FleetController, devices: DeviceRows, models: ModelDirectory,
                 access: Access, templates: Jinja2Templates,
                 rollout_dicts: Callable[[], list[dict[str, Any]]],
                 base_url: Callable[[Request], str]) -> None:
        self.controller = controller
        self.registry = controller.registry
        self.devices = devices
        self.models = models
        self.access = access
        self.templates = templates
        self._rollout_dicts = rollout_dicts  # takes the rollout manager's lock: a thread
        self._base_url = base_url

    def _render(self, request: Request, name: str, session: Session, **context: Any) -> Response:
        context.update(csrf=session.csrf, user=session.user, page=name.removesuffix(".html"))
        response = self.templates.TemplateResponse(request, name, context)
        response.headers.update(PAGE_HEADERS)
        return response

    async def fleet(self, request: Request) -> Response:
        session = self.access.page_guard(request)
        if isinstance(session, Response):
            return session
        try:
            query = parse_query(table_params(request))
        except EdgeAgentError:  # a hand-edited address: the default view, not an error page
            query = TableQuery()
        try:
            table = await run_in_threadpool(self.devices.table, query)
            problem = None
        except EdgeAgentError as exc:  # a filter that does not parse: say where, show none
            table = await run_in_threadpool(self.devices.table, TableQuery(per_page=query.per_page))
            table["devices"], table["total"], problem = [], 0, exc.message
        return self._render(
            request, "fleet.html", session, rows=table["devices"], summary=table["summary"],
            table=table, query=query, filter_problem=problem,
        )

    async def device(self, request: Request) -> Response:
        session = self.access.page_guard(request)
        if isinstance(session, Response):
            return session
        device_id = request.path_params["device_id"]
        detail = self.devices.detail(device_id)
        if detail is None:
            return PlainTextResponse(
                f"no device {device_id!r} known to this controller", status_code=404
            )
        meta = detail["meta"]
        selection = meta.get("selection") or {}
        commands = await run_in_threadpool(self.registry.commands, device_id, 10)
        events = await run_in_threadpool(self.registry.events, device_id, limit=30)
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
            variants=selection.get("variants")
            or [c["quant"] for c in selection.get("candidates", [])],
            events=with_text(events),
            commands=commands_with_text(commands),
            meta_json=json.dumps(meta, indent=2, default=str),
        )

    async def models_page(self, request: Request) -> Response:
        session = self.access.page_guard(request)
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

    async def rollout(self, request: Request) -> Response:
        session = self.access.page_guard(request)
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
        """The Models page's "publish a manifest document" form."""
        form = await request.form()
        name = str(form.get("name") or "")
        return await self._model_form(
            request, form, f"published {form.get('name')}",
            lambda: self.models.publish(name, str(form.get("manifest") or "")))

    async def build_form(self, request: Request) -> Response:
        """The Models page's "build from a folder on the controller" form."""
        form = await request.form()
        name = str(form.get("name") or "")
        return await self._model_form(
            request, form, f"built and published {name}",
            lambda: self.models.build_from_folder(name, str(form.get("model_dir") or "")))

    async def _model_form(self, request: Request, form: Any, done: str,
                          work: Callable[[], Any]) -> Response:
        """Authorize the form, run ``work`` (file work) in a thread, and go back to the Models
        page with what happened."""
        if denied := await self.access.authorize(request, form):
            return denied
        try:
            await run_in_threadpool(work)
            message = done
        except EdgeAgentError as exc:
            message = f"not published: {exc.message}"
        return RedirectResponse(f"/models?message={quote(message)}", status_code=303)


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


def _ago(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "never"
    seconds = max(0, time.time() - ts)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
