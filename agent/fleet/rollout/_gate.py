"""The health gate a device passes once its start commands were answered ok: it must serve the
new target (its kind's ``serving``: for a model, ``ready`` with the new model's sha256), answer
a canary prompt sent by this controller, and stay healthy for ``soak_s``.

The gate decides and moves a step through verifying → canary → soaking → done; it does not
fail a device itself. Each check returns why the device fails (or None), and the driver
(agent.fleet.rollout._driver) fails it and rolls it back. Runs under the manager's lock, on
the rollout thread; a canary's reply arrives on paho's thread, which only enqueues it.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from agent.errors import EdgeAgentError
from agent.fleet.rollout._kinds import RolloutKind
from agent.fleet.rollout._state import DeviceStep, Rollout

if TYPE_CHECKING:
    from agent.fleet.controller import FleetController
    from agent.fleet.registry import DeviceRecord


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


class HealthGate:
    def __init__(self, controller: FleetController) -> None:
        self.controller = controller
        # Canary prompts in flight: request id -> (rollout id, device id, reply waiter key).
        self.canaries: dict[str, tuple[str, str, str]] = {}
        self.canary_replies: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()

    def forget(self, rollout_id: str) -> None:
        """Stop waiting for the rollout's canaries (its lease went elsewhere)."""
        for request_id in [k for k, v in self.canaries.items() if v[0] == rollout_id]:
            self.forget_canary(request_id)

    def forget_canary(self, request_id: str | None) -> None:
        found = self.canaries.pop(request_id or "", None)
        if found is not None:
            self.controller.remove_waiter(found[2])

    def watch(
        self, rollout: Rollout, kind: RolloutKind, step: DeviceStep, now: float
    ) -> str | None:
        """Move a watched step on through the gate: why it fails, or None."""
        record = self.controller.registry.devices.get(step.device_id)
        if record is None:
            return None
        restarts = record.telemetry.get("worker_restarts")
        unhealthy = _unhealthy(kind, step, record, restarts)
        if unhealthy is not None:
            return unhealthy
        serving, what = kind.serving(rollout.expect, record)
        if step.state == "verifying":
            if not serving:
                if step.error != what:
                    step.error = what
                    rollout.dirty.add(step.device_id)
                return None
            step.error = None
            step.restarts = restarts if isinstance(restarts, int) else None
            step.move("canary", now)
            rollout.record(now, "healthy", what, step)
            return self._send_canary(rollout, step)
        if step.state == "canary":
            if step.canary_id not in self.canaries:  # sent by an earlier driver
                return self._send_canary(rollout, step)
            return None
        if not serving:
            return f"during the soak: {what}"
        if now - step.since >= rollout.spec.soak_s:
            step.move("done", now)
            step.outcome = "succeeded"
            rollout.record(
                now, "success", f"healthy for {rollout.spec.soak_s:g} s after its canary", step
            )
        return None

    def _send_canary(self, rollout: Rollout, step: DeviceStep) -> str | None:
        """Send the step its canary prompt: None, or why it could not be sent."""
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
            return f"canary not sent: {exc.code}: {exc.message}"
        if step.canary_id in self.canaries:
            self.forget_canary(step.canary_id)
        self.canaries[request_id] = (rollout.id, step.device_id, sent.key)
        step.canary_id = request_id
        rollout.dirty.add(step.device_id)
        return None

    def replies(
        self, rollouts: dict[str, Rollout], now: float
    ) -> Iterator[tuple[Rollout, DeviceStep, str | None]]:
        """The canary replies that arrived since the last tick, for steps still waiting on
        them: each step answered moves to soaking (None) or comes with why it fails."""
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
            yield rollout, step, _canary_answered(rollout, step, body, now)


def _unhealthy(
    kind: RolloutKind, step: DeviceStep, record: DeviceRecord, restarts: Any
) -> str | None:
    """Why a watched device fails whatever it serves: a fatal event, status or restart."""
    if step.crashed:
        return f"{step.crashed} while {step.state}"
    if record.state in kind.fatal_states:
        problem = record.meta.get("problem")
        detail = f" ({problem})" if isinstance(problem, str) and problem else ""
        return f"reports {record.state}{detail}"
    if step.restarts is not None and isinstance(restarts, int) and restarts > step.restarts:
        return f"its worker restarted ({restarts - step.restarts} times) while {step.state}"
    return None


def _canary_answered(
    rollout: Rollout, step: DeviceStep, body: dict[str, Any], now: float
) -> str | None:
    """Read the canary's final record: why the device fails, or None, soaking."""
    try:
        final = msgspec.convert(body, CanaryFinal)
    except msgspec.ValidationError as exc:
        return f"the canary reply is malformed: {exc}"
    if final.error is not None:
        return f"the canary prompt failed: {final.error.code}: {final.error.message}"
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
    return None
