"""Rollout plans (dry runs): what every target device would run, before anything is sent.

``plan_devices`` runs the device's own selector (agent.catalog.select.choose, pure) on what
the controller stores about each device: the probe from its retained meta, the profile it
reported (matched again from the probe when this controller does not know that name), the
pin the rollout sets (else the one its meta reports), and the manifest with its GGUF headers.
Each device gets the variant, n_ctx, KV type, GPU layers, predicted memory and tok/s, or
``no_fit`` with the selector's reason, or ``unknown_probe`` when its meta holds no usable probe.

What the controller cannot see is not in a plan: a device's local model settings in its config
(headroom, context, KV type) and what it learned about its own memory and speed. Devices
without those choose as planned; the plan says ``basis`` so nobody reads more into it.

``plan_rollout`` is the I/O around it (the manifest file or URL, its headers, the target's
records): it blocks, so callers on an event loop run it in a thread. Devices with the same
probe, profile and pin are planned once; each distinct one costs one selector run (for a GPU
device that run tries every split of layers, so a large fleet's plan takes seconds).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgspec

from agent.catalog.gguf import GGUFInfo
from agent.catalog.manifest import Manifest, load_manifest
from agent.catalog.profiles import Profile, load_profiles, match_profile
from agent.catalog.select import choose, read_headers
from agent.config import ModelConfig
from agent.errors import EdgeAgentError, RequestError, SelectionError
from agent.fleet.registry import DeviceRecord
from agent.fleet.rollout import RolloutSpec, Target
from agent.hardware.device import DeviceInfo
from agent.log import get_logger

log = get_logger(__name__)

BASIS = "stored probe and profile; device-local model settings and learned figures not included"
Verdict = Literal["fits", "no_fit", "unknown_probe"]


class Current(msgspec.Struct, kw_only=True):
    """What the device's meta says it runs now."""

    quant: str | None = None
    n_ctx: int | None = None


class DevicePlan(msgspec.Struct, kw_only=True):
    device_id: str
    state: str | None
    verdict: Verdict
    profile: str | None = None
    quant: str | None = None
    file: str | None = None
    n_ctx: int | None = None
    kv_type: str | None = None
    n_gpu_layers: int | None = None
    ram_bytes: int | None = None  # what the load adds to RAM (the learned figure is a device's)
    vram_bytes: int | None = None
    budget_bytes: int | None = None
    predicted_tokens_per_s: float | None = None  # None: the probe has no measured bandwidth
    current: Current = msgspec.field(default_factory=Current)
    change: bool = False  # it would run another variant or context than now
    reason: str = ""


class PlanSummary(msgspec.Struct, kw_only=True):
    devices: int
    by_variant: dict[str, int]
    no_fit: int
    unknown_probe: int
    changes: int


class Plan(msgspec.Struct, kw_only=True):
    dry_run: bool = True
    manifest: str
    model_id: str | None
    pin: str | None
    basis: str = BASIS
    summary: PlanSummary
    devices: list[DevicePlan]


def _device_info(meta: Mapping[str, Any]) -> DeviceInfo | None:
    probe = meta.get("probe") or meta.get("device")
    if not probe:
        return None
    try:
        device = msgspec.convert(probe, DeviceInfo)
    except msgspec.ValidationError:
        return None  # a probe the schema let through but the selector cannot use
    return device if device.memory.total_bytes or device.memory.available_bytes else None


def _profile(device: DeviceInfo, meta: Mapping[str, Any], profiles: list[Profile]) -> Profile:
    reported = (meta.get("profile") or {}).get("name")
    forced = reported if any(p.name == reported for p in profiles) else None
    return match_profile(device, profiles, forced)[0]


def _model_id(manifest: Manifest, meta: Mapping[str, Any]) -> str | None:
    """The model the device runs now when the manifest has it, else the manifest's first."""
    running = (meta.get("selection") or {}).get("model_id")
    return running if any(m.id == running for m in manifest.models) else None


def _plan_one(
    device: DeviceInfo | None,
    meta: Mapping[str, Any],
    manifest: Manifest,
    headers: Mapping[str, Mapping[str, GGUFInfo]],
    profiles: list[Profile],
    pin: str | None,
) -> DevicePlan:
    """One device's plan, without who it is (``device_id``, ``state``, ``current``)."""
    if device is None:
        return DevicePlan(device_id="", state=None, verdict="unknown_probe",
                          reason="no probe in its meta yet")
    profile = _profile(device, meta, profiles)
    model_id = _model_id(manifest, meta)
    config = ModelConfig(model_id=model_id, pin=pin or meta.get("pin"))
    try:
        chosen = choose(device, profile, manifest, config, headers[manifest.model(model_id).id])
    except SelectionError as exc:
        return DevicePlan(device_id="", state=None, verdict="no_fit", profile=profile.name,
                          reason=exc.message, budget_bytes=exc.details.get("budget_bytes"))
    return DevicePlan(
        device_id="", state=None, verdict="fits", profile=profile.name, quant=chosen.quant,
        file=chosen.file, n_ctx=chosen.n_ctx, kv_type=chosen.kv_type,
        n_gpu_layers=chosen.n_gpu_layers, ram_bytes=chosen.estimate.ram_bytes,
        vram_bytes=chosen.estimate.vram_bytes, budget_bytes=chosen.budget_bytes,
        predicted_tokens_per_s=chosen.predicted_tokens_per_s,
        reason=next(c.reason for c in chosen.candidates if c.verdict == "chosen"),
    )


def plan_devices(
    manifest: Manifest,
    headers: Mapping[str, Mapping[str, GGUFInfo]],
    records: Iterable[DeviceRecord],
    *,
    pin: str | None = None,
    profiles: list[Profile] | None = None,
) -> Plan:
    """The plan for ``records`` (pure). ``headers``: model id -> variant file -> GGUFInfo.
    A ``pin`` that is not a variant of the manifest is a RequestError."""
    if pin is not None and not any(v.quant == pin for m in manifest.models for v in m.variants):
        raise RequestError(f"pin: the manifest has no {pin!r} variant", field="pin")
    profiles = profiles if profiles is not None else load_profiles()
    planned: dict[bytes, DevicePlan] = {}
    devices: list[DevicePlan] = []
    for record in records:
        meta = record.meta
        device = _device_info(meta)
        selection = meta.get("selection") or {}
        # Everything choose() reads: identical inputs give an identical answer, planned once.
        key = msgspec.json.encode(
            [device, (meta.get("profile") or {}).get("name"), meta.get("pin"),
             selection.get("model_id")])
        if key not in planned:
            planned[key] = _plan_one(device, meta, manifest, headers, profiles, pin)
        plan = planned[key]
        current = Current(quant=selection.get("quant"), n_ctx=selection.get("n_ctx"))
        now, then = (current.quant, current.n_ctx), (plan.quant, plan.n_ctx)
        change = plan.verdict == "fits" and now != then
        devices.append(msgspec.structs.replace(
            plan, device_id=record.id, state=record.state, current=current, change=change))
    return Plan(
        manifest=manifest.source or "",
        model_id=manifest.models[0].id if len(manifest.models) == 1 else None,
        pin=pin,
        summary=PlanSummary(
            devices=len(devices),
            by_variant=dict(Counter(d.quant for d in devices if d.quant is not None)),
            no_fit=sum(d.verdict == "no_fit" for d in devices),
            unknown_probe=sum(d.verdict == "unknown_probe" for d in devices),
            changes=sum(d.change for d in devices),
        ),
        devices=devices,
    )


def plan_rollout(spec: RolloutSpec, source: str, location: str,
                 records: Iterable[DeviceRecord]) -> dict[str, Any]:
    """The plan of a model rollout as the API answers it: the target's records planned against
    the manifest at ``location`` (a file here or its URL; devices are sent ``source``).
    Reads the manifest and GGUF headers (files or HTTP Range): blocks."""
    if spec.kind != "model":
        raise RequestError(f"dry_run: plans model rollouts, not {spec.kind!r}", field="dry_run")
    chosen = Target(spec).chosen(records)
    try:
        manifest = load_manifest(location)
        headers = {model.id: read_headers(manifest, model) for model in manifest.models}
    except EdgeAgentError as exc:
        raise RequestError(f"manifest: {exc.message}", field="manifest") from None
    plan = plan_devices(manifest, headers, chosen, pin=spec.pin)
    plan.manifest = source
    log.info("rollout_planned", manifest=source, devices=plan.summary.devices,
             no_fit=plan.summary.no_fit, unknown_probe=plan.summary.unknown_probe)
    return msgspec.to_builtins(plan)
