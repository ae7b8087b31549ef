"""What an operator sends one device: ``POST /api/devices/{id}/cmd`` (a command op, waited for
up to ``wait_s``) and ``POST /api/devices/{id}/prompt`` (the reply's records as NDJSON or SSE).

Both act through FleetController in a worker thread (it writes SQLite and publishes, and paho
may block on a full queue); the controller's threads hand results back to the loop with
``loop.call_soon_threadsafe``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from agent.fleet.controller import FleetController, SentPrompt
from agent.fleet.openai_api import ReplyBuffer
from agent.fleet.web._access import Access
from agent.fleet.web._http import bad, error_response, json_body, seconds
from agent.fleet.web._rows import DeviceRows

PROMPT_GRACE_S = 30.0  # on top of the request's own timeout, for queueing on the device


class CommandAPI:
    def __init__(self, controller: FleetController, devices: DeviceRows, access: Access) -> None:
        self.controller = controller
        self.devices = devices
        self.access = access

    def _unknown(self, device_id: str) -> Response | None:
        if self.devices.record(device_id) is None:
            return error_response(
                404, "not_found", f"no device {device_id!r} known to this controller"
            )
        return None

    async def command(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        device_id = request.path_params["device_id"]
        body = await json_body(request)
        if unknown := self._unknown(device_id):
            return unknown
        op = body.get("op")
        if not isinstance(op, str):
            raise bad("op: required, a string", "op")
        wait_s = min(seconds(body, "wait_s", 30.0), 600.0)
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
        pending = {"id": command_id, "device_id": device_id, "op": op, "pending": True}
        try:
            if wait_s > 0:
                result = await asyncio.wait_for(done, wait_s)
                return JSONResponse({"id": command_id, "device_id": device_id, "op": op, **result})
            return JSONResponse(pending, status_code=202)
        except asyncio.TimeoutError:
            return JSONResponse(pending, status_code=202)
        finally:
            self.controller.remove_waiter(command_id)

    async def prompt(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        device_id = request.path_params["device_id"]
        if unknown := self._unknown(device_id):
            return unknown
        body = await json_body(request)
        sse = "text/event-stream" in request.headers.get("accept", "")
        reply = ReplyBuffer(asyncio.get_running_loop(), f"device/{device_id}")
        # Validates and publishes (paho may block on a full queue): a thread, not the loop.
        sent = await run_in_threadpool(self.controller.send_prompt, device_id, body, reply.put)
        deadline = min(seconds(body, "timeout_s", 300.0), 86400.0) + PROMPT_GRACE_S
        lines = self._lines(reply, sent, deadline, sse)
        if body.get("stream") is False:
            final: dict[str, Any] = {}
            async for line in lines:
                final = json.loads(line.removeprefix("data: "))
            return JSONResponse(final)
        return StreamingResponse(
            lines,
            media_type="text/event-stream" if sse else "application/x-ndjson",
            headers={"cache-control": "no-store", "x-request-id": sent.request_id},
        )

    async def _lines(self, reply: ReplyBuffer, sent: SentPrompt, deadline: float,
                     sse: bool) -> AsyncIterator[str]:
        """The reply's records, one line each, up to the final (or a ``timeout`` final when
        none came within ``deadline`` seconds)."""
        loop = reply.loop
        try:
            end = loop.time() + deadline
            while True:
                try:
                    record = await asyncio.wait_for(reply.records.get(),
                                                    max(0.1, end - loop.time()))
                except asyncio.TimeoutError:
                    record = {
                        "id": sent.request_id,
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
