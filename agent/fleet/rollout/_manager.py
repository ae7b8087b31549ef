"""The rollout manager: paces rollouts, gates each device on health, aborts on evidence, rolls
back, and keeps every decision with its reason.

Each device goes through its kind's start commands (agent.fleet.rollout._kinds), then the
health gate (agent.fleet.rollout._gate): it must serve the new target (``ready`` with the new
model's sha256), answer a canary prompt sent by this controller
(``FleetController.send_prompt``), and stay healthy (no fatal status such as ``degraded``, no
``worker_crashed`` event, no worker restart in its telemetry) for ``soak_s``.
``device_timeout_s`` from its start fails it. A failed device that had switched is rolled back
at once. The rollout aborts when the evidence says so (agent.fleet.rollout._spec.abort_reason):
it starts no one new and rolls back every device it switched. Devices that come to match a
dynamic target while it runs join it.

State lives in the registry (rollouts, rollout_devices, rollout_events) and, as a copy, in
memory (for the API). Several controllers may share one registry: exactly one drives each
rollout, the one holding its lease (agent.fleet.rollout._leases). Taking over reloads the
rollout from the registry, settles the steps whose commands were answered meanwhile (every
controller records every cmd/result), resends the canary of a device that was waiting for one
(its answer went to the old driver), and goes on with every soak from the time stored with
it. The others reload their copy every ``SYNC_S``; a rollback asked of any controller takes
the lease from whoever holds it.

This module is the API (create, get, describe, listing, events, rollback), the thread and the
entry points from ingest; agent.fleet.rollout._driver does the driving.

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
from agent.fleet.rollout._driver import TICK_S
from agent.fleet.rollout._kinds import KINDS
from agent.fleet.rollout._leases import RolloutLeases
from agent.fleet.rollout._spec import RolloutSpec, check
from agent.fleet.rollout._state import (
    ACTIVE,
    IN_PROGRESS,
    DeviceStep,
    Rollout,
    event_rows,
    step_rows,
)
from agent.fleet.rollout._target import Target
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.fleet.controller import FleetController

log = get_logger(__name__)

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
        self.clock = clock
        self._leases = RolloutLeases(
            controller, lease_s=lease_s, device_timeout_s=command_timeout_s
        )
        self._driver = self._leases.driver
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def owner(self) -> str:
        """The controller id this manager takes leases as."""
        return self._leases.owner

    @owner.setter
    def owner(self, owner: str) -> None:
        self._leases.owner = owner

    def start(self) -> None:
        self.restore()
        self._thread = threading.Thread(target=self._run, name="fleet-rollout", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        with self._lock:
            self._leases.release_all()

    def restore(self) -> None:
        """Reload every rollout this controller does not drive from the registry: those other
        controllers drive or created, and (at start) all of them."""
        with self._lock:
            self._leases.restore()

    # --- API -----------------------------------------------------------------------------

    def create(self, spec: RolloutSpec, source: str, manifest_location: str) -> Rollout:
        """A new rollout of ``spec``: devices are sent ``source``; ``manifest_location`` (a
        path here or the URL) is read for what a device serving it reports. Reads files or
        the network: call it from a thread."""
        rollout = self._planned(spec, source, manifest_location)
        with self._lock:
            # One device is in one rollout at a time: two would send it opposite commands.
            busy = sorted(self._leases.busy_devices() & {s.device_id for s in rollout.steps})
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
                expect=msgspec.json.encode(rollout.expect).decode(),
                events=event_rows(rollout),
            )
            rollout.unsaved_events.clear()
            self._leases.rollouts[rollout.id] = rollout
        log.info(
            "rollout_created",
            rollout=rollout.id,
            kind=spec.kind,
            devices=len(rollout.steps),
            source=source,
            rate_per_min=rollout.rate_per_min(),
            abort_percent=spec.abort_percent,
        )
        return rollout

    def _planned(self, spec: RolloutSpec, source: str, manifest_location: str) -> Rollout:
        """The rollout ``create`` stores: checked, its devices chosen, its target resolved."""
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
        return rollout

    def get(self, rollout_id: str) -> Rollout | None:
        with self._lock:
            return self._leases.rollouts.get(rollout_id)

    def describe(self, rollout_id: str) -> dict[str, Any] | None:
        """The rollout as the API shows it, with its latest decisions; None if unknown."""
        with self._lock:
            rollout = self._leases.rollouts.get(rollout_id)
            if rollout is None:
                return None
            shown = rollout.to_dict()
        shown["events"] = self.events(rollout_id)
        return shown

    def listing(self) -> list[Rollout]:
        with self._lock:
            return sorted(self._leases.rollouts.values(), key=lambda r: r.created, reverse=True)

    def events(self, rollout_id: str, after_id: int = 0, limit: int = RECENT_EVENTS) -> list[dict]:
        """Its decisions from the registry: after ``after_id`` oldest first, else the latest."""
        return self.controller.registry.rollout_events(rollout_id, after_id=after_id, limit=limit)

    def rollback(self, rollout_id: str) -> Rollout:
        with self._lock:
            if rollout_id not in self._leases.rollouts:
                raise RequestError(f"rollout {rollout_id!r} does not exist", field="id")
            now = self.clock()
            rollout = self._leases.force(rollout_id, now)
            if rollout.state == "rolling_back":
                return rollout
            rollout.move("rolling_back", "rollback requested")
            rollout.record(now, "rollback_requested", "an operator asked for a rollback")
            self._driver.roll_back_all(rollout, now, "the rollout is rolled back")
            self._driver.settle(rollout, now)
            self._driver.persist(rollout)
        log.info("rollout_rollback", rollout=rollout.id)
        return rollout

    # --- events from ingest --------------------------------------------------------------

    def on_cmd_result(self, device_id: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._driver.on_cmd_result(device_id, body, self.clock())

    def on_event(self, device_id: str, body: dict[str, Any]) -> None:
        with self._lock:
            for rollout in self._leases.rollouts.values():
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
            if self._leases.restore_due():
                self._leases.restore()
            self._driver.take_canary_replies(self._leases.rollouts, now)
            for rollout in list(self._leases.rollouts.values()):
                # One rollout that fails to drive (a bug, a registry error) must not stop
                # the others: the next tick tries it again.
                try:
                    self._tick_one(rollout, now)
                except Exception:
                    log.exception("rollout_drive_failed", rollout=rollout.id)

    def _tick_one(self, rollout: Rollout, now: float) -> None:
        if not needs_driver(rollout):
            self._leases.release(rollout.id)
            return
        held = self._leases.hold(rollout, now)
        if held is None:
            return
        self._driver.drive(held, now)
        self._driver.persist(held)
