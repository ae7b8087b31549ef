"""Prometheus text exposition (format 0.0.4) of the fleet, written by hand: no client library.

Fleet gauges (devices by state and by build, total decode tok/s, ingest counters and lag,
broker connection) and, unless ``metrics_per_device`` is off, per-device gauges labelled
``device`` (eleven series a device: at 100,000 devices over a million series, which is no
scrape). Pure rendering of rows the caller computed; it must not query anything itself beyond
the controller's counters.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from agent.fleet.ingest import LAG_BUCKETS_S
from agent.fleet.view import STATES, fleet_summary

if TYPE_CHECKING:
    from agent.fleet.controller import FleetController

UP_STATES = ("starting", "ready", "busy", "degraded", "draining")

PER_DEVICE = (
    ("edge_device_decode_tokens_per_second", "Decode speed the device last reported", "decode_tps"),
    (
        "edge_device_prefill_tokens_per_second",
        "Prefill speed the device last reported",
        "prefill_tps",
    ),
    ("edge_device_memory_used_bytes", "Memory in use on the device", "mem_bytes"),
    ("edge_device_worker_rss_bytes", "Resident memory of the inference worker", "rss_bytes"),
    ("edge_device_temperature_celsius", "Hottest temperature the device reported", "temp_c"),
    ("edge_device_queue_depth", "Requests waiting on the device", "queue_depth"),
    (
        "edge_device_last_seen_timestamp_seconds",
        "When the controller last heard from the device",
        "last_seen",
    ),
)


def escape_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> str:
    return (
        repr(float(value))
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else ""
    )


def render_metrics(rows: list[dict[str, Any]], controller: "FleetController") -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
        """``samples`` are (suffix, value); a suffix is ``{labels}`` or, for histograms,
        ``_bucket{le=…}``, ``_sum``, ``_count``."""
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for suffix, value in samples:
            text = _number(value)
            if text:
                lines.append(f"{name}{suffix} {text}")

    summary = fleet_summary(rows)
    metric(
        "edge_fleet_devices",
        "gauge",
        "Devices known to the controller by effective state",
        [(f'{{state="{state}"}}', summary["counts"].get(state, 0)) for state in STATES],
    )
    metric(
        "edge_fleet_decode_tokens_per_second",
        "gauge",
        "Sum of decode tok/s over devices that are up",
        [("", summary["decode_tps_total"])],
    )
    stats = controller.ingest.stats
    metric(
        "edge_fleet_ingest_messages_total",
        "counter",
        "Device messages received for ingest",
        [("", stats.received)],
    )
    metric(
        "edge_fleet_ingest_rejected_total",
        "counter",
        "Device messages that were not valid",
        [("", stats.rejected)],
    )
    metric(
        "edge_fleet_ingest_dropped_total",
        "counter",
        "Device messages dropped by reason: too_large, rate_limited, queue_full, bad_request",
        [(f'{{reason="{reason}"}}', count) for reason, count in stats.dropped.items()],
    )
    metric(
        "edge_fleet_ingest_coalesced_total",
        "counter",
        "Status/meta messages replaced by a newer one of the same device before the writer ran",
        [("", stats.coalesced)],
    )
    metric(
        "edge_fleet_ingest_stale_status_total",
        "counter",
        "Status messages of an older session, ignored",
        [("", stats.ignored_stale_status)],
    )
    metric(
        "edge_fleet_ingest_last_batch_lag_seconds",
        "gauge",
        "Device timestamp to commit, oldest of the last batch",
        [("", stats.last_age_s)],
    )
    cumulative, buckets = 0, []
    for bound, count in zip((*LAG_BUCKETS_S, "+Inf"), stats.lag_buckets, strict=True):
        cumulative += count
        buckets.append((f'_bucket{{le="{bound}"}}', cumulative))
    metric(
        "edge_fleet_telemetry_lag_seconds",
        "histogram",
        "Device timestamp to commit of each telemetry message",
        [*buckets, ("_sum", stats.lag_sum_s), ("_count", cumulative)],
    )
    metric(
        "edge_fleet_ingest_lag_max_seconds",
        "gauge",
        "Worst batch lag (device timestamp to commit) over the last 10 s",
        [("", stats.worst_age())],
    )
    metric(
        "edge_fleet_ingest_queue_lag_max_seconds",
        "gauge",
        "Worst batch receive-to-commit time over the last 10 s (the controller's own share)",
        [("", stats.worst_age(queue_only=True))],
    )
    metric(
        "edge_fleet_ingest_backlog",
        "gauge",
        "Messages waiting for the ingest writer",
        [("", controller.ingest.backlog)],
    )
    metric(
        "edge_fleet_ingest_flush_milliseconds",
        "gauge",
        "Time the last batch took to commit",
        [("", stats.last_flush_ms)],
    )
    metric(
        "edge_fleet_mqtt_connected",
        "gauge",
        "1 while the controller is connected to the broker",
        [("", 1 if controller.connected else 0)],
    )
    builds = Counter((r["version"] or "", r["engine_key"] or "") for r in rows)
    metric(
        "edge_fleet_devices_by_build",
        "gauge",
        "Devices by agent version and engine build key (an upgrade's progress, per-device or not)",
        [
            (f'{{agent_version="{escape_label(version)}",engine_key="{escape_label(key)}"}}', n)
            for (version, key), n in sorted(builds.items())
        ],
    )
    if not controller.config.metrics_per_device:
        return "\n".join(lines) + "\n"
    metric(
        "edge_device_up",
        "gauge",
        "1 when the device is starting, ready, busy, degraded or draining",
        [
            (f'{{device="{escape_label(r["id"])}"}}', 1 if r["state"] in UP_STATES else 0)
            for r in rows
        ],
    )
    metric(
        "edge_device_info",
        "gauge",
        "Constant 1 with what the device runs",
        [
            (
                f'{{device="{escape_label(r["id"])}",state="{escape_label(r["state"])}",'
                f'model="{escape_label(r["model"])}",quant="{escape_label(r["quant"])}",'
                f'board="{escape_label(r["board"])}",version="{escape_label(r["version"] or "")}"}}',
                1,
            )
            for r in rows
        ],
    )
    metric(
        "edge_device_build_info",
        "gauge",
        "Constant 1 with the software the device runs: agent, llama-cpp-python, engine build",
        [
            (
                f'{{device="{escape_label(r["id"])}",'
                f'agent_version="{escape_label(r["version"] or "")}",'
                f'llama_cpp_python="{escape_label(r["llama_cpp_python"] or "")}",'
                f'engine_key="{escape_label(r["engine_key"] or "")}",'
                f'engine_flags="{escape_label(r["engine_flags"] or "")}"}}',
                1,
            )
            for r in rows
        ],
    )
    metric(
        "edge_device_problem",
        "gauge",
        "1 while the controller is refusing some of what the device sends (see its row)",
        [(f'{{device="{escape_label(r["id"])}"}}', 1 if r["problem"] else 0) for r in rows],
    )
    for name, help_text, key in PER_DEVICE:
        metric(
            name,
            "gauge",
            help_text,
            [(f'{{device="{escape_label(r["id"])}"}}', r[key]) for r in rows],
        )
    return "\n".join(lines) + "\n"
