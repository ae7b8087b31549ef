"""What the dashboard, the API and /metrics show of a device: pure functions over a DeviceRecord.

The effective state adds ``stale``: a device that is neither lost nor stopped but has been
silent for longer than ``stale_after_intervals`` telemetry intervals (its own interval
(stated in meta or telemetry, else measured from its telemetry timestamps, else the
configured default). Summaries read the ``meta`` layout
the daemon publishes (``device`` = the probe's DeviceInfo, ``selection`` = the Selection)
and tolerate missing parts: a device that sent only a status still gets a row. The meta
and telemetry read here passed agent.fleet.schemas, so every key read has its schema's type.
No I/O here.
"""

from __future__ import annotations

from typing import Any

from agent.fleet.registry import DeviceRecord, pick, telemetry_point

GIB = 1024**3
HEADLINE_FLAGS = ("amx_int8", "avx512f", "avx2", "avx", "sve", "i8mm", "dotprod", "neon")
STATES = (
    "starting",
    "ready",
    "busy",
    "degraded",
    "draining",
    "stopped",
    "lost",
    "stale",
    "unknown",
)


def telemetry_interval(record: DeviceRecord, default_s: float) -> float:
    value = pick(record.telemetry, ("interval_s",)) or pick(record.meta, ("telemetry_interval_s",))
    if not isinstance(value, (int, float)) or value <= 0:
        value = record.interval_estimate_s
    return float(value) if isinstance(value, (int, float)) and value > 0 else default_s


def effective_state(
    record: DeviceRecord, now: float, *, default_interval_s: float, stale_after_intervals: float
) -> str:
    state = record.state or "unknown"
    if state in ("lost", "stopped"):
        return state
    silent_for = now - record.last_seen
    if silent_for > stale_after_intervals * telemetry_interval(record, default_interval_s):
        return "stale"
    return state


def hardware(meta: dict[str, Any]) -> dict[str, Any]:
    device = meta.get("device") or meta.get("probe") or {}
    return device if isinstance(device, dict) else {}


def cpu_summary(device: dict[str, Any]) -> str:
    cpu = device.get("cpu") or {}
    if not cpu:
        return ""
    flags = [f for f in HEADLINE_FLAGS if f in (cpu.get("flags") or [])]
    shown = ",".join(flags[:3])
    cores = cpu.get("logical_cores")
    head = f"{cpu.get('arch', '?')} ×{cores}" if cores else str(cpu.get("arch", "?"))
    return f"{head} {shown}".strip()


def gpu_summary(device: dict[str, Any]) -> tuple[str, int | None]:
    gpus = device.get("gpus") or []
    if not gpus:
        return "", None
    names = ", ".join(str(g.get("name", g.get("vendor", "gpu"))) for g in gpus)
    vram = sum(int(g.get("vram_total_bytes") or 0) for g in gpus if not g.get("unified_memory"))
    return names, vram or None


def device_row(
    record: DeviceRecord, now: float, *, default_interval_s: float, stale_after_intervals: float
) -> dict[str, Any]:
    """One row of the fleet table / GET /api/devices."""
    meta = record.meta
    device = hardware(meta)
    selection = meta.get("selection") or {}
    build = meta.get("build") or {}
    memory = device.get("memory") or {}
    gpu, vram = gpu_summary(device)
    point = telemetry_point(record.telemetry) if record.telemetry else {}
    return {
        "id": record.id,
        "state": effective_state(
            record,
            now,
            default_interval_s=default_interval_s,
            stale_after_intervals=stale_after_intervals,
        ),
        "reported_state": record.state,
        "session": record.session,
        "version": record.agent_version or meta.get("version"),
        # What the engine is (agent.buildinfo): the wheelhouse's build key and CMAKE_ARGS.
        "llama_cpp_python": build.get("llama_cpp_python"),
        "engine_key": build.get("engine_key"),
        "engine_flags": build.get("cmake_args"),
        "board": device.get("board") or "",
        "cpu": cpu_summary(device),
        "ram_bytes": memory.get("total_bytes"),
        "gpu": gpu,
        "vram_bytes": vram,
        "model": selection.get("model_id") or "",
        "quant": selection.get("quant") or "",
        "pool": meta.get("pool"),
        "decode_tps": point.get("decode_tps"),
        "prefill_tps": point.get("prefill_tps"),
        "mem_bytes": point.get("mem_bytes"),
        "rss_bytes": point.get("rss_bytes"),
        "temp_c": point.get("temp_c"),
        "queue_depth": point.get("queue_depth"),
        "last_seen": record.last_seen,
        "first_seen": record.first_seen,
        # What the controller refused from this device, if anything: its own row says so.
        "problem": "; ".join(f"{kind}: {why}" for kind, why in sorted(record.problems.items()))
        or None,
    }


def fleet_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {state: 0 for state in STATES}
    total_tps = 0.0
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
        if row["state"] not in ("lost", "stale", "stopped") and row["decode_tps"]:
            total_tps += float(row["decode_tps"])
    return {"devices": len(rows), "counts": counts, "decode_tps_total": round(total_tps, 2)}


def format_bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    if value >= GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / 1024**2:.0f} MiB"


# --- events and command results as sentences ---------------------------------------------------

DOWNLOAD_STATES = {
    "starting": "Download of {file} started",
    "downloading": "Downloading {file}",
    "retrying": "Download of {file} retrying",
    "verifying": "Verifying {file}",
    "complete": "Downloaded {file}",
    "done": "Downloaded {file}",  # what the fleet simulator says for complete
    "cached": "{file} was already on disk",
    "failed": "Download of {file} failed",
}
SENTENCE_CHARS = 400  # a device writes the fields: the sentence is cut, never the page


def _text(value: Any, fallback: str = "?") -> str:
    return value if isinstance(value, str) and value else fallback


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        code, message = _text(error.get("code"), "error"), _text(error.get("message"), "")
        return f"{code}: {message}".rstrip(": ")
    return _text(error, "no reason given")


def _progress(body: dict[str, Any]) -> str:
    done, total = body.get("bytes"), body.get("total")
    parts = []
    if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
        parts.append(f"{format_bytes(done)} of {format_bytes(total)}")
    rate = body.get("rate_bps")
    if isinstance(rate, (int, float)) and rate > 0 and body.get("state") == "downloading":
        parts.append(f"{rate / 1e6:.1f} MB/s")
    return f" ({', '.join(parts)})" if parts else ""


def event_text(kind: str, body: dict[str, Any]) -> str:
    """One event as a sentence for people ("Switched from Q4_K_M to Q2_K"). The body passed
    agent.fleet.schemas only for the fields the controller acts on, so every other field is
    read as whatever type it may be."""
    why = _text(body.get("reason"), "no reason given")
    if kind == "download":
        template = DOWNLOAD_STATES.get(_text(body.get("state"), ""), "Download of {file}")
        sentence = template.format(file=_text(body.get("file"), "a model file")) + _progress(body)
        if body.get("state") in ("retrying", "failed") and body.get("error"):
            sentence += f": {_error_text(body.get('error'))}"
        if body.get("state") in ("complete", "done") and isinstance(body.get("mirror"), str):
            sentence += f" from {body['mirror']}"
    elif kind == "model_switch":
        before = _text(body.get("from") or body.get("before"))
        after = _text(body.get("to") or body.get("after"))
        how = {"parallel": " (loaded beside the old one)", "drained": " (drained first)"}.get(
            _text(body.get("mode"), ""), "")
        sentence = f"Switched from {before} to {after}{how}"
    elif kind == "model_loaded":
        model, quant = _text(body.get("model_id"), "the model"), _text(body.get("quant"), "")
        sentence = f"Loaded {model} {quant}".rstrip()
        if isinstance(body.get("load_ms"), (int, float)):
            sentence += f" in {body['load_ms'] / 1000:.1f} s"
    elif kind == "rollback":
        sentence = f"Went back to {_text(body.get('to'))}: {why}"
    elif kind == "canary_fallback":
        sentence = f"Canary failed; {_text(body.get('message'), 'trying a safer setting')}"
    elif kind == "worker_crashed":
        sentence = f"The model worker crashed ({why})"
    elif kind == "restart_failed":
        sentence = f"The model worker did not restart: {why}"
    elif kind == "model_unavailable":
        sentence = f"No model could be loaded: {_error_text(body.get('error'))}"
    elif kind == "selection_fallback":
        sentence = (f"Could not plan a new selection ({_error_text(body.get('error'))}); "
                    f"kept {_text(body.get('quant'))}")
    elif kind == "rejected_input":
        what = _text(body.get("payload_kind") or body.get("kind"), "a message")
        reason = body.get("error") or body.get("reason")
        sentence = f"Refused {what}: {_error_text(reason)}"
    else:
        fields = ", ".join(f"{k}={v}" for k, v in body.items() if k not in ("event", "type", "ts"))
        sentence = f"{kind.replace('_', ' ').capitalize()}" + (f": {fields}" if fields else "")
    return sentence[:SENTENCE_CHARS]


def command_text(command: dict[str, Any]) -> str:
    """A sent command and its answer as a sentence ("pin Q2_K: done, now Q2_K")."""
    args = command.get("args") if isinstance(command.get("args"), dict) else {}
    shown_args = " ".join(str(v) for v in args.values() if v is not None)
    head = f"{command['op']} {shown_args}".strip()
    if command.get("ok") is None:
        return f"{head}: waiting for the device"[:SENTENCE_CHARS]
    result = command.get("result")
    if not command["ok"]:
        return f"{head} failed: {_error_text(result)}"[:SENTENCE_CHARS]
    detail = ""
    if isinstance(result, dict):
        if isinstance(result.get("quant"), str):
            detail = f", now {result['quant']}"
        elif isinstance(result.get("decode_tps"), (int, float)):
            detail = f", decode {result['decode_tps']:.1f} tok/s"
    return f"{head}: done{detail}"[:SENTENCE_CHARS]
