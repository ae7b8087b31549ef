"""The wheelhouse over HTTP: ``/files/wheels/…`` for devices, ``/api/wheels`` for operators.

``GET /files/wheels/index.json`` (and its ``.sig``) and the wheels themselves are public when
``auth.files_public`` is, as model files are: what makes them safe to fetch is the signature
the device checks, not the request. ``PUT /api/wheels/<file>`` (an API token or a dashboard
session) streams one wheel to disk, each write in a thread, never held whole in memory;
``key``, ``cmake_args``, ``python`` and ``platform`` come as query parameters. Everything
that reads or writes the wheelhouse runs in a worker thread (agent.fleet.wheelhouse is file
work); this module must not touch MQTT or SQL.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from agent.catalog.signing import SIGNATURE_SUFFIX
from agent.catalog.wheels import INDEX_NAME
from agent.config import FleetConfig
from agent.fleet.bodies import refuse_declared_oversize, spool_body
from agent.fleet.hosting import ControllerKey
from agent.fleet.wheelhouse import WheelHouse

NO_STORE = {"cache-control": "no-store"}


class WheelAPI:
    def __init__(self, house: WheelHouse, key: ControllerKey, config: FleetConfig,
                 authorize: Callable[[Request], Awaitable[Response | None]],
                 base_url: Callable[[Request], str]) -> None:
        self.house = house
        self.key = key
        self.config = config
        self._authorize = authorize
        self._base_url = base_url

    def routes(self) -> list[Route]:
        return [
            Route("/files/wheels/{path:path}", self.files, methods=["GET", "HEAD"]),
            Route("/api/wheels", self.listing, methods=["GET"]),
            Route("/api/wheels/{name}", self.upload, methods=["PUT"]),
        ]

    async def files(self, request: Request) -> Response:
        if not self.config.auth.files_public and (denied := await self._authorize(request)):
            return denied
        path = request.path_params["path"]
        if path == INDEX_NAME:
            data = await run_in_threadpool(self.house.index_bytes)
            return Response(data, media_type="application/json", headers=NO_STORE)
        if path == INDEX_NAME + SIGNATURE_SUFFIX:
            signature = await run_in_threadpool(self.house.signature, self.key)
            return PlainTextResponse(signature + "\n", headers=NO_STORE)
        found = await run_in_threadpool(self.house.resolve, path)
        if found is None:
            return JSONResponse({"error": {"code": "not_found", "message": "no such wheel"}},
                                status_code=404)
        return FileResponse(found)  # Range, ETag and Last-Modified from Starlette

    async def listing(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        index = await run_in_threadpool(self.house.index)
        return JSONResponse({**msgspec.to_builtins(index), "key_id": self.key.key_id,
                             "files_base": self._base_url(request) + "/files/wheels/"})

    async def upload(self, request: Request) -> Response:
        if denied := await self._authorize(request):
            return denied
        refuse_declared_oversize(request, self.house.upload_max_bytes)
        query = request.query_params
        upload = await run_in_threadpool(
            lambda: self.house.start_add(
                request.path_params["name"], key=query.get("key"),
                cmake_args=query.get("cmake_args"), python=query.get("python"),
                platform=query.get("platform")))
        try:
            await spool_body(request, upload)
            entry = await run_in_threadpool(upload.finish)
        except BaseException:
            await run_in_threadpool(upload.abort)
            raise
        url = f"{self._base_url(request)}/files/wheels/{entry.path}"
        return JSONResponse({**msgspec.to_builtins(entry), "url": url}, status_code=201)
