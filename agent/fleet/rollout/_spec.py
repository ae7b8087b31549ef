"""What an operator asks of a rollout (``RolloutSpec``, the body of ``POST /api/rollouts``) and
the pure policy read from it: the start rate (fixed, or an exponential ramp as AWS IoT Jobs
does), how many devices may be in progress, and when the evidence says abort.

Pure: numbers in, numbers or a sentence out. No I/O, no clock.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import msgspec

from agent.errors import RequestError

DEFAULT_RATE_PER_MIN = 10.0

Rate = Annotated[float, msgspec.Meta(gt=0, le=100_000)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=7 * 86400)]
Devices = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]


class AgentWheelRef(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A hosted edge-agent wheel, as the ``upgrade`` op takes it (agent.mqtt.payloads)."""

    url: Annotated[str, msgspec.Meta(max_length=2048)]
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    size: Annotated[int, msgspec.Meta(ge=1)]


class RolloutSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # What each device is moved to: ``model`` sends set_manifest (then pin), ``upgrade`` the
    # agent version ``version``. See _kinds.
    kind: Literal["model", "upgrade"] = "model"
    manifest: Annotated[str, msgspec.Meta(max_length=4096)] = ""  # model: hosted name or URL
    pin: Annotated[str, msgspec.Meta(max_length=64)] | None = None  # then pin this quant
    version: Annotated[str, msgspec.Meta(max_length=64)] | None = None  # upgrade: edge-agent's
    # upgrade: every agent wheel the controller hosts, by version (the target's, and the ones
    # devices ran, to roll back to); filled in by the controller, what a client sends is replaced.
    wheels: Annotated[dict[str, AgentWheelRef], msgspec.Meta(max_length=1000)] = {}
    # Target: the union of these. Without ``pinned``, devices that come to match group, pool
    # or filter while the rollout runs join it (explicit ids are a fixed list).
    devices: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=128)]], msgspec.Meta(max_length=10_000)
    ] = []
    group: Annotated[str, msgspec.Meta(max_length=256)] | None = None  # glob on device ids
    pool: Annotated[str, msgspec.Meta(max_length=128)] | None = None  # meta's pool
    filter: Annotated[str, msgspec.Meta(max_length=2048)] | None = None  # agent.fleet.inventory
    pinned: bool = False  # freeze the target to the devices that matched at creation
    # Pacing: a fixed rate, or a ramp from base_rate multiplied by increment_factor after
    # every ``ramp_every`` succeeded devices, up to max_rate. Starts per minute.
    rate_per_min: Rate | None = None
    base_rate: Rate | None = None
    increment_factor: Annotated[float, msgspec.Meta(ge=1, le=100)] = 2.0
    ramp_every: Devices = 5
    max_rate: Rate | None = None
    max_in_progress: Devices | None = None  # devices started and not yet finished, at most
    # Abort on evidence: more than abort_percent of the finished devices failed, once at
    # least min_devices finished (or every device of a smaller rollout); or more than
    # max_failures failed, whatever the percentage.
    abort_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 20.0
    min_devices: Devices = 5
    max_failures: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None
    # Health gate: after its commands, a device must serve the new target, answer the canary
    # prompt and stay healthy for soak_s; device_timeout_s (from its start) fails it.
    soak_s: Seconds = 30.0
    device_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)] | None = None
    canary_prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=2000)] = (
        "Reply with one word: ready."
    )
    canary_max_tokens: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8


def check(spec: RolloutSpec, device_timeout_s: float) -> None:
    """Refuse combinations the field bounds cannot express."""
    if spec.kind == "upgrade" and (spec.manifest or spec.pin is not None):
        raise RequestError("kind: an upgrade rollout moves the agent, not a model: no "
                           "manifest or pin", field="kind")
    if spec.kind == "upgrade" and spec.version not in spec.wheels:
        raise RequestError(f"version: this controller hosts no edge-agent wheel "
                           f"{spec.version!r:.80} (edge-agent fleet wheels add)", field="version")
    if spec.rate_per_min is not None and spec.base_rate is not None:
        raise RequestError(
            "rate_per_min: give either rate_per_min or base_rate (a ramp), not both",
            field="rate_per_min",
        )
    if spec.max_rate is not None and spec.base_rate is None:
        raise RequestError("max_rate: only with base_rate (a ramp)", field="max_rate")
    if spec.max_rate is not None and spec.base_rate is not None and spec.max_rate < spec.base_rate:
        raise RequestError("max_rate: must be >= base_rate", field="max_rate")
    if spec.soak_s >= device_timeout_s:
        raise RequestError(
            f"soak_s: must be shorter than the device timeout ({device_timeout_s:g} s)",
            field="soak_s",
        )


def start_rate(spec: RolloutSpec, succeeded: int) -> float:
    """Starts per minute now: fixed, or the ramp's step after ``succeeded`` successes."""
    if spec.base_rate is None:
        return spec.rate_per_min or DEFAULT_RATE_PER_MIN
    steps = succeeded // spec.ramp_every
    # Capped before the power, so a long rollout cannot overflow a float.
    ceiling = spec.max_rate if spec.max_rate is not None else 100_000.0
    if spec.increment_factor == 1:
        return min(spec.base_rate, ceiling)
    limit = (
        math.log(ceiling / spec.base_rate, spec.increment_factor) if ceiling > spec.base_rate else 0
    )
    return min(ceiling, spec.base_rate * spec.increment_factor ** min(steps, math.ceil(limit)))


def abort_reason(spec: RolloutSpec, succeeded: int, failed: int, devices: int) -> str | None:
    """Why the evidence says stop, or None. ``devices``: how many the rollout has now."""
    if spec.max_failures is not None and failed > spec.max_failures:
        return f"{failed} devices failed, more than max_failures {spec.max_failures}"
    finished = succeeded + failed
    sample = min(spec.min_devices, devices)
    if not failed or finished < sample:
        return None
    percent = failed * 100.0 / finished
    if percent > spec.abort_percent:
        return (
            f"{failed} of {finished} finished devices failed ({percent:.0f} %),"
            f" more than abort_percent {spec.abort_percent:g} % (min_devices {spec.min_devices})"
        )
    return None
