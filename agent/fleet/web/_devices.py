"""The fleet's read API: health, the device table, the fleet chart, one device's detail,
telemetry, events and commands, and /metrics. Registry queries run in a worker thread; the
in-memory device records are read on the loop."""

from __future__ import annotations

import math
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from agent.config import FleetConfig
from agent.fleet.controller import FleetController
from agent.fleet.metrics import render_metrics
from agent.fleet.table import MAX_PER_PAGE, parse_query
from agent.fleet.web._access import Access
from agent.fleet.web._http import error_response, query_float, query_int
from agent.fleet.web._rows import DeviceRows, with_text

# The fleet chart: at most this many buckets over a window of at most HISTORY_MAX_WINDOW_S,
# and one answer per window reused for HISTORY_CACHE_S (each query reads the window's samples).
HISTORY_BUCKETS = 60
HISTORY_MAX_WINDOW_S = 7 * 86400
HISTORY_CACHE_S = 5.0
HISTORY_CACHE_ENTRIES = 8  # the dashboard offers a few windows; any other is rare
EVENT_ID_MAX = 2**63 - 1  # SQLite's INTEGER


class DeviceAPI:
    def __init__(self, controller: FleetController, config: FleetConfig, devices: DeviceRows,
                 access: Access) -> None:
        self.controller = controller
        self.config = config
        self.registry = controller.registry
        self.devices = devices
        self.access = access
        self._history: dict[int, tuple[float, dict[str, Any]]] = {}  # window_s -> (at, answer)

    async def health(self, request: Request) -> Response:
        return JSONResponse(
            {
                "ok": True,
                "mqtt_connected": self.controller.connected,
                "devices": len(self.registry.devices),
            }
        )

    async def listing(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        query = parse_query(request.query_params, per_page=MAX_PER_PAGE)
        return JSONResponse(await run_in_threadpool(self.devices.table, query))

    async def fleet_history(self, request: Request) -> Response:
        """The fleet chart: devices by state and total decode tok/s per bucket over a window,
        from the registry's telemetry samples (every controller's)."""
        if denied := await self.access.authorize(request):
            return denied
        window_s = max(60, query_int(request, "window_s", 3600, high=HISTORY_MAX_WINDOW_S))
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

    async def device(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        detail = self.devices.detail(request.path_params["device_id"])
        if detail is None:
            return error_response(404, "not_found", "no such device")
        return JSONResponse(detail)

    async def telemetry(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        since = query_float(request, "since", 0.0)
        points = await run_in_threadpool(
            self.registry.series, request.path_params["device_id"], since
        )
        return JSONResponse({"points": points})

    async def events(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        after = query_int(request, "after", 0, high=EVENT_ID_MAX)
        events = await run_in_threadpool(
            self.registry.events, request.path_params["device_id"], after_id=after
        )
        return JSONResponse({"events": with_text(events)})

    async def commands(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        commands = await run_in_threadpool(
            self.registry.commands, request.path_params["device_id"], 50
        )
        return JSONResponse({"commands": commands})

    async def command(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        found = await run_in_threadpool(self.registry.command, request.path_params["command_id"])
        if found is None:
            return error_response(404, "not_found", "no such command")
        return JSONResponse(found)

    async def metrics(self, request: Request) -> Response:
        if not self.config.auth.metrics_public and (denied := await self.access.authorize(request)):
            return denied
        text = render_metrics(self.devices.rows(), self.controller)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
