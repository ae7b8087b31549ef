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
controller takes over). Taking over reloads the rollout from the registry, settles the steps
whose commands were answered meanwhile (every controller records every cmd/result), resends
the canary of a device that was waiting for one (its answer went to the old driver), and goes
on with every soak from the time stored with it. The others reload their copy every
``SYNC_S``; a rollback asked of any controller takes the lease from whoever holds it.

Threads: ``fleet-rollout`` paces, watches and renews (``tick``); cmd results and events
arrive from the ingest thread (``on_cmd_result``, ``on_event``); both under ``_lock``. A
canary's reply arrives on paho's thread, which only enqueues it for the next tick. Decisions
read ``clock`` (time.time unless a test passes a clock it moves); leases read real time.
This module does not talk MQTT itself: it calls the controller's ``send_command`` and
``send_prompt``.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from agent.errors import EdgeAgentError, RequestError
from agent.fleet.rollout._kinds import KINDS, Command, RolloutKind
from agent.fleet.rollout._spec import RolloutSpec, check
from agent.fleet.rollout._state import (
    ACTIVE,
    IN_PROGRESS,
    SENDING,
    WATCHED,
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

TICK_S = 0.25
SYNC_S = 1.0  # how often a controller reloads the rollouts it does not drive, and looks for joiners
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
        self._by_command: dict[str, tuple[Rollout, DeviceStep]] = {}
        # Canary prompts in flight: request id -> (rollout id, device id, reply waiter key).
        self._canaries: dict[str, tuple[str, str, str]] = {}
        self._canary_replies: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self._targets: dict[str, Target] = {}
        self._joins_checked: dict[str, float] = {}
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

    def _drop(self, rollout_id: str) -> None:
        self._held.pop(rollout_id, None)
        for cmd_id in [k for k, (r, _) in self._by_command.items() if r.id == rollout_id]:
            del self._by_command[cmd_id]
        for request_id in [k for k, v in self._canaries.items() if v[0] == rollout_id]:
            self._forget_canary(request_id)

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
            self._by_command[step.cmd_id] = (rollout, step)
            command = registry.command(step.cmd_id)
            if command is not None and command["done_ts"] is not None:
                self.on_cmd_result(
                    step.device_id,
                    {"id": step.cmd_id, "ok": command["ok"], "error": command["result"]},
                )
        self._persist(rollout)
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
        with self._lock:
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
                    self._roll_back(rollout, step, now, "the rollout is rolled back")
            self._settle(rollout, now)
            self._persist(rollout)
        log.info("rollout_rollback", rollout=rollout.id)
        return rollout

    # --- events from ingest --------------------------------------------------------------

    def on_cmd_result(self, device_id: str, body: dict[str, Any]) -> None:
        with self._lock:
            found = self._by_command.pop(str(body.get("id")), None)
            if found is None:
                return
            rollout, step = found
            if step.device_id != device_id or step.state not in SENDING:
                return
            now = self.clock()
            commands = self._commands(rollout, step)
            op = commands[step.command_index][0] if step.command_index < len(commands) else "?"
            if not body.get("ok"):
                error = body.get("error") or {}
                why = f"{op} failed: {error.get('code', 'error')}: {error.get('message', '')}"
                if step.state == "starting":
                    self._fail(rollout, step, now, "failure", why.strip())
                else:
                    self._rollback_failed(rollout, step, now, why.strip())
            else:
                if step.state == "starting":
                    step.switched = True
                step.command_index += 1
                rollout.dirty.add(step.device_id)
                if step.command_index < len(commands):
                    self._send_next(rollout, step, commands, now)
                elif step.state == "starting":
                    step.move("verifying", now)
                    step.progress = 1.0
                    ops = " and ".join(o for o, _ in commands)
                    rollout.record(now, "switched", f"answered {ops} ok", step)
                else:
                    step.move("rolled_back", now)
                    step.cmd_id = None
                    rollout.record(now, "rolled_back", "back on what it ran before", step)
            self._settle(rollout, now)
            self._persist(rollout)

    def on_event(self, device_id: str, body: dict[str, Any]) -> None:
        name = body.get("event")
        with self._lock:
            for rollout in self.rollouts.values():
                if rollout.state not in ACTIVE:
                    continue
                step = rollout.step_of(device_id)
                if step is None:
                    continue
                if name == "download" and step.state in SENDING:
                    total, done = body.get("total"), body.get("bytes")
                    if isinstance(total, int) and isinstance(done, int) and total > 0:
                        step.progress = min(1.0, done / total)
                elif name in KINDS[rollout.spec.kind].fatal_events and step.state in WATCHED:
                    reason = body.get("reason")
                    step.crashed = f"{name}" + (f": {reason}" if isinstance(reason, str) else "")

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
            self._take_canary_replies(now)
            for rollout in list(self.rollouts.values()):
                if not needs_driver(rollout):
                    if rollout.id in self._held:
                        self._drop(rollout.id)
                        self.controller.registry.release_lease(rollout.id, self.owner)
                    continue
                held = self._hold(rollout)
                if held is None:
                    continue
                self._drive(held, now)
                self._persist(held)

    def _drive(self, rollout: Rollout, now: float) -> None:
        kind = KINDS[rollout.spec.kind]
        timeout = rollout.spec.device_timeout_s or self.device_timeout_s
        if rollout.state == "running":
            self._admit_joiners(rollout, now)
        for step in rollout.steps:
            if step.state in IN_PROGRESS and now - step.started_at > timeout:
                self._fail(
                    rollout,
                    step,
                    now,
                    "timeout",
                    f"not through the health gate within {timeout:g} s of its start"
                    f" (still {step.state}" + (f": {step.error})" if step.error else ")"),
                )
            elif step.state == "rolling_back" and now - step.sent_at > timeout:
                self._rollback_failed(
                    rollout, step, now, f"timeout: no cmd/result within {timeout:g} s"
                )
            elif step.state in WATCHED:
                self._watch(rollout, kind, step, now)
        self._start_due(rollout, now)
        self._settle(rollout, now)

    def _admit_joiners(self, rollout: Rollout, now: float) -> None:
        """Add the devices that came to match a dynamic target (every SYNC_S)."""
        target = self._targets.get(rollout.id)
        if target is None:
            target = self._targets[rollout.id] = Target(rollout.spec)
        if not target.dynamic:
            return
        checked = self._joins_checked.get(rollout.id, 0.0)
        if time.monotonic() - checked < SYNC_S:
            return
        self._joins_checked[rollout.id] = time.monotonic()
        kind = KINDS[rollout.spec.kind]
        for record in sorted(self.controller.registry.snapshot(), key=lambda r: r.id):
            if rollout.step_of(record.id) is None and target.matches(record):
                step = DeviceStep(record.id, len(rollout.steps), previous=kind.previous_of(record))
                rollout.add_step(step)
                rollout.record(now, "join", "came to match the target while it runs", step)

    def _watch(self, rollout: Rollout, kind: RolloutKind, step: DeviceStep, now: float) -> None:
        """The health gate, for a device whose start commands were answered ok."""
        record = self.controller.registry.devices.get(step.device_id)
        if record is None:
            return
        restarts = record.telemetry.get("worker_restarts")
        if step.crashed:
            self._fail(rollout, step, now, "failure", f"{step.crashed} while {step.state}")
            return
        if record.state in kind.fatal_states:
            problem = record.meta.get("problem")
            detail = f" ({problem})" if isinstance(problem, str) and problem else ""
            self._fail(rollout, step, now, "failure", f"reports {record.state}{detail}")
            return
        if step.restarts is not None and isinstance(restarts, int) and restarts > step.restarts:
            self._fail(
                rollout,
                step,
                now,
                "failure",
                f"its worker restarted ({restarts - step.restarts} times) while {step.state}",
            )
            return
        serving, what = kind.serving(rollout.expect, record)
        if step.state == "verifying":
            if not serving:
                if step.error != what:
                    step.error = what
                    rollout.dirty.add(step.device_id)
                return
            step.error = None
            step.restarts = restarts if isinstance(restarts, int) else None
            step.move("canary", now)
            rollout.record(now, "healthy", what, step)
            self._send_canary(rollout, step, now)
        elif step.state == "canary":
            if step.canary_id not in self._canaries:  # sent by an earlier driver
                self._send_canary(rollout, step, now)
        elif not serving:
            self._fail(rollout, step, now, "failure", f"during the soak: {what}")
        elif now - step.since >= rollout.spec.soak_s:
            step.move("done", now)
            step.outcome = "succeeded"
            rollout.record(
                now, "success", f"healthy for {rollout.spec.soak_s:g} s after its canary", step
            )

    def _send_canary(self, rollout: Rollout, step: DeviceStep, now: float) -> None:
        request_id = f"canary-{uuid.uuid4().hex[:16]}"
        replies = self._canary_replies

        def waiter(record: dict[str, Any]) -> None:  # paho's thread: only hand it on
            if record.get("done"):
                replies.put((request_id, record))

        request = {
            "id": request_id,
            "prompt": rollout.spec.canary_prompt,
            "max_tokens": rollout.spec.canary_max_tokens,
            "temperature": 0.0,
        }
        try:
            sent = self.controller.send_prompt(step.device_id, request, waiter)
        except EdgeAgentError as exc:
            self._fail(rollout, step, now, "failure", f"canary not sent: {exc.code}: {exc.message}")
            return
        if step.canary_id in self._canaries:
            self._forget_canary(step.canary_id)
        self._canaries[request_id] = (rollout.id, step.device_id, sent.key)
        step.canary_id = request_id
        rollout.dirty.add(step.device_id)

    def _forget_canary(self, request_id: str | None) -> None:
        found = self._canaries.pop(request_id or "", None)
        if found is not None:
            self.controller.remove_waiter(found[2])

    def _take_canary_replies(self, now: float) -> None:
        while True:
            try:
                request_id, body = self._canary_replies.get_nowait()
            except queue.Empty:
                return
            found = self._canaries.get(request_id)
            self._forget_canary(request_id)
            if found is None:
                continue
            rollout = self.rollouts.get(found[0])
            step = rollout.step_of(found[1]) if rollout else None
            if rollout is None or step is None or step.state != "canary":
                continue
            if step.canary_id != request_id:
                continue
            error = body.get("error")
            if isinstance(error, dict):
                why = f"the canary prompt failed: {error.get('code')}: {error.get('message')}"
                self._fail(rollout, step, now, "failure", why)
            else:
                tokens = (body.get("usage") or {}).get("completion_tokens")
                step.move("soaking", now)
                rollout.record(
                    now,
                    "canary",
                    "answered the canary prompt"
                    + (f" ({tokens} tokens)" if isinstance(tokens, int) else "")
                    + f"; soaking {rollout.spec.soak_s:g} s",
                    step,
                )
            self._persist(rollout)

    def _start_due(self, rollout: Rollout, now: float) -> None:
        """Start pending devices at the rate (fixed or ramp), within max_in_progress."""
        if rollout.state != "running":
            return
        limit = rollout.spec.max_in_progress
        while True:
            interval = 60.0 / rollout.rate_per_min()
            if rollout.last_start and now - rollout.last_start < interval:
                return
            if limit is not None and rollout.in_progress() >= limit:
                return
            step = next((s for s in rollout.steps if s.state == "pending"), None)
            if step is None:
                return
            # A late tick may catch up by one tick's worth, never by a burst: a controller
            # that was down for an hour does not start an hour of devices at once.
            rollout.last_start = (
                max(rollout.last_start + interval, now - interval - TICK_S)
                if rollout.last_start
                else now
            )
            self._start(rollout, step, now)

    def _start(self, rollout: Rollout, step: DeviceStep, now: float) -> None:
        step.move("starting", now)
        step.started_at, step.command_index, step.error = now, 0, None
        commands = self._commands(rollout, step)
        rollout.record(now, "start", " then ".join(op for op, _ in commands), step)
        self._send_next(rollout, step, commands, now)

    def _commands(self, rollout: Rollout, step: DeviceStep) -> list[Command]:
        kind = KINDS[rollout.spec.kind]
        if step.state == "rolling_back":
            return kind.rollback_commands(rollout.spec, step.previous) or []
        return kind.start_commands(rollout.spec, rollout.source)

    def _send_next(
        self, rollout: Rollout, step: DeviceStep, commands: list[Command], now: float
    ) -> None:
        op, args = commands[step.command_index]
        step.sent_at = now
        rollout.dirty.add(step.device_id)
        try:
            step.cmd_id = self.controller.send_command(
                step.device_id, op, args, source=f"rollout:{rollout.id}"
            )
        except EdgeAgentError as exc:
            why = f"{op} not sent: {exc.code}: {exc.message}"
            if step.state == "starting":
                self._fail(rollout, step, now, "failure", why)
            else:
                self._rollback_failed(rollout, step, now, why)
            return
        self._by_command[step.cmd_id] = (rollout, step)

    def _fail(
        self, rollout: Rollout, step: DeviceStep, now: float, decision: str, reason: str
    ) -> None:
        """A device failed the rollout: counted, and rolled back when it may have switched."""
        self._by_command.pop(step.cmd_id or "", None)
        self._forget_canary(step.canary_id)
        # A start command that timed out may still have been carried out.
        maybe_switched = step.switched or (decision == "timeout" and step.state == "starting")
        step.move("failed", now)
        step.outcome, step.error, step.crashed = "failed", reason, None
        rollout.record(now, decision, reason, step)
        log.warning(
            "rollout_device_failed", rollout=rollout.id, device=step.device_id, reason=reason
        )
        if maybe_switched:
            self._roll_back(rollout, step, now, "it failed after switching")

    def _roll_back(self, rollout: Rollout, step: DeviceStep, now: float, why: str) -> None:
        self._by_command.pop(step.cmd_id or "", None)
        self._forget_canary(step.canary_id)
        step.move("rolling_back", now)
        step.command_index = 0
        commands = self._commands(rollout, step)
        if not commands:
            self._rollback_failed(rollout, step, now, "nothing known to roll back to")
            return
        rollout.record(now, "rollback", f"{why}: " + " then ".join(op for op, _ in commands), step)
        self._send_next(rollout, step, commands, now)

    def _rollback_failed(self, rollout: Rollout, step: DeviceStep, now: float, why: str) -> None:
        self._by_command.pop(step.cmd_id or "", None)
        step.move("rollback_failed", now)
        step.error = why
        rollout.record(now, "rollback_failed", why, step)

    def _settle(self, rollout: Rollout, now: float) -> None:
        """Abort on evidence; finish when nothing is left to do."""
        rolling_back = any(s.state == "rolling_back" for s in rollout.steps)
        if rollout.state == "running":
            reason = rollout.abort_reason()
            if reason is not None:
                self._abort(rollout, now, reason)
            elif not rolling_back and not any(
                s.state == "pending" or s.state in IN_PROGRESS for s in rollout.steps
            ):
                succeeded, failed = rollout.outcomes()
                rollout.move("completed", f"{succeeded} succeeded, {failed} failed")
                rollout.record(now, "complete", rollout.reason or "")
        elif rollout.state == "aborting" and not rolling_back:
            rollout.move("aborted")
            rollout.record(now, "aborted", "every switched device was rolled back")
        elif rollout.state == "rolling_back" and not rolling_back:
            rollout.move("rolled_back")
            rollout.record(now, "rolled_back", "every switched device was rolled back")

    def _abort(self, rollout: Rollout, now: float, reason: str) -> None:
        rollout.move("aborting", reason)
        rollout.record(now, "abort", reason)
        log.warning("rollout_aborted", rollout=rollout.id, reason=reason)
        for step in rollout.steps:
            if step.state == "pending":
                step.move("skipped", now)
                rollout.dirty.add(step.device_id)
            elif step.state in IN_PROGRESS or step.state == "done":
                self._roll_back(rollout, step, now, "the rollout aborted")
        if not any(s.state == "rolling_back" for s in rollout.steps):
            rollout.move("aborted")

    def _persist(self, rollout: Rollout) -> None:
        if not (rollout.dirty or rollout.unsaved_events):
            return
        self.controller.registry.save_rollout(
            rollout.id,
            rollout.state,
            rollout.reason,
            step_rows(rollout, only_dirty=True),
            events=event_rows(rollout),
        )
        rollout.dirty.clear()
        rollout.unsaved_events.clear()
