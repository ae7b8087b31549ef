"""Rollouts: move a set of devices to a new target at a paced rate, gated on each device's
health, aborted on evidence, rolled back, every decision kept with its reason.

``_spec`` is what an operator asks for and the pure policy read from it (rate, ramp, abort);
``_kinds`` what a rollout does to one device per kind (``model``; an agent ``upgrade`` plugs in
beside it); ``_target`` which devices it targets; ``_state`` the rollout's and each device's
state machine and how the registry stores them; ``_manager`` the API and the thread that drives
them; ``_leases`` which controller drives which rollout; ``_driver`` the pacing, timeouts, abort
and completion of a rollout; ``_commands`` what is sent to a device (start, rollback) and what
its answers mean; ``_gate`` the health gate (serving the new target, the canary, the soak).
"""

from agent.fleet.rollout._kinds import KINDS, ModelKind, RolloutKind
from agent.fleet.rollout._manager import RolloutManager, needs_driver
from agent.fleet.rollout._spec import AgentWheelRef, RolloutSpec, abort_reason, start_rate
from agent.fleet.rollout._state import DeviceStep, Rollout, RolloutEvent
from agent.fleet.rollout._target import Target

__all__ = [
    "KINDS",
    "AgentWheelRef",
    "DeviceStep",
    "ModelKind",
    "Rollout",
    "RolloutEvent",
    "RolloutKind",
    "RolloutManager",
    "RolloutSpec",
    "Target",
    "abort_reason",
    "needs_driver",
    "start_rate",
]
