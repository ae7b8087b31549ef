"""The rollout manager: paces rollouts, gates each device on health, aborts on evidence, rolls
back, and keeps every decision with its reason.

Each device goes through its kind's start commands (agent.fleet.rollout._kinds), then the
health gate: it must serve the new target (``ready`` with the new model's sha256), answer a
canary prompt sent by this controller (``FleetController.send_prompt``), and stay healthy (no
fatal status such as ``degraded``, no ``worker_crashed`` event, no worker restart in its
telemetry) for ``soak_s``. ``device_timeout_s`` from its start fails it. A failed device that
had switched is rolled back at once. The rollout aborts when the evidence says so
(agent.fleet.rollout._spec.abort_reason): it starts no one new and rolls back every device it
switched. Devices that come to match a dynamic target while it runs join it.

State lives in the registry (rollouts, rollout_devices, rollout_events) and, as a copy, in
memory (for the API). Several controllers may share one registry: exactly one drives each
rollout, the one holding its lease (``Registry.take_lease``, renewed every ``lease_s / 4``
while the rollout runs, so a dead holder's lease runs out after ``lease_s`` and another
controller takes over), and renewed in the registry before each command it sends. A save is
written only while this controller holds the lease (``Registry.save_rollout``): one that finds
it taken (a rollback forced by another controller) writes nothing, and this controller stops
driving and shows the registry's copy. Taking over reloads the rollout from the registry,
settles the steps whose commands were answered meanwhile (every controller records every
cmd/result), resends the canary of a device that was waiting for one (its answer went to the
old driver), and goes on with every soak from the time stored with it. The others reload
their copy every ``SYNC_S``; a rollback asked of any controller takes the lease from whoever
holds it.

Threads: ``fleet-rollout`` paces, watches and renews (``tick``); cmd results and events
arrive from the ingest thread (``on_cmd_result``, ``on_event``); both under ``_lock``. A
canary's reply arrives on paho's thread, which only enqueues it for the next tick. Decisions
read ``clock`` (time.time unless a test passes a clock it moves); leases read real time.
This module does not talk MQTT itself: it calls the controller's ``send_command`` and
``send_prompt``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from agent.errors import InRolloutError, RequestError
from agent.fleet.rollout._driver import TICK_S, RolloutDriver
from agent.fleet.rollout._kinds import KINDS
from agent.fleet.rollout._spec import RolloutSpec, check
from agent.fleet.rollout._state import (
    ACTIVE,
    IN_PROGRESS,
    SENDING,
    STILL_TO_DO,
    DeviceStep,
    Rollout,
    event_rows,
    rollout_of,
    step_rows,
)
from agent.fleet.rollout._target import Target
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.fleet.controller import FleetController

log = get_logger(__name__)

SYNC_S = 1.0  # how often a controller reloads the rollouts it does not drive
LEASE_S = 10.0
RECENT_EVENTS = 50  # how many of its latest decisions the API shows with a rollout


def needs_driver(rollout: Rollout) -> bool:
    """Whether a controller must hold this rollout's lease: it paces, watches, or waits."""
    return rollout.state in ACTIVE or any(
        s.state in IN_PROGRESS or s.state == "rolling_back" for s in rollout.steps
    )


class RolloutManager:
    def __init__(
        self,
        controller: FleetController,
        *,
        command_timeout_s: float = 600.0,
        lease_s: float = LEASE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.controller = controller
        self.device_timeout_s = command_timeout_s  # a spec's device_timeout_s overrides it
        self.lease_s = lease_s
        self.clock = clock
        self.owner = controller.config.controller_id
        self.rollouts: dict[str, Rollout] = {}
        self._driver = RolloutDriver(controller, command_timeout_s, self)
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
                self._drop(rollout_id)
                # A clean stop hands the rollout on at once instead of after lease_s.
                self.controller.registry.release_lease(rollout_id, self.owner)

    def restore(self) -> None:
        """Reload every rollout this controller does not drive from the registry: those other
        controllers drive or created, and (at start) all of them."""
        with self._lock:
            for row, stored_steps in self.controller.registry.rollout_rows():
                if row["id"] not in self._held:
                    self.rollouts[row["id"]] = rollout_of(row, stored_steps)
            self._synced = time.monotonic()

    # --- the lease -----------------------------------------------------------------------

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

    def renew_lease(self, rollout_id: str) -> bool:
        """Renew the lease in the registry now (before a command goes out): False, dropping
        nothing yet, when another controller holds it. Under ``_lock``."""
        if not self.controller.registry.take_lease(rollout_id, self.owner, self.lease_s):
            return False
        self._held[rollout_id] = time.monotonic()
        return True

    def lease_lost(self, rollout_id: str) -> None:
        """Another controller drives the rollout (a save found its lease gone): stop, and
        show the registry's copy instead of this one's unsaved changes. Under ``_lock``."""
        log.warning("rollout_lease_lost", rollout=rollout_id, owner=self.owner)
        self._drop(rollout_id)
        found = self.controller.registry.rollout_rows(rollout_id)
        if found:
            self.rollouts[rollout_id] = rollout_of(*found[0])

    def busy_devices(self, except_rollout: str | None = None) -> set[str]:
        """Devices with a step still to do in an active rollout (other than one). Under
        ``_lock``."""
        return {
            step.device_id
            for rollout in self.rollouts.values()
            if rollout.id != except_rollout and rollout.state in ACTIVE
            for step in rollout.steps
            if step.state in STILL_TO_DO
        }

    def _drop(self, rollout_id: str) -> None:
        self._held.pop(rollout_id, None)
        self._driver.forget(rollout_id)

    def _take_over(self, rollout_id: str) -> Rollout | None:
        """Reload a rollout whose lease this controller just took, and settle the steps whose
        commands were answered while no one here was waiting for them."""
        registry = self.controller.registry
        found = registry.rollout_rows(rollout_id)
        if not found:
            return None
        rollout = rollout_of(*found[0])
        self.rollouts[rollout.id] = rollout
        log.info("rollout_lease_taken", rollout=rollout.id, owner=self.owner)
        if any(s.started_at for s in rollout.steps):
            rollout.record(self.clock(), "resume", f"controller {self.owner} drives the rollout")
        for step in rollout.steps:
            if not (step.cmd_id and step.state in SENDING):
                continue
            self._driver.by_command[step.cmd_id] = (rollout, step)
            command = registry.command(step.cmd_id)
            if command is not None and command["done_ts"] is not None:
                self.on_cmd_result(
                    step.device_id,
                    {"id": step.cmd_id, "ok": command["ok"], "error": command["result"]},
                )
        self._driver.persist(rollout)
        return rollout

    # --- API -----------------------------------------------------------------------------

    def create(self, spec: RolloutSpec, source: str, manifest_location: str) -> Rollout:
        """A new rollout of ``spec``: devices are sent ``source``; ``manifest_location`` (a
        path here or the URL) is read for what a device serving it reports. Reads files or
        the network: call it from a thread."""
        check(spec, spec.device_timeout_s or self.device_timeout_s)
        kind = KINDS[spec.kind]
        target = Target(spec)
        chosen = target.chosen(self.controller.registry.snapshot())
        expect = kind.expectations(spec, manifest_location)
        now = self.clock()
        rollout = Rollout(
            id=uuid.uuid4().hex[:12],
            spec=msgspec.structs.replace(spec, manifest=source),
            source=source,
            created=now,
            expect=expect,
        )
        for position, record in enumerate(chosen):
            rollout.add_step(DeviceStep(record.id, position, previous=kind.previous_of(record)))
        rollout.record(
            now,
            "created",
            f"{len(chosen)} devices at {rollout.rate_per_min():g}/min"
            + ("" if target.dynamic else ", a fixed set"),
        )
        with self._lock:
            # One device is in one rollout at a time: two would send it opposite commands.
            busy = sorted(self.busy_devices() & {record.id for record in chosen})
            if busy:
                raise InRolloutError(
                    f"devices: already in an active rollout: {', '.join(busy[:5])}"
                    + (f" and {len(busy) - 5} more" if len(busy) > 5 else ""),
                    field="devices",
                    devices=busy[:100],
                )
            # With its steps in one transaction: a controller that saw the rollout without its
            # steps would find nothing left to do and complete it.
            self.controller.registry.insert_rollout(
                rollout.id,
                rollout.created,
                msgspec.json.encode(rollout.spec).decode(),
                rollout.state,
                step_rows(rollout),
                expect=msgspec.json.encode(expect).decode(),
                events=event_rows(rollout),
            )
            rollout.unsaved_events.clear()
            self.rollouts[rollout.id] = rollout
        log.info(
            "rollout_created",
            rollout=rollout.id,
            kind=spec.kind,
            devices=len(chosen),
            source=source,
            rate_per_min=rollout.rate_per_min(),
            abort_percent=spec.abort_percent,
        )
        return rollout

    def get(self, rollout_id: str) -> Rollout | None:
        with self._lock:
            return self.rollouts.get(rollout_id)

    def describe(self, rollout_id: str) -> dict[str, Any] | None:
        """The rollout as the API shows it, with its latest decisions; None if unknown."""
        with self._lock:
            rollout = self.rollouts.get(rollout_id)
            if rollout is None:
                return None
            shown = rollout.to_dict()
        shown["events"] = self.events(rollout_id)
        return shown

    def listing(self) -> list[Rollout]:
        with self._lock:
            return sorted(self.rollouts.values(), key=lambda r: r.created, reverse=True)

    def events(self, rollout_id: str, after_id: int = 0, limit: int = RECENT_EVENTS) -> list[dict]:
        """Its decisions from the registry: after ``after_id`` oldest first, else the latest."""
        return self.controller.registry.rollout_events(rollout_id, after_id=after_id, limit=limit)

    def rollback(self, rollout_id: str) -> Rollout:
        with self._lock:
            if rollout_id not in self.rollouts:
                raise RequestError(f"rollout {rollout_id!r} does not exist", field="id")
            # Whoever drives it now stops at its next renewal; from here on this one does.
            self.controller.registry.take_lease(rollout_id, self.owner, self.lease_s, force=True)
            self._drop(rollout_id)
            rollout = self._take_over(rollout_id) or self.rollouts[rollout_id]
            self._held[rollout_id] = time.monotonic()
            now = self.clock()
            if rollout.state == "rolling_back":
                return rollout
            rollout.move("rolling_back", "rollback requested")
            rollout.record(now, "rollback_requested", "an operator asked for a rollback")
            for step in rollout.steps:
                if step.state == "pending":
                    step.move("skipped", now)
                    rollout.dirty.add(step.device_id)
                elif step.state in IN_PROGRESS or step.state == "done":
                    self._driver.roll_back(rollout, step, now, "the rollout is rolled back")
            self._driver.settle(rollout, now)
            self._driver.persist(rollout)
        log.info("rollout_rollback", rollout=rollout.id)
        return rollout

    # --- events from ingest --------------------------------------------------------------

    def on_cmd_result(self, device_id: str, body: dict[str, Any]) -> None:
        with self._lock:
            found = self._driver.by_command.pop(str(body.get("id")), None)
            if found is None:
                return
            rollout, step = found
            if step.device_id != device_id or step.state not in SENDING:
                return
            self._driver.answered(rollout, step, body, self.clock())
            self._driver.persist(rollout)

    def on_event(self, device_id: str, body: dict[str, Any]) -> None:
        with self._lock:
            for rollout in self.rollouts.values():
                step = rollout.step_of(device_id) if rollout.state in ACTIVE else None
                if step is not None:
                    self._driver.event(rollout, step, body)

    # --- driving -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:
                log.exception("rollout_tick_failed")

    def tick(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        with self._lock:
            if time.monotonic() - self._synced >= SYNC_S:
                self.restore()
            self._driver.take_canary_replies(self.rollouts, now)
            for rollout in list(self.rollouts.values()):
                # One rollout that fails to drive (a bug, a registry error) must not stop
                # the others: the next tick tries it again.
                try:
                    self._tick_one(rollout, now)
                except Exception:
                    log.exception("rollout_drive_failed", rollout=rollout.id)

    def _tick_one(self, rollout: Rollout, now: float) -> None:
        if not needs_driver(rollout):
            if rollout.id in self._held:
                self._drop(rollout.id)
                self.controller.registry.release_lease(rollout.id, self.owner)
            return
        held = self._hold(rollout)
        if held is None:
            return
        self._driver.drive(held, now)
        self._driver.persist(held)
