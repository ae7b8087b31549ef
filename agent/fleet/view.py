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
