"""What a rollout sends one device, and what the answers mean: its kind's start commands, or,
once it failed after switching, the commands that put back what it ran, one at a time, each
under a lease renewed just before it goes out; failing a device; rolling it back.

Runs under the manager's lock, on the rollout thread or the ingest thread, and is given
``now`` (the manager's clock). It does not decide when a device starts (the driver paces) or
whether it is healthy (the health gate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.errors import EdgeAgentError
from agent.fleet.rollout._gate import HealthGate
from agent.fleet.rollout._kinds import KINDS, Command
from agent.fleet.rollout._state import DeviceStep, Rollout
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.fleet.controller import FleetController
    from agent.fleet.rollout._leases import RolloutLeases

log = get_logger(__name__)


class DeviceCommands:
    def __init__(
        self, controller: FleetController, gate: HealthGate, leases: RolloutLeases
    ) -> None:
        self.controller = controller
        self.gate = gate
        self.leases = leases
        # The commands whose cmd/result a step waits for: command id -> (rollout, step).
        self.waiting: dict[str, tuple[Rollout, DeviceStep]] = {}

    def forget(self, rollout_id: str) -> None:
        """Stop waiting for the rollout's commands (its lease went elsewhere)."""
        for cmd_id in [k for k, (r, _) in self.waiting.items() if r.id == rollout_id]:
            del self.waiting[cmd_id]

    def start(self, rollout: Rollout, step: DeviceStep, now: float) -> bool:
        """Send a pending device its first start command; False when the lease is gone:
        nothing was sent."""
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
        if not self.leases.renew_lease(rollout.id):
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
                self.fail(rollout, step, now, "failure", why)
            else:
                self.rollback_failed(rollout, step, now, why)
            return True
        self.waiting[step.cmd_id] = (rollout, step)
        return True

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
                self.fail(rollout, step, now, "failure", why.strip())
            else:
                self.rollback_failed(rollout, step, now, why.strip())
            return
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

    def fail(
        self, rollout: Rollout, step: DeviceStep, now: float, decision: str, reason: str
    ) -> None:
        """A device failed the rollout: counted, and rolled back when it may have switched."""
        self.waiting.pop(step.cmd_id or "", None)
        self.gate.forget_canary(step.canary_id)
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
        self.waiting.pop(step.cmd_id or "", None)
        self.gate.forget_canary(step.canary_id)
        step.move("rolling_back", now)
        step.command_index = 0
        commands = self._commands(rollout, step)
        if not commands:
            self.rollback_failed(rollout, step, now, "nothing known to roll back to")
            return
        rollout.record(now, "rollback", f"{why}: " + " then ".join(op for op, _ in commands), step)
        self._send_next(rollout, step, commands, now)

    def rollback_failed(self, rollout: Rollout, step: DeviceStep, now: float, why: str) -> None:
        self.waiting.pop(step.cmd_id or "", None)
        step.move("rollback_failed", now)
        step.error = why
        rollout.record(now, "rollback_failed", why, step)
