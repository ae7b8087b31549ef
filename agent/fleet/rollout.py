"""Rollouts: move a set of devices to a manifest (and optionally a pinned quant) at a paced rate.

A rollout picks its devices once (explicit ids, an id glob, or a pool from their meta),
remembers what each had before (manifest source and pin, from meta) so it can roll back,
and then starts one device every ``60 / rate_per_min`` seconds with ``set_manifest`` (then
``pin`` when asked). A device is done when its cmd/result says ok, failed on an error or
after ``command_timeout_s``. When more than ``abort_percent`` of the finished devices have
failed, the rollout stops and the rest are skipped. Download events update a device's
progress. Rollback sends every touched device its previous manifest and pin at once.

State lives in the registry's rollouts tables and, as a copy, in memory (for the API).
Several controllers may share one registry: exactly one drives each rollout, the one holding
its lease (``Registry.take_lease``, renewed every ``lease_s / 4`` while the rollout runs, so a
dead holder's lease runs out after ``lease_s`` and another controller takes over). Taking
over reloads the rollout from the registry and settles the steps whose commands were answered
meanwhile (every controller records every cmd/result), so nothing is sent twice that was
answered. The others reload their copy every ``SYNC_S``; a rollback asked of any controller
takes the lease from whoever holds it. One thread (``fleet-rollout``) paces and renews; cmd
results arrive from the ingest thread. This module does not talk MQTT itself: it calls the
controller's ``send_command``.
"""

from __future__ import annotations

import fnmatch
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from agent.errors import EdgeAgentError, RequestError
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.fleet.controller import FleetController

log = get_logger(__name__)

TICK_S = 0.25
SYNC_S = 1.0  # how often a controller reloads the rollouts it does not drive
LEASE_S = 10.0
FINISHED = ("done", "failed")
IN_FLIGHT = ("set_manifest", "pin", "rolling_back", "rolling_back_pin")
ACTIVE = ("running", "rolling_back")


class RolloutSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    manifest: str  # a manifest hosted here (its file name) or an http(s) URL
    pin: str | None = None  # after set_manifest, pin this quant (e.g. "Q2_K")
    devices: list[str] = []  # explicit device ids
    group: str | None = None  # glob on device ids, e.g. "store-12-*"; "*" is every device
    pool: str | None = None  # devices whose meta names this pool
    rate_per_min: float = 10.0
    abort_percent: float = 20.0


@dataclass
class DeviceStep:
    device_id: str
    position: int
    state: str = (
        "pending"  # pending, set_manifest, pin, done, failed, skipped, rolling_back, rolled_back
    )
    previous: dict[str, Any] = field(default_factory=dict)
    cmd_id: str | None = None
    sent_at: float = 0.0
    progress: float | None = None
    error: str | None = None


@dataclass
class Rollout:
    id: str
    spec: RolloutSpec
    source: str  # the manifest URL the devices are sent
    created: float
    state: str = "running"  # running, completed, aborted, rolling_back, rolled_back
    reason: str | None = None
    steps: list[DeviceStep] = field(default_factory=list)
    last_start: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for step in self.steps:
            counts[step.state] = counts.get(step.state, 0) + 1
        return {
            "id": self.id,
            "state": self.state,
            "reason": self.reason,
            "created": self.created,
            "source": self.source,
            "spec": msgspec.to_builtins(self.spec),
            "counts": counts,
            "devices": [
                {
                    "device_id": s.device_id,
                    "state": s.state,
                    "progress": s.progress,
                    "error": s.error,
                    "previous": s.previous,
                    "cmd_id": s.cmd_id,
                }
                for s in self.steps
            ],
        }


def _rollout_of(row: dict[str, Any], step_rows: list[dict[str, Any]]) -> Rollout:
    """A rollout as the registry stores it."""
    spec = msgspec.json.decode(row["spec"], type=RolloutSpec)
    rollout = Rollout(
        id=row["id"],
        spec=spec,
        source=spec.manifest,
        created=row["created_ts"],
        state=row["state"],
        reason=row["reason"],
    )
    for step_row in step_rows:
        rollout.steps.append(
            DeviceStep(
                step_row["device_id"],
                step_row["position"],
                state=step_row["state"],
                previous=msgspec.json.decode(step_row["previous"] or "{}"),
                cmd_id=step_row["cmd_id"],
                sent_at=step_row["updated_ts"] or 0.0,
                progress=step_row["progress"],
                error=step_row["error"],
            )
        )
    return rollout


def _step_rows(rollout: Rollout) -> list[tuple]:
    """The rollout's steps as ``Registry.save_rollout`` stores them."""
    return [
        (
            step.device_id,
            step.position,
            step.state,
            msgspec.json.encode(step.previous).decode(),
            step.cmd_id,
            step.progress,
            step.error,
            # When its command went out: a controller taking over times it from there.
            step.sent_at or None,
        )
        for step in rollout.steps
    ]


def needs_driver(rollout: Rollout) -> bool:
    """Whether a controller must hold this rollout's lease: it paces, or waits for answers."""
    return rollout.state in ACTIVE or any(s.state in IN_FLIGHT for s in rollout.steps)


def previous_of(meta: dict[str, Any]) -> dict[str, Any]:
    """What a device runs now, as far as its meta says: where its manifest came from and its pin."""
    selection = meta.get("selection") or {}
    source = meta.get("manifest") or selection.get("manifest_url")
    pin = meta.get("pin")
    return {"source": source, "pin": pin, "quant": selection.get("quant")}


class RolloutManager:
    def __init__(
        self,
        controller: "FleetController",
        *,
        command_timeout_s: float = 600.0,
        lease_s: float = LEASE_S,
    ) -> None:
        self.controller = controller
        self.command_timeout_s = command_timeout_s
        self.lease_s = lease_s
        self.owner = controller.config.controller_id
        self.rollouts: dict[str, Rollout] = {}
        self._by_command: dict[str, tuple[Rollout, DeviceStep]] = {}
        self._held: dict[str, float] = {}  # rollout id -> when this controller last renewed
        self._synced = 0.0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.restore()
        self._thread = threading.Thread(target=self._run, name="fleet-rollout", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        with self._lock:
            for rollout_id in list(self._held):
                # A clean stop hands the rollout on at once instead of after lease_s.
                self.controller.registry.release_lease(rollout_id, self.owner)
            self._held.clear()

    def restore(self) -> None:
        """Reload every rollout this controller does not drive from the registry: those other
        controllers drive or created, and (at start) all of them."""
        with self._lock:
            for row, step_rows in self.controller.registry.rollout_rows():
                if row["id"] not in self._held:
                    self.rollouts[row["id"]] = _rollout_of(row, step_rows)
            self._synced = time.monotonic()

    def _hold(self, rollout: Rollout) -> Rollout | None:
        """The rollout to drive when this controller holds (or just took) its lease, else
        None. Under ``_lock``."""
        now = time.monotonic()
        renewed = self._held.get(rollout.id)
        if renewed is not None and now - renewed < self.lease_s / 4:
            return rollout
        if not self.controller.registry.take_lease(rollout.id, self.owner, self.lease_s):
            if renewed is not None:
                log.warning("rollout_lease_lost", rollout=rollout.id, owner=self.owner)
                self._drop(rollout.id)
            return None
        self._held[rollout.id] = now
        if renewed is None:
            rollout = self._take_over(rollout.id) or rollout
        return rollout

    def _drop(self, rollout_id: str) -> None:
        self._held.pop(rollout_id, None)
        for cmd_id in [k for k, (r, _) in self._by_command.items() if r.id == rollout_id]:
            del self._by_command[cmd_id]

    def _take_over(self, rollout_id: str) -> Rollout | None:
        """Reload a rollout whose lease this controller just took, and settle the steps whose
        commands were answered while no one here was waiting for them."""
        registry = self.controller.registry
        found = registry.rollout_rows(rollout_id)
        if not found:
            return None
        rollout = _rollout_of(*found[0])
        self.rollouts[rollout.id] = rollout
        log.info("rollout_lease_taken", rollout=rollout.id, owner=self.owner)
        for step in rollout.steps:
            if not (step.cmd_id and step.state in IN_FLIGHT):
                continue
            self._by_command[step.cmd_id] = (rollout, step)
            command = registry.command(step.cmd_id)
            if command is not None and command["done_ts"] is not None:
                self.on_cmd_result(
                    step.device_id,
                    {"id": step.cmd_id, "ok": command["ok"], "error": command["result"]},
                )
        return rollout

    # --- API -----------------------------------------------------------------------------

    def create(self, spec: RolloutSpec, source: str) -> Rollout:
        if spec.rate_per_min <= 0:
            raise RequestError("rate_per_min: must be > 0", field="rate_per_min")
        if not 0 <= spec.abort_percent <= 100:
            raise RequestError("abort_percent: must be in [0, 100]", field="abort_percent")
        records = {r.id: r for r in self.controller.registry.snapshot()}
        chosen: list[str] = [d for d in spec.devices if d in records]
        unknown = [d for d in spec.devices if d not in records]
        if unknown:
            raise RequestError(
                f"devices: unknown device(s) {', '.join(unknown[:5])}", field="devices"
            )
        for device_id in sorted(records):
            meta = records[device_id].meta
            if device_id in chosen:
                continue
            if spec.group and fnmatch.fnmatchcase(device_id, spec.group):
                chosen.append(device_id)
            elif spec.pool and meta.get("pool") == spec.pool:
                chosen.append(device_id)
        if not chosen:
            raise RequestError("target: no device matches devices/group/pool", field="devices")
        rollout = Rollout(id=uuid.uuid4().hex[:12], spec=spec, source=source, created=time.time())
        for position, device_id in enumerate(chosen):
            rollout.steps.append(
                DeviceStep(device_id, position, previous=previous_of(records[device_id].meta))
            )
        # With its steps in one transaction: a controller that saw the rollout without its
        # steps would find nothing left to do and complete it.
        self.controller.registry.insert_rollout(
            rollout.id,
            rollout.created,
            msgspec.json.encode(msgspec.structs.replace(spec, manifest=source)).decode(),
            rollout.state,
            _step_rows(rollout),
        )
        with self._lock:
            self.rollouts[rollout.id] = rollout
        log.info(
            "rollout_created",
            rollout=rollout.id,
            devices=len(chosen),
            source=source,
            rate_per_min=spec.rate_per_min,
            abort_percent=spec.abort_percent,
        )
        return rollout

    def get(self, rollout_id: str) -> Rollout | None:
        with self._lock:
            return self.rollouts.get(rollout_id)

    def listing(self) -> list[Rollout]:
        with self._lock:
            return sorted(self.rollouts.values(), key=lambda r: r.created, reverse=True)

    def rollback(self, rollout_id: str) -> Rollout:
        with self._lock:
            if rollout_id not in self.rollouts:
                raise RequestError(f"rollout {rollout_id!r} does not exist", field="id")
            # Whoever drives it now stops at its next renewal; from here on this one does.
            self.controller.registry.take_lease(rollout_id, self.owner, self.lease_s, force=True)
            self._drop(rollout_id)
            rollout = self._take_over(rollout_id) or self.rollouts[rollout_id]
            self._held[rollout_id] = time.monotonic()
            rollout.state = "rolling_back"
            rollout.reason = "rollback requested"
            for step in rollout.steps:
                if step.state == "pending":
                    step.state = "skipped"
                    continue
                if step.state in ("skipped", "rolled_back"):
                    continue
                if not step.previous.get("source"):
                    step.state, step.error = "failed", "no previous manifest known to roll back to"
                    continue
                self._send(
                    rollout,
                    step,
                    "set_manifest",
                    {"source": step.previous["source"]},
                    "rolling_back",
                )
            self._settle(rollout)
        log.info("rollout_rollback", rollout=rollout.id)
        return rollout

    # --- events from ingest --------------------------------------------------------------

    def on_cmd_result(self, device_id: str, body: dict[str, Any]) -> None:
        with self._lock:
            found = self._by_command.pop(str(body.get("id")), None)
            if found is None:
                return
            rollout, step = found
            if step.device_id != device_id:
                return
            ok = bool(body.get("ok"))
            error = (body.get("error") if not ok else None) or {}
            if not ok:
                step.state = (
                    "rollback_failed" if step.state.startswith("rolling_back") else "failed"
                )
                step.error = f"{error.get('code', 'error')}: {error.get('message', '')}".strip()
            elif step.state == "set_manifest" and rollout.spec.pin:
                self._send(rollout, step, "pin", {"quant": rollout.spec.pin}, "pin")
            elif step.state == "rolling_back" and rollout.spec.pin:
                self._send(
                    rollout, step, "pin", {"quant": step.previous.get("pin")}, "rolling_back_pin"
                )
            elif step.state in ("rolling_back", "rolling_back_pin"):
                step.state = "rolled_back"
            else:
                step.state, step.progress = "done", 1.0
            self._settle(rollout)

    def on_event(self, device_id: str, body: dict[str, Any]) -> None:
        if body.get("event") != "download":
            return
        total, done = body.get("total"), body.get("bytes")
        if not isinstance(total, (int, float)) or not isinstance(done, (int, float)) or total <= 0:
            return
        with self._lock:
            for rollout in self.rollouts.values():
                if rollout.state not in ("running", "rolling_back"):
                    continue
                for step in rollout.steps:
                    if step.device_id == device_id and step.state in (
                        "set_manifest",
                        "pin",
                        "rolling_back",
                    ):
                        step.progress = min(1.0, done / total)

    # --- pacing --------------------------------------------------------------------------

    def _send(
        self, rollout: Rollout, step: DeviceStep, op: str, args: dict[str, Any], state: str
    ) -> None:
        step.state, step.sent_at, step.error = state, time.time(), None
        try:
            step.cmd_id = self.controller.send_command(
                step.device_id, op, args, source=f"rollout:{rollout.id}"
            )
        except EdgeAgentError as exc:
            step.state, step.error = "failed", f"{exc.code}: {exc.message}"
            return
        self._by_command[step.cmd_id] = (rollout, step)

    def _settle(self, rollout: Rollout) -> None:
        """Abort past the threshold; complete when nothing is pending or in flight."""
        if rollout.state == "running":
            failed = sum(1 for s in rollout.steps if s.state == "failed")
            finished = sum(1 for s in rollout.steps if s.state in FINISHED)
            if failed and failed * 100.0 / finished > rollout.spec.abort_percent:
                rollout.state = "aborted"
                rollout.reason = f"{failed} of {finished} finished devices failed (> {rollout.spec.abort_percent:g} %)"
                for step in rollout.steps:
                    if step.state == "pending":
                        step.state = "skipped"
                log.warning("rollout_aborted", rollout=rollout.id, reason=rollout.reason)
            elif all(s.state in (*FINISHED, "skipped") for s in rollout.steps):
                rollout.state = "completed"
        elif rollout.state == "rolling_back":
            if not any(s.state.startswith("rolling_back") for s in rollout.steps):
                rollout.state = "rolled_back"
        self._persist(rollout)

    def _persist(self, rollout: Rollout) -> None:
        self.controller.registry.save_rollout(
            rollout.id, rollout.state, rollout.reason, _step_rows(rollout)
        )

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:
                log.exception("rollout_tick_failed")

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            if time.monotonic() - self._synced >= SYNC_S:
                self.restore()
            for rollout in list(self.rollouts.values()):
                if not needs_driver(rollout):
                    if rollout.id in self._held:
                        self._drop(rollout.id)
                        self.controller.registry.release_lease(rollout.id, self.owner)
                    continue
                held = self._hold(rollout)
                if held is None:
                    continue
                rollout, changed = held, False
                for step in rollout.steps:
                    in_flight = step.state in IN_FLIGHT
                    if in_flight and now - step.sent_at > self.command_timeout_s:
                        self._by_command.pop(step.cmd_id or "", None)
                        step.state = "failed" if rollout.state == "running" else "rollback_failed"
                        step.error = f"timeout: no cmd/result within {self.command_timeout_s:g} s"
                        changed = True
                if (
                    rollout.state == "running"
                    and now - rollout.last_start >= 60.0 / rollout.spec.rate_per_min
                ):
                    step = next((s for s in rollout.steps if s.state == "pending"), None)
                    if step is not None:
                        rollout.last_start = now
                        self._send(
                            rollout,
                            step,
                            "set_manifest",
                            {"source": rollout.source},
                            "set_manifest",
                        )
                        changed = True
                if changed:
                    self._settle(rollout)
