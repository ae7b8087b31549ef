"""The rollouts one controller drives, tick by tick: a device that takes too long fails, the
watched ones go through the health gate (agent.fleet.rollout._gate), pending ones start at
the rate (fixed or ramp) within max_in_progress, devices that came to match a dynamic target
join, and the rollout aborts on evidence or finishes. What is sent to a device and what its
answers mean is agent.fleet.rollout._commands.

See agent.fleet.rollout._manager for the threads and agent.fleet.rollout._leases for the
lease: every method here runs under the manager's lock, on the rollout thread or the ingest
thread, and is given ``now`` (the manager's clock)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from agent.fleet.rollout._commands import DeviceCommands
from agent.fleet.rollout._gate import HealthGate
from agent.fleet.rollout._kinds import KINDS
from agent.fleet.rollout._state import (
    IN_PROGRESS,
    SENDING,
    WATCHED,
    DeviceStep,
    Rollout,
    event_rows,
    step_rows,
)
from agent.fleet.rollout._target import Target
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.fleet.controller import FleetController
    from agent.fleet.rollout._leases import RolloutLeases

log = get_logger(__name__)

TICK_S = 0.25  # how often the manager's thread drives (a late tick catches up by one)
SYNC_S = 1.0  # how often a rollout looks for devices that joined its target


class RolloutDriver:
    def __init__(
        self, controller: FleetController, device_timeout_s: float, leases: RolloutLeases
    ) -> None:
        self.controller = controller
        self.leases = leases
        self.device_timeout_s = device_timeout_s  # a spec's device_timeout_s overrides it
        self.gate = HealthGate(controller)
        self.commands = DeviceCommands(controller, self.gate, leases)
        self._targets: dict[str, Target] = {}
        self._joins_checked: dict[str, float] = {}

    def forget(self, rollout_id: str) -> None:
        """Stop waiting for the rollout's commands and canaries (its lease went elsewhere)."""
        self.commands.forget(rollout_id)
        self.gate.forget(rollout_id)

    def drive(self, rollout: Rollout, now: float) -> None:
        kind = KINDS[rollout.spec.kind]
        timeout = rollout.spec.device_timeout_s or self.device_timeout_s
        if rollout.state == "running":
            self._admit_joiners(rollout, now)
        for step in rollout.steps:
            if step.state in IN_PROGRESS and now - step.started_at > timeout:
                self.commands.fail(
                    rollout,
                    step,
                    now,
                    "timeout",
                    f"not through the health gate within {timeout:g} s of its start"
                    f" (still {step.state}" + (f": {step.error})" if step.error else ")"),
                )
            elif step.state == "rolling_back" and now - step.sent_at > timeout:
                self.commands.rollback_failed(
                    rollout, step, now, f"timeout: no cmd/result within {timeout:g} s"
                )
            elif step.state in WATCHED:
                failure = self.gate.watch(rollout, kind, step, now)
                if failure is not None:
                    self.commands.fail(rollout, step, now, "failure", failure)
        self._start_due(rollout, now)
        self.settle(rollout, now)

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
        busy = self.leases.busy_devices(rollout.id)  # one device is in one rollout at a time
        for record in sorted(self.controller.registry.snapshot(), key=lambda r: r.id):
            if (
                rollout.step_of(record.id) is None
                and record.id not in busy
                and target.matches(record)
            ):
                step = DeviceStep(record.id, len(rollout.steps), previous=kind.previous_of(record))
                rollout.add_step(step)
                rollout.record(now, "join", "came to match the target while it runs", step)

    def take_canary_replies(self, rollouts: dict[str, Rollout], now: float) -> None:
        for rollout, step, failure in self.gate.replies(rollouts, now):
            if failure is not None:
                self.commands.fail(rollout, step, now, "failure", failure)
            self.persist(rollout)

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
            if not self.commands.start(rollout, step, now):
                return

    def settle(self, rollout: Rollout, now: float) -> None:
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
        self.roll_back_all(rollout, now, "the rollout aborted")
        if not any(s.state == "rolling_back" for s in rollout.steps):
            rollout.move("aborted")
            rollout.record(now, "aborted", "no device needed rolling back")

    def roll_back_all(self, rollout: Rollout, now: float, why: str) -> None:
        """Skip the devices not started yet and roll back every one started, done included."""
        for step in rollout.steps:
            if step.state == "pending":
                step.move("skipped", now)
                rollout.dirty.add(step.device_id)
            elif step.state in IN_PROGRESS or step.state == "done":
                self.commands.roll_back(rollout, step, now, why)

    def persist(self, rollout: Rollout) -> None:
        if not (rollout.dirty or rollout.unsaved_events):
            return
        if not self.controller.registry.save_rollout(
            rollout.id,
            rollout.state,
            rollout.reason,
            step_rows(rollout, only_dirty=True),
            owner=self.leases.owner,
            events=event_rows(rollout),
        ):
            self.leases.lease_lost(rollout.id)
            return
        rollout.dirty.clear()
        rollout.unsaved_events.clear()

    def on_cmd_result(self, device_id: str, body: dict[str, Any], now: float) -> None:
        """A cmd/result from a device: it moves on the step that waits for it, if any."""
        found = self.commands.waiting.pop(str(body.get("id")), None)
        if found is None:
            return
        rollout, step = found
        if step.device_id != device_id or step.state not in SENDING:
            return
        self.commands.answered(rollout, step, body, now)
        self.settle(rollout, now)
        self.persist(rollout)

    def resume(self, rollout: Rollout, now: float) -> None:
        """Wait again for the commands of a rollout whose lease this controller just took,
        settling those answered while no one here was waiting (every controller records
        every cmd/result)."""
        for step in rollout.steps:
            if not (step.cmd_id and step.state in SENDING):
                continue
            self.commands.waiting[step.cmd_id] = (rollout, step)
            command = self.controller.registry.command(step.cmd_id)
            if command is not None and command["done_ts"] is not None:
                self.on_cmd_result(
                    step.device_id,
                    {"id": step.cmd_id, "ok": command["ok"], "error": command["result"]},
                    now,
                )
        self.persist(rollout)

    def event(self, rollout: Rollout, step: DeviceStep, body: dict[str, Any]) -> None:
        """A device event: download progress of its start, or a fatal event while watched."""
        name = body.get("event")
        if name == "download" and step.state in SENDING:
            total, done = body.get("total"), body.get("bytes")
            if isinstance(total, int) and isinstance(done, int) and total > 0:
                step.progress = min(1.0, done / total)
        elif name in KINDS[rollout.spec.kind].fatal_events and step.state in WATCHED:
            reason = body.get("reason")
            step.crashed = f"{name}" + (f": {reason}" if isinstance(reason, str) else "")
