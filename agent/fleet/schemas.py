"""What the controller accepts from a device: bounded schemas of status, meta, telemetry,
events and cmd/result. Pure: a decoded JSON object in, the same object or RequestError out.

Every field the controller (registry, view, templates, rollouts) reads is typed here, with
strings, lists and numbers bounded (numbers are finite: JSON has no NaN, and msgspec refuses
1e400). Fields the controller does not read are tolerated, so a newer agent's meta still
shows: they are kept as sent, bounded only by the message's byte limit and a nesting depth.
So code past this module may read a validated object's known keys without type checks.
Nothing here does I/O.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from agent.config import LABEL_WORD, MAX_LABELS
from agent.errors import RequestError

MAX_DEPTH = 32  # nesting of any accepted object: deep enough for every real payload
REASON_CHARS = 200  # how much of a validation error is kept in the device's event and flag

Name = Annotated[str, msgspec.Meta(max_length=128)]
Text = Annotated[str, msgspec.Meta(max_length=1024)]
LongText = Annotated[str, msgspec.Meta(max_length=16384)]
# Counts and byte sizes fit SQLite's INTEGER and a JavaScript number exactly.
Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Real = Annotated[float, msgspec.Meta(ge=-1e15, le=1e15)]
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=1e11)]  # Unix seconds, until year 5138
Names = Annotated[list[Name], msgspec.Meta(max_length=512)]
LabelWord = Annotated[str, msgspec.Meta(pattern=rf"\A{LABEL_WORD}\Z")]


class _Tolerant(msgspec.Struct, kw_only=True):
    """Unknown fields pass (forward compatibility); known ones must have their type."""


# --- status --------------------------------------------------------------------------------


class Status(_Tolerant):
    state: Literal["starting", "ready", "busy", "degraded", "draining", "stopped", "lost"]
    session: Count
    ts: Timestamp
    version: Name


# --- meta: what agent.presence.Presence.meta publishes ---------------------------------------


class CPUCluster(_Tolerant):
    cpus: Annotated[list[Count], msgspec.Meta(max_length=4096)] = []
    max_mhz: Real | None = None
    part: Name | None = None
    count: Count = 0
    name: Name | None = None


class CPUFacts(_Tolerant):
    vendor: Text | None = None
    model: Text | None = None
    arch: Name = "unknown"
    physical_cores: Count = 1
    logical_cores: Count = 1
    flags: Names = []
    clusters: Annotated[list[CPUCluster], msgspec.Meta(max_length=64)] = []


class MemoryFacts(_Tolerant):
    total_bytes: Count | None = None
    available_bytes: Count | None = None
    budget_bytes: Count | None = None
    cgroup_limit_bytes: Count | None = None


class GPUFacts(_Tolerant):
    vendor: Name | None = None
    name: Text | None = None
    vram_total_bytes: Count | None = None
    vram_free_bytes: Count | None = None
    unified_memory: bool = False


class LlamaFacts(_Tolerant):
    version: Name | None = None
    gpu_offload: bool = False
    system_info: LongText | None = None
    features: Names = []


class Probe(_Tolerant):
    """agent.hardware.device.DeviceInfo as the daemon sends it."""

    cpu: CPUFacts | None = None
    memory: MemoryFacts | None = None
    gpus: Annotated[list[GPUFacts], msgspec.Meta(max_length=64)] = []
    board: Text | None = None
    os: Text | None = None
    kernel: Text | None = None
    disk_free_bytes: Count | None = None
    temperatures_c: Annotated[dict[Name, Real], msgspec.Meta(max_length=256)] = {}
    llama: LlamaFacts | None = None
    bandwidth_gbps: Real | None = None


class Estimate(_Tolerant):
    ram_bytes: Count | None = None
    vram_bytes: Count | None = None


class CandidateFacts(_Tolerant):
    quant: Name
    file: Text | None = None
    size: Count | None = None
    quality: Real | None = None
    n_ctx: Count | None = None
    kv_type: Name | None = None
    n_gpu_layers: Annotated[int, msgspec.Meta(ge=-1, le=100_000)] | None = None
    estimate: Estimate | None = None
    predicted_tokens_per_s: Real | None = None
    verdict: Name | None = None
    reason: Text | None = None


# The explain table: in meta from older agents, the ``select`` command's answer from newer.
Candidates = Annotated[list[CandidateFacts], msgspec.Meta(max_length=256)]


class SelectionFacts(_Tolerant):
    """agent.catalog.selection.Selection as the daemon sends it."""

    model_id: Name | None = None
    quant: Name | None = None
    file: Text | None = None
    size: Count | None = None
    n_ctx: Count | None = None
    kv_type: Name | None = None
    n_gpu_layers: Annotated[int, msgspec.Meta(ge=-1, le=100_000)] | None = None
    n_threads: Count | None = None
    manifest_url: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    sha256: Annotated[str, msgspec.Meta(pattern=r"\A[0-9a-f]{64}\Z")] | None = None  # rollouts
    candidates: Candidates = []
    variants: Annotated[list[Name], msgspec.Meta(max_length=256)] = []
    profile: Name | None = None


class ProfileFacts(_Tolerant):
    name: Name | None = None
    reasons: Annotated[list[Text], msgspec.Meta(max_length=64)] = []


class BuildFacts(_Tolerant):
    """agent.buildinfo.BuildInfo: what the device runs (device page, edge_device_build_info)."""

    agent_version: Name | None = None
    llama_cpp_python: Name | None = None
    engine_key: Name | None = None
    cmake_args: Text | None = None
    python: Name | None = None
    platform: Name | None = None
    origin: Annotated[str, msgspec.Meta(max_length=4096)] | None = None


class Meta(_Tolerant):
    device_id: Name | None = None
    version: Name | None = None
    session: Count | None = None
    probe: Probe | None = None
    device: Probe | None = None  # the older name of ``probe``
    selection: SelectionFacts | None = None
    selection_source: Name | None = None
    problem: Text | None = None
    runtime: LlamaFacts | None = None
    pool: Name | None = None
    protocol: Name | None = None
    manifest: Annotated[str, msgspec.Meta(max_length=4096)] | None = None  # read by rollouts
    pin: Name | None = None
    telemetry_interval_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] | None = None
    profile: ProfileFacts | None = None
    labels: Annotated[dict[LabelWord, LabelWord], msgspec.Meta(max_length=MAX_LABELS)] = {}
    build: BuildFacts | None = None


# --- telemetry: what agent.telemetry.Telemetry.sample publishes ------------------------------


class MemoryNow(_Tolerant):
    total_bytes: Count | None = None
    available_bytes: Count | None = None
    percent: Real | None = None


class Telemetry(_Tolerant):
    seq: Count | None = None
    ts: Timestamp | None = None
    interval_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] | None = None
    state: Name | None = None
    model: Text | None = None
    cpu_percent: Real | None = None
    cpu: Real | None = None
    mem: MemoryNow | None = None
    mem_used_bytes: Count | None = None
    mem_bytes: Count | None = None
    temp_c: Real | None = None
    temperature_c: Real | None = None
    disk_free_bytes: Count | None = None
    queue_depth: Count | None = None
    prefill_tps: Real | None = None
    prefill_tokens_per_s: Real | None = None
    decode_tps: Real | None = None
    decode_tokens_per_s: Real | None = None
    ttft_ms: Real | None = None
    requests_ok: Count | None = None
    requests_error: Count | None = None
    worker_rss_bytes: Count | None = None
    rss_bytes: Count | None = None
    worker_restarts: Count | None = None


# --- events and cmd/result ---------------------------------------------------------------------


class Event(_Tolerant):
    event: Name | None = None
    type: Name | None = None  # the older name of ``event``
    ts: Timestamp | None = None
    bytes: Count | None = None  # download progress, read by rollouts
    total: Count | None = None


class ErrorFacts(_Tolerant):
    code: Name
    message: LongText = ""


class CmdResult(_Tolerant):
    id: Name
    ok: bool
    error: ErrorFacts | None = None


SCHEMAS: dict[str, type[msgspec.Struct]] = {
    "status": Status,
    "meta": Meta,
    "telemetry": Telemetry,
    "events": Event,
    "cmd/result": CmdResult,
}


def validate(kind: str, body: Any) -> dict[str, Any]:
    """``body`` (decoded JSON) when it is a valid ``kind`` message, else RequestError."""
    if not isinstance(body, dict):
        raise RequestError(f"{kind}: must be a JSON object", field=kind)
    _check_depth(body, kind)
    try:
        msgspec.convert(body, SCHEMAS[kind])
    except msgspec.ValidationError as exc:
        text, _, where = str(exc).partition(" - at `$")
        path = f"{kind}{where.rstrip('`')}" if where else kind
        raise RequestError(truncate(f"{path}: {text}"), field=path) from None
    return body


def truncate(text: str, limit: int = REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_depth(body: dict[str, Any], kind: str) -> None:
    """Iterative, so a deep document cannot exhaust the stack here or in a later json.dumps."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RequestError(f"{kind}: nested deeper than {MAX_DEPTH} levels", field=kind)
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
