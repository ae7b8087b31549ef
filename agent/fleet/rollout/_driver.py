"""The per-device work of the rollouts one controller drives: start commands, the health
gate (serving the new target, the canary prompt, the soak), pacing, failures, abort and
rollback. See agent.fleet.rollout._manager for the threads and the lease: every method here
runs under the manager's lock, on the rollout thread or the ingest thread, and is given
``now`` (the manager's clock)."""

from __future__ import annotations

import queue
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import msgspec

from agent.errors import EdgeAgentError
from agent.fleet.rollout._kinds import KINDS, Command, RolloutKind
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

log = get_logger(__name__)

TICK_S = 0.25  # how often the manager's thread drives (a late tick catches up by one)
SYNC_S = 1.0  # how often a rollout looks for devices that joined its target


class Lease(Protocol):
    """What the driver asks of the manager that holds the rollouts' leases."""

    owner: str

    def renew_lease(self, rollout_id: str) -> bool:
        """Renew the lease in the registry: False when another controller holds it."""

    def lease_lost(self, rollout_id: str) -> None:
        """Stop driving the rollout: another controller holds its lease."""

    def busy_devices(self, except_rollout: str) -> set[str]:
        """Devices with a step still to do in an active rollout other than this one."""


class CanaryUsage(msgspec.Struct):
    completion_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None


class CanaryError(msgspec.Struct):
    code: Annotated[str, msgspec.Meta(max_length=64)] = "error"
    message: Annotated[str, msgspec.Meta(max_length=1000)] = ""


class CanaryFinal(msgspec.Struct):
    """The final record of a canary prompt's reply: all the health gate reads of it."""

    done: bool
    error: CanaryError | None = None
    usage: CanaryUsage | None = None


class RolloutDriver:
    def __init__(self, controller: FleetController, device_timeout_s: float, lease: Lease) -> None:
        self.controller = controller
        self.lease = lease
        self.device_timeout_s = device_timeout_s  # a spec's device_timeout_s overrides it
        self.by_command: dict[str, tuple[Rollout, DeviceStep]] = {}
        # Canary prompts in flight: request id -> (rollout id, device id, reply waiter key).
        self.canaries: dict[str, tuple[str, str, str]] = {}
        self.canary_replies: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self._targets: dict[str, Target] = {}
        self._joins_checked: dict[str, float] = {}

    def forget(self, rollout_id: str) -> None:
        """Stop waiting for the rollout's commands and canaries (its lease went elsewhere)."""
        for cmd_id in [k for k, (r, _) in self.by_command.items() if r.id == rollout_id]:
            del self.by_command[cmd_id]
        for request_id in [k for k, v in self.canaries.items() if v[0] == rollout_id]:
            self.forget_canary(request_id)

    def drive(self, rollout: Rollout, now: float) -> None:
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
        busy = self.lease.busy_devices(rollout.id)  # one device is in one rollout at a time
        for record in sorted(self.controller.registry.snapshot(), key=lambda r: r.id):
            if (
                rollout.step_of(record.id) is None
                and record.id not in busy
                and target.matches(record)
            ):
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
            if step.canary_id not in self.canaries:  # sent by an earlier driver
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
        replies = self.canary_replies

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
        if step.canary_id in self.canaries:
            self.forget_canary(step.canary_id)
        self.canaries[request_id] = (rollout.id, step.device_id, sent.key)
        step.canary_id = request_id
        rollout.dirty.add(step.device_id)

    def forget_canary(self, request_id: str | None) -> None:
        found = self.canaries.pop(request_id or "", None)
        if found is not None:
            self.controller.remove_waiter(found[2])

    def take_canary_replies(self, rollouts: dict[str, Rollout], now: float) -> None:
        while True:
            try:
                request_id, body = self.canary_replies.get_nowait()
            except queue.Empty:
                return
            found = self.canaries.get(request_id)
            self.forget_canary(request_id)
            if found is None:
                continue
            rollout = rollouts.get(found[0])
            step = rollout.step_of(found[1]) if rollout else None
            if rollout is None or step is None or step.state != "canary":
                continue
            if step.canary_id != request_id:
                continue
            try:
                final = msgspec.convert(body, CanaryFinal)
            except msgspec.ValidationError as exc:
                self._fail(rollout, step, now, "failure", f"the canary reply is malformed: {exc}")
            else:
                if final.error is not None:
                    why = f"the canary prompt failed: {final.error.code}: {final.error.message}"
                    self._fail(rollout, step, now, "failure", why)
                else:
                    tokens = final.usage.completion_tokens if final.usage else None
                    step.move("soaking", now)
                    rollout.record(
                        now,
                        "canary",
                        "answered the canary prompt"
                        + (f" ({tokens} tokens)" if tokens is not None else "")
                        + f"; soaking {rollout.spec.soak_s:g} s",
                        step,
                    )
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
            if not self._start(rollout, step, now):
                return

    def _start(self, rollout: Rollout, step: DeviceStep, now: float) -> bool:
        """False when the lease is gone: nothing was sent."""
        step.move("starting", now)
        step.started_at, step.command_index, step.error = now, 0, None
        commands = self._commands(rollout, step)
        rollout.record(now, "start", " then ".join(op for op, _ in commands), step)
        return self._send_next(rollout, step, commands, now)

    def _commands(self, rollout: Rollout, step: DeviceStep) -> list[Command]:
        kind = KINDS[rollout.spec.kind]
        if step.state == "rolling_back":
            return kind.rollback_commands(rollout.spec, step.previous) or []
        return kind.start_commands(rollout.spec, rollout.source)

    def _send_next(
        self, rollout: Rollout, step: DeviceStep, commands: list[Command], now: float
    ) -> bool:
        """Send the step's next command; False, sending nothing, when the lease is gone (the
        next persist then writes nothing and drops the rollout)."""
        # The lease is renewed every lease_s / 4; a rollback forced on another controller
        # meanwhile must not be undone by a command sent from this one.
        if not self.lease.renew_lease(rollout.id):
            return False
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
            return True
        self.by_command[step.cmd_id] = (rollout, step)
        return True

    def _fail(
        self, rollout: Rollout, step: DeviceStep, now: float, decision: str, reason: str
    ) -> None:
        """A device failed the rollout: counted, and rolled back when it may have switched."""
        self.by_command.pop(step.cmd_id or "", None)
        self.forget_canary(step.canary_id)
        # A start command that timed out may still have been carried out.
        maybe_switched = step.switched or (decision == "timeout" and step.state == "starting")
        step.move("failed", now)
        step.outcome, step.error, step.crashed = "failed", reason, None
        rollout.record(now, decision, reason, step)
        log.warning(
            "rollout_device_failed", rollout=rollout.id, device=step.device_id, reason=reason
        )
        if maybe_switched:
            self.roll_back(rollout, step, now, "it failed after switching")

    def roll_back(self, rollout: Rollout, step: DeviceStep, now: float, why: str) -> None:
        self.by_command.pop(step.cmd_id or "", None)
        self.forget_canary(step.canary_id)
        step.move("rolling_back", now)
        step.command_index = 0
        commands = self._commands(rollout, step)
        if not commands:
            self._rollback_failed(rollout, step, now, "nothing known to roll back to")
            return
        rollout.record(now, "rollback", f"{why}: " + " then ".join(op for op, _ in commands), step)
        self._send_next(rollout, step, commands, now)

    def _rollback_failed(self, rollout: Rollout, step: DeviceStep, now: float, why: str) -> None:
        self.by_command.pop(step.cmd_id or "", None)
        step.move("rollback_failed", now)
        step.error = why
        rollout.record(now, "rollback_failed", why, step)

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
        for step in rollout.steps:
            if step.state == "pending":
                step.move("skipped", now)
                rollout.dirty.add(step.device_id)
            elif step.state in IN_PROGRESS or step.state == "done":
                self.roll_back(rollout, step, now, "the rollout aborted")
        if not any(s.state == "rolling_back" for s in rollout.steps):
            rollout.move("aborted")
            rollout.record(now, "aborted", "no device needed rolling back")

    def persist(self, rollout: Rollout) -> None:
        if not (rollout.dirty or rollout.unsaved_events):
            return
        if not self.controller.registry.save_rollout(
            rollout.id,
            rollout.state,
            rollout.reason,
            step_rows(rollout, only_dirty=True),
            owner=self.lease.owner,
            events=event_rows(rollout),
        ):
            self.lease.lease_lost(rollout.id)
            return
        rollout.dirty.clear()
        rollout.unsaved_events.clear()

    def answered(
        self, rollout: Rollout, step: DeviceStep, body: dict[str, Any], now: float
    ) -> None:
        """A cmd/result for the command ``step`` waits on: the next command, the health gate,
        or the end of its rollback."""
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
        self.settle(rollout, now)

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
