"""GET /ui/stream: the pages' live updates as server-sent events, one message a tick.

Each tick sends the fleet summary and the rows that changed since the last one; for the fleet
page, of the one page of the table the address asks for (with the ids it holds, in order, and
how many rows match); for a device page, its new telemetry point, events and commands. Only
changed rows are sent, so a quiet fleet costs almost nothing. Tables and registry reads run
in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from agent.errors import EdgeAgentError
from agent.fleet.registry import telemetry_point
from agent.fleet.table import TableQuery, parse_query
from agent.fleet.view import fleet_summary
from agent.fleet.web._access import Access
from agent.fleet.web._http import table_params
from agent.fleet.web._rows import DeviceRows, commands_with_text, with_text

STREAM_TICK_S = 1.0
# Past this many devices the fleet stream slows to BIG_FLEET_TICK_S: each tick builds, filters
# and sorts the whole fleet's table in a thread to send one page of it.
BIG_FLEET_ROWS = 500
BIG_FLEET_TICK_S = 2.0


@dataclass
class _DeviceCursor:
    """What one device page's stream has sent of its device so far."""

    device_id: str
    last_event_id: int = 0
    last_point_ts: float | None = None
    last_commands: str = ""


class LiveStream:
    def __init__(self, devices: DeviceRows, access: Access) -> None:
        self.devices = devices
        self.registry = devices.registry
        self.access = access

    async def stream(self, request: Request) -> Response:
        denied = await self.access.authorize(request)
        if denied:
            return denied
        device_id = request.query_params.get("device")
        query = None if device_id else parse_query(table_params(request))
        return StreamingResponse(
            self._events(request, device_id, query),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _events(
        self, request: Request, device_id: str | None, query: TableQuery | None
    ) -> AsyncIterator[str]:
        sent_versions: dict[str, tuple[int, str]] = {}
        cursor = None
        if device_id:
            known = await run_in_threadpool(self.registry.events, device_id, limit=1)
            cursor = _DeviceCursor(device_id, last_event_id=known[-1]["id"] if known else 0)
        while not await request.is_disconnected():
            if cursor is not None:  # a device page needs its own row only, not the whole fleet's
                detail = self.devices.detail(cursor.device_id)
                rows = [detail["row"]] if detail else []
                payload = self._tick(rows, sent_versions, fleet_summary(rows))
                payload.update(await self._device_news(cursor))
            else:
                try:
                    table = await run_in_threadpool(self.devices.table, query)
                except EdgeAgentError as exc:  # the page said so already; end the stream
                    yield f"data: {json.dumps({'error': exc.to_dict()})}\n\n"
                    return
                rows = table["devices"]
                payload = self._tick(rows, sent_versions, table["summary"])
                payload.update(
                    ids=[row["id"] for row in rows],
                    total=table["total"], page=table["page"], pages=table["pages"],
                )
            yield f"data: {json.dumps(payload, default=str)}\n\n"
            big = cursor is None and len(self.registry.devices) > BIG_FLEET_ROWS
            await asyncio.sleep(BIG_FLEET_TICK_S if big else STREAM_TICK_S)

    def _tick(self, rows: list[dict[str, Any]], sent_versions: dict[str, tuple[int, str]],
              summary: dict[str, Any]) -> dict[str, Any]:
        """The tick's summary and the rows whose record version or state changed since they
        were last sent (``sent_versions`` is updated)."""
        changed = []
        for row in rows:
            key = (self.registry.devices[row["id"]].version, row["state"])
            if sent_versions.get(row["id"]) != key:
                sent_versions[row["id"]] = key
                changed.append(row)
        return {"summary": summary, "rows": changed, "now": time.time()}

    async def _device_news(self, cursor: _DeviceCursor) -> dict[str, Any]:
        """The device's telemetry point, events and commands that ``cursor`` has not sent."""
        record = self.devices.record(cursor.device_id)
        if record is None:
            return {}
        news: dict[str, Any] = {}
        if record.telemetry_ts != cursor.last_point_ts and record.telemetry:
            cursor.last_point_ts = record.telemetry_ts
            news["point"] = {"ts": record.telemetry_ts, **telemetry_point(record.telemetry)}
        events = await run_in_threadpool(
            self.registry.events, cursor.device_id, after_id=cursor.last_event_id, limit=50
        )
        if events:
            cursor.last_event_id = events[-1]["id"]
            news["events"] = with_text(events)
        commands = await run_in_threadpool(self.registry.commands, cursor.device_id, 10)
        fingerprint = json.dumps(commands, default=str)
        if fingerprint != cursor.last_commands:
            cursor.last_commands = fingerprint
            news["commands"] = commands_with_text(commands)
        return news
