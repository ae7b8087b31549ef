"""Model hosting: ``/api/manifests`` (list, publish, build), ``PUT /api/model-files/{name}``
(a GGUF upload), ``/files/{name}`` (what devices fetch, a manifest signed when asked) and
``/api/signing-key``. Hashing, parsing and every file read or write run in a worker thread
(agent.fleet.hosting is file work)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from agent.catalog.manifest import MAX_MANIFEST_BYTES
from agent.catalog.signing import SIGNATURE_SUFFIX
from agent.config import FleetConfig
from agent.fleet.bodies import refuse_declared_oversize, spool_body
from agent.fleet.hosting import MAX_BUILD_FILES, ControllerKey, ModelDirectory
from agent.fleet.web._access import Access
from agent.fleet.web._http import bad, error_response, json_body


class ManifestPublish(msgspec.Struct, forbid_unknown_fields=True):
    """POST /api/manifests: a manifest document, or what to build one from."""

    name: Annotated[str, msgspec.Meta(max_length=128)]
    manifest: dict[str, Any] | Annotated[str, msgspec.Meta(max_length=MAX_MANIFEST_BYTES)] | None = None
    model_dir: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    files: Annotated[list[Annotated[str, msgspec.Meta(max_length=128)]],
                     msgspec.Meta(max_length=MAX_BUILD_FILES)] | None = None


class ModelAPI:
    def __init__(self, models: ModelDirectory, key: ControllerKey, config: FleetConfig,
                 access: Access, base_url: Callable[[Request], str]) -> None:
        self.models = models
        self.key = key
        self.config = config
        self.access = access
        self._base_url = base_url

    async def signing_key(self, request: Request) -> Response:
        """Public, like /files: the key devices pin."""
        return JSONResponse(
            {"algorithm": "ed25519", "public_key": self.key.public_key, "key_id": self.key.key_id}
        )

    async def manifests(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        if request.method == "POST":
            return await self._publish(request)
        return JSONResponse(
            {
                "manifests": await run_in_threadpool(self.models.manifests),
                "files_base": self._base_url(request) + "/files/",
            }
        )

    async def _publish(self, request: Request) -> Response:
        try:
            body = msgspec.convert(await json_body(request), ManifestPublish)
        except msgspec.ValidationError as exc:
            raise bad(f"body: {exc}", "body") from None
        if sum(x is not None for x in (body.manifest, body.model_dir, body.files)) != 1:
            raise bad("give one of manifest (a document), model_dir (a folder on the "
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
             "key_id": self.key.key_id}, status_code=201)

    async def upload(self, request: Request) -> Response:
        """One GGUF file as the raw request body, streamed to disk chunk by chunk (each write
        in a thread), never held whole in memory; refused past fleet.upload_max_bytes."""
        if denied := await self.access.authorize(request):
            return denied
        refuse_declared_oversize(request, self.models.upload_max_bytes)
        upload = await run_in_threadpool(self.models.start_upload, request.path_params["name"])
        try:
            await spool_body(request, upload)
            path = await run_in_threadpool(upload.finish)
        except BaseException:
            await run_in_threadpool(upload.abort)
            raise
        return JSONResponse({"file": path.name, "size": upload.received}, status_code=201)

    async def files(self, request: Request) -> Response:
        if not self.config.auth.files_public and (denied := await self.access.authorize(request)):
            return denied
        name = request.path_params["name"]
        if (manifest := self.models.signed_name(name)) is not None:
            # Signed when asked (agent.fleet.hosting): reading and parsing are file work.
            signature = await run_in_threadpool(self.models.signature, manifest, self.key)
            if signature is None:
                return error_response(404, "not_found", "no such manifest (or it is not valid)")
            return PlainTextResponse(signature + "\n", headers={"cache-control": "no-store"})
        path = self.models.resolve(name)
        if path is None:
            return error_response(404, "not_found", "no such file")
        return FileResponse(path)  # Range, If-Range, ETag and Last-Modified come from Starlette
