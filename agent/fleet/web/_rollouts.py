"""The rollouts API: list, create (or plan, with ``dry_run``), show, roll back, and a
rollout's events. The rollout manager's lock is held across registry round trips by its own
thread, so every call into it runs in a worker thread, never on the loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agent.errors import shown
from agent.fleet.controller import FleetController
from agent.fleet.hosting import ModelDirectory
from agent.fleet.plan import plan_rollout
from agent.fleet.rollout import AgentWheelRef, RolloutSpec
from agent.fleet.web._access import Access
from agent.fleet.web._http import bad, error_response, json_body, query_int
from agent.fleet.wheelhouse import WheelHouse


class RolloutAPI:
    def __init__(self, controller: FleetController, models: ModelDirectory, wheels: WheelHouse,
                 access: Access, base_url: Callable[[Request], str]) -> None:
        self.controller = controller
        self.rollouts = controller.rollouts
        self.models = models
        self.wheels = wheels
        self.access = access
        self._base_url = base_url

    def rollout_dicts(self) -> list[dict[str, Any]]:
        """Every rollout as the API shows it. Takes the rollout manager's lock: a thread."""
        return [rollout.to_dict() for rollout in self.rollouts.listing()]

    async def collection(self, request: Request) -> Response:
        """GET: every rollout; POST: a new one (or, with ``dry_run``, its plan)."""
        if denied := await self.access.authorize(request):
            return denied
        if request.method == "GET":
            return JSONResponse({"rollouts": await run_in_threadpool(self.rollout_dicts)})
        body = await json_body(request)
        dry_run = body.pop("dry_run", False)  # a plan (agent.fleet.plan): nothing is sent
        if not isinstance(dry_run, bool):
            raise bad("dry_run: must be true or false", "dry_run")
        try:
            spec = msgspec.convert(body, RolloutSpec)
        except msgspec.ValidationError as exc:
            text, _, where = str(exc).partition(" - at `$.")
            field = where.rstrip("`") or "rollout"
            raise bad(f"{field}: {text}", field) from None
        if spec.kind == "upgrade":  # the agent's own version, a wheel of this wheelhouse
            if dry_run:
                raise bad("dry_run: a plan is for model rollouts", "dry_run")
            spec = await run_in_threadpool(self._with_agent_wheels, spec, self._base_url(request))
            rollout = await run_in_threadpool(self.rollouts.create, spec, "", "")
            return JSONResponse(await self._created(rollout.id), status_code=201)
        source, location = self._manifest_source(spec.manifest, request)
        if dry_run:  # runs the selector per device and reads GGUF headers: a thread
            plan = await run_in_threadpool(
                plan_rollout, spec, source, location, self.controller.registry.snapshot())
            return JSONResponse(plan)
        # Reads every device record, the manifest (a file or a URL) and writes the registry:
        # a thread, not the loop.
        rollout = await run_in_threadpool(self.rollouts.create, spec, source, location)
        return JSONResponse(await self._created(rollout.id), status_code=201)

    def _manifest_source(self, manifest: str, request: Request) -> tuple[str, str]:
        """(the manifest's URL as devices fetch it, where the controller reads it)."""
        hosted = self.models.resolve(manifest)
        if manifest.startswith(("http://", "https://")):
            return manifest, manifest
        if hosted is not None:
            return f"{self._base_url(request)}/files/{manifest}", str(hosted)
        raise bad(
            f"manifest: {shown(manifest)} is neither a URL nor a manifest hosted here",
            "manifest",
        )

    async def _created(self, rollout_id: str) -> dict[str, Any] | None:
        """A new rollout as GET shows it, read under the manager's lock (its thread may be
        driving it already): a thread."""
        return await run_in_threadpool(self.rollouts.describe, rollout_id)

    def _with_agent_wheels(self, spec: RolloutSpec, base: str) -> RolloutSpec:
        """``spec`` with every hosted agent wheel, as devices fetch it. Reads the wheelhouse."""
        wheels = {wheel.version: AgentWheelRef(url=f"{base}/files/wheels/{wheel.path}",
                                               sha256=wheel.sha256, size=wheel.size)
                  for wheel in self.wheels.index().agent}
        return msgspec.structs.replace(spec, wheels=wheels)

    async def one(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        found = await run_in_threadpool(self.rollouts.describe, request.path_params["rollout_id"])
        if found is None:
            return error_response(404, "not_found", "no such rollout")
        return JSONResponse(found)

    async def events(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        rollout_id = request.path_params["rollout_id"]
        after = query_int(request, "after", 0, high=2**53)
        limit = max(1, query_int(request, "limit", 200, high=1000))
        if await run_in_threadpool(self.rollouts.get, rollout_id) is None:
            return error_response(404, "not_found", "no such rollout")
        events = await run_in_threadpool(self.rollouts.events, rollout_id, after, limit)
        return JSONResponse({"events": events})

    async def rollback(self, request: Request) -> Response:
        if denied := await self.access.authorize(request):
            return denied
        rollout_id = request.path_params["rollout_id"]
        await run_in_threadpool(self.rollouts.rollback, rollout_id)
        return JSONResponse(await run_in_threadpool(self.rollouts.describe, rollout_id))
