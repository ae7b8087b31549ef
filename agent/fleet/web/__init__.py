"""The controller's HTTP side: dashboard pages, JSON API, SSE, /metrics and model hosting.

Starlette on uvicorn's event loop. Handlers read the registry's in-memory device records
on the loop; SQLite reads and writes, manifest parsing and publishing run in a worker thread
(``run_in_threadpool``), since nothing slow may hold the loop. Handlers act through
FleetController (send_command, send_prompt); the bridge from the controller's threads (paho's,
for reply records) into a streaming response is an asyncio queue fed with
``loop.call_soon_threadsafe``. This package must not touch MQTT or SQL directly.

``FleetWeb`` builds the route groups with the state each needs and mounts them; each group is
one module:

- ``_access``: sessions, bearer tokens, CSRF and the failed-attempt budget (every route);
- ``_login``: /login and /logout;
- ``_pages`` and ``_live``: the dashboard's pages and forms, and their SSE stream /ui/stream;
- ``_devices``: health, the device table, the fleet chart, one device's records, /metrics;
- ``_commands``: a command or a prompt sent to one device;
- ``_models``: manifests, GGUF uploads, /files and the signing key;
- ``_rollouts``: the rollouts API;
- ``_rows`` and ``_http``: the device rows and the request parsing the groups share.

/v1 (the OpenAI API) and /api/prompt live in agent.fleet.openai_api, the wheelhouse in
agent.fleet.wheel_api. Auth: every page and API call needs a dashboard session (cookie,
HttpOnly, SameSite=Strict) or a bearer token (see ``_access``); /files (model hosting) and
/api/health are public by default, /metrics when configured. Everything the pages use is
served from /static: no CDN.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from agent.config import FleetConfig
from agent.errors import EdgeAgentError
from agent.fleet.auth import Authenticator, FailureLimiter
from agent.fleet.controller import FleetController
from agent.fleet.hosting import ModelDirectory
from agent.fleet.openai_api import OpenAIAPI
from agent.fleet.web._access import SESSION_COOKIE, Access, SessionLoader
from agent.fleet.web._commands import CommandAPI
from agent.fleet.web._devices import HISTORY_CACHE_ENTRIES, DeviceAPI
from agent.fleet.web._http import base_url, on_error
from agent.fleet.web._live import LiveStream
from agent.fleet.web._login import LOGIN_COOKIE, LoginPages
from agent.fleet.web._models import ModelAPI
from agent.fleet.web._pages import Pages, _explained, dashboard_templates
from agent.fleet.web._rollouts import RolloutAPI
from agent.fleet.web._rows import DeviceRows
from agent.fleet.wheel_api import WheelAPI
from agent.fleet.wheelhouse import WheelHouse

__all__ = [
    "HISTORY_CACHE_ENTRIES",
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "FleetWeb",
    "_explained",
]

STATIC = Path(__file__).parent.parent / "static"


class FleetWeb:
    def __init__(
        self, controller: FleetController, config: FleetConfig, models: ModelDirectory | None = None
    ) -> None:
        self.controller = controller
        self.config = config
        self.models = models or ModelDirectory(
            config.model_dir, source_roots=config.publish_roots,
            upload_max_bytes=config.upload_max_bytes)
        auth = Authenticator(
            config.auth.admin_password_hash,
            config.auth.api_token_hashes,
            session_max_age_s=config.auth.session_max_age_s,
            sessions=controller.registry,
        )
        failures = FailureLimiter(config.auth.failed_auth_limit, config.auth.failed_auth_window_s)
        self.access = Access(auth, failures)
        key = controller.signing_key
        rows = DeviceRows(controller.registry, config)
        templates = dashboard_templates()
        self.login = LoginPages(self.access, templates, config.auth)
        self.devices = DeviceAPI(controller, config, rows, self.access)
        self.commands = CommandAPI(controller, rows, self.access)
        self.live = LiveStream(rows, self.access)
        self.model_api = ModelAPI(self.models, key, config, self.access, self._base_url)
        wheels = WheelHouse(config.wheel_dir, upload_max_bytes=config.upload_max_bytes)
        self.rollouts = RolloutAPI(controller, self.models, wheels, self.access, self._base_url)
        self.pages = Pages(controller, rows, self.models, self.access, templates,
                           self.rollouts.rollout_dicts, self._base_url)
        self.openai = OpenAIAPI(controller, config, self.access.bearer_authorized,
                                self.access.authorize)
        self.wheels = WheelAPI(wheels, key, config, self.access.authorize, self._base_url)
        self.app = Starlette(
            routes=self._routes(),
            exception_handlers={EdgeAgentError: on_error},
            middleware=[Middleware(SessionLoader, auth=auth, failures=failures)],
        )

    def _base_url(self, request: Request) -> str:
        return base_url(self.config.public_url, request)

    def _routes(self) -> list[BaseRoute]:
        pages, login, devices = self.pages, self.login, self.devices
        commands, models, rollouts = self.commands, self.model_api, self.rollouts
        return [
            Route("/", pages.fleet),
            Route("/login", login.form, methods=["GET"]),
            Route("/login", login.submit, methods=["POST"]),
            Route("/logout", login.logout, methods=["POST"]),
            Route("/devices/{device_id}", pages.device),
            Route("/models", pages.models_page),
            Route("/models/publish", pages.publish_form, methods=["POST"]),
            Route("/models/build", pages.build_form, methods=["POST"]),
            Route("/rollouts/{rollout_id}", pages.rollout),
            Route("/ui/stream", self.live.stream),
            Route("/api/health", devices.health),
            Route("/api/signing-key", models.signing_key),
            Route("/api/devices", devices.listing),
            Route("/api/fleet/history", devices.fleet_history),
            Route("/api/devices/{device_id}", devices.device),
            Route("/api/devices/{device_id}/telemetry", devices.telemetry),
            Route("/api/devices/{device_id}/events", devices.events),
            Route("/api/devices/{device_id}/commands", devices.commands),
            Route("/api/devices/{device_id}/prompt", commands.prompt, methods=["POST"]),
            Route("/api/devices/{device_id}/cmd", commands.command, methods=["POST"]),
            Route("/api/commands/{command_id}", devices.command),
            Route("/api/manifests", models.manifests, methods=["GET", "POST"]),
            Route("/api/model-files/{name}", models.upload, methods=["PUT"]),
            Route("/api/rollouts", rollouts.collection, methods=["GET", "POST"]),
            Route("/api/rollouts/{rollout_id}", rollouts.one),
            Route("/api/rollouts/{rollout_id}/rollback", rollouts.rollback, methods=["POST"]),
            Route("/api/rollouts/{rollout_id}/events", rollouts.events),
            Route("/metrics", devices.metrics),
            Route("/files/{name}", models.files, methods=["GET", "HEAD"]),
            *self.openai.routes(),
            *self.wheels.routes(),
            Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
        ]
