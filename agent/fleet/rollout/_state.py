"""A rollout and its device steps: two small state machines (an enum of names and one table
of transitions each), their decision events, and how the registry stores them.

No I/O and no clock: the manager passes ``now`` in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from agent.fleet.rollout._spec import RolloutSpec, abort_reason, start_rate

# --- a device's step ------------------------------------------------------------------------
# pending → starting (its kind's commands, one after another) → verifying (until it serves the
# new target) → canary (a prompt from the controller) → soaking (healthy for soak_s) → done.
# Any in-progress state → failed. A device that had switched, done or failed, goes
# rolling_back → rolled_back | rollback_failed; pending → skipped when the rollout stops.
STEP_TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"starting", "skipped"}),
    "starting": frozenset({"verifying", "failed", "rolling_back"}),
    "verifying": frozenset({"canary", "failed", "rolling_back"}),
    "canary": frozenset({"soaking", "failed", "rolling_back"}),
    "soaking": frozenset({"done", "failed", "rolling_back"}),
    "done": frozenset({"rolling_back"}),
    "failed": frozenset({"rolling_back"}),
    "rolling_back": frozenset({"rolled_back", "rollback_failed"}),
    "rolled_back": frozenset(),
    "rollback_failed": frozenset(),
    "skipped": frozenset(),
}
IN_PROGRESS = frozenset({"starting", "verifying", "canary", "soaking"})
SENDING = frozenset({"starting", "rolling_back"})  # states that wait for a cmd/result
WATCHED = frozenset({"verifying", "canary", "soaking"})  # states the health gate watches
# A device in one of these is being moved by its rollout: no other rollout may take it.
STILL_TO_DO = IN_PROGRESS | {"pending", "rolling_back"}

# --- the rollout ----------------------------------------------------------------------------
# running → completed | aborting (rolling back what switched) → aborted; running, completed,
# aborting or aborted → rolling_back (asked for) → rolled_back.
ROLLOUT_TRANSITIONS: dict[str, frozenset[str]] = {
    "running": frozenset({"completed", "aborting", "aborted", "rolling_back"}),
    "aborting": frozenset({"aborted", "rolling_back"}),
    "completed": frozenset({"rolling_back"}),
    "aborted": frozenset({"rolling_back"}),
    "rolling_back": frozenset({"rolled_back"}),
    "rolled_back": frozenset({"rolling_back"}),
}
ACTIVE = frozenset({"running", "aborting", "rolling_back"})
# What controllers before the health gate stored mid-command: (state, command index).
LEGACY_STATES = {
    "set_manifest": ("starting", 0),
    "pin": ("starting", 1),
    "rolling_back_pin": ("rolling_back", 1),
}
LEGACY_OUTCOMES = {"done": "succeeded", "failed": "failed"}


class TransitionError(RuntimeError):
    """A move the tables above do not allow: a bug in the manager, never a user's input."""


@dataclass
class DeviceStep:
    device_id: str
    position: int
    state: str = "pending"
    previous: dict[str, Any] = field(default_factory=dict)  # what to roll back to (its kind's)
    cmd_id: str | None = None  # the command whose cmd/result it waits for
    sent_at: float = 0.0  # when that command went out
    progress: float | None = None  # download progress of its start
    error: str | None = None  # why it failed, or what it waits for
    outcome: str | None = None  # succeeded | failed: kept through a rollback, for the counts
    started_at: float = 0.0  # when its first command went out: its timeout counts from here
    since: float = 0.0  # when it entered ``state``: the soak counts from here
    command_index: int = 0  # which of its state's commands is in flight
    switched: bool = False  # a start command was answered ok: it may run the new target
    canary_id: str | None = None  # the canary prompt's request id
    restarts: int | None = None  # the worker restarts its telemetry showed when it was verified
    crashed: str | None = None  # a fatal event seen while watched, for the next tick

    def move(self, state: str, now: float) -> None:
        if state not in STEP_TRANSITIONS[self.state]:
            raise TransitionError(f"step {self.device_id}: {self.state} -> {state}")
        self.state, self.since = state, now

    def detail(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "started_at": self.started_at,
            "since": self.since,
            "command_index": self.command_index,
            "switched": self.switched,
            "canary_id": self.canary_id,
            "restarts": self.restarts,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "state": self.state,
            "outcome": self.outcome,
            "progress": self.progress,
            "error": self.error,
            "previous": self.previous,
            "cmd_id": self.cmd_id,
            "started_at": self.started_at or None,
            "since": self.since or None,
            "switched": self.switched,
        }


@dataclass
class RolloutEvent:
    """One decision, with its reason: what the rollout page and the events API show."""

    ts: float
    decision: str  # created join start switched healthy canary success failure timeout abort
    # aborted rollback rolled_back rollback_failed complete rollback_requested resume
    reason: str
    device_id: str | None = None
    id: int | None = None  # the registry's, once stored

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "device_id": self.device_id,
            "decision": self.decision,
            "reason": self.reason,
        }


@dataclass
class Rollout:
    id: str
    spec: RolloutSpec
    source: str  # where devices are sent (the manifest's URL)
    created: float
    expect: dict[str, Any] = field(default_factory=dict)  # the kind's, see _kinds
    state: str = "running"
    reason: str | None = None
    steps: list[DeviceStep] = field(default_factory=list)
    last_start: float = 0.0
    unsaved_events: list[RolloutEvent] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)  # device ids whose step changed, unsaved
    _by_device: dict[str, DeviceStep] = field(default_factory=dict, repr=False)

    def add_step(self, step: DeviceStep) -> None:
        self.steps.append(step)
        self._by_device[step.device_id] = step
        self.dirty.add(step.device_id)

    def step_of(self, device_id: str) -> DeviceStep | None:
        return self._by_device.get(device_id)

    def move(self, state: str, reason: str | None = None) -> None:
        if state not in ROLLOUT_TRANSITIONS.get(self.state, frozenset()):
            raise TransitionError(f"rollout {self.id}: {self.state} -> {state}")
        self.state = state
        if reason is not None:
            self.reason = reason

    def record(
        self, now: float, decision: str, reason: str, step: DeviceStep | None = None
    ) -> None:
        self.unsaved_events.append(
            RolloutEvent(now, decision, reason, step.device_id if step else None)
        )
        if step is not None:
            self.dirty.add(step.device_id)

    def outcomes(self) -> tuple[int, int]:
        succeeded = sum(1 for s in self.steps if s.outcome == "succeeded")
        failed = sum(1 for s in self.steps if s.outcome == "failed")
        return succeeded, failed

    def abort_reason(self) -> str | None:
        succeeded, failed = self.outcomes()
        return abort_reason(self.spec, succeeded, failed, len(self.steps))

    def rate_per_min(self) -> float:
        return start_rate(self.spec, self.outcomes()[0])

    def in_progress(self) -> int:
        return sum(1 for s in self.steps if s.state in IN_PROGRESS)

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for step in self.steps:
            counts[step.state] = counts.get(step.state, 0) + 1
        succeeded, failed = self.outcomes()
        finished = succeeded + failed
        return {
            "id": self.id,
            "kind": self.spec.kind,
            "state": self.state,
            "reason": self.reason,
            "created": self.created,
            "source": self.source,
            "spec": msgspec.to_builtins(self.spec),
            "expect": self.expect,
            "counts": counts,
            "succeeded": succeeded,
            "failed": failed,
            "finished": finished,
            "failure_percent": round(failed * 100.0 / finished, 1) if finished else None,
            "in_progress": self.in_progress(),
            "rate_per_min": self.rate_per_min(),
            "devices": [step.to_dict() for step in self.steps],
        }


def step_rows(rollout: Rollout, only_dirty: bool = False) -> list[tuple]:
    """Steps as ``Registry.save_rollout`` stores them: all, or those changed since last saved."""
    return [
        (
            step.device_id,
            step.position,
            step.state,
            msgspec.json.encode(step.previous).decode(),
            step.cmd_id,
            step.progress,
            step.error,
            step.sent_at or None,
            msgspec.json.encode(step.detail()).decode(),
        )
        for step in rollout.steps
        if not only_dirty or step.device_id in rollout.dirty
    ]


def event_rows(rollout: Rollout) -> list[tuple]:
    return [(e.ts, e.device_id, e.decision, e.reason) for e in rollout.unsaved_events]


def rollout_of(row: dict[str, Any], step_rows_: list[dict[str, Any]]) -> Rollout:
    """A rollout as the registry stores it."""
    spec = msgspec.json.decode(row["spec"], type=RolloutSpec)
    rollout = Rollout(
        id=row["id"],
        spec=spec,
        source=spec.manifest,
        created=row["created_ts"],
        expect=msgspec.json.decode(row["expect"] or "{}"),
        state=row["state"],
        reason=row["reason"],
    )
    for stored in step_rows_:
        detail = msgspec.json.decode(stored["detail"] or "{}")
        state, command_index = LEGACY_STATES.get(stored["state"], (stored["state"], None))
        step = DeviceStep(
            stored["device_id"],
            stored["position"],
            state=state,
            previous=msgspec.json.decode(stored["previous"] or "{}"),
            cmd_id=stored["cmd_id"],
            sent_at=stored["updated_ts"] or 0.0,
            progress=stored["progress"],
            error=stored["error"],
            # Before outcomes were stored, done and failed were the outcome.
            outcome=detail.get("outcome") or LEGACY_OUTCOMES.get(stored["state"]),
            started_at=detail.get("started_at") or 0.0,
            since=detail.get("since") or 0.0,
            command_index=command_index or detail.get("command_index") or 0,
            switched=bool(detail.get("switched")),
            canary_id=detail.get("canary_id"),
            restarts=detail.get("restarts"),
        )
        rollout.add_step(step)
        rollout.last_start = max(rollout.last_start, step.started_at)
    rollout.dirty.clear()
    return rollout
