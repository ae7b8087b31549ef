"""Prometheus text exposition (format 0.0.4) of the fleet, written by hand: no client library.

Fleet gauges (devices by state and by build, total decode tok/s, ingest counters and lag,
broker connection) and, unless ``metrics_per_device`` is off, per-device gauges labelled
``device`` (eleven series a device: at 100,000 devices over a million series, which is no
scrape). Pure rendering of rows the caller computed; it must not query anything itself beyond
the controller's counters.

Each family is a row of a table, in exposition order: ``FLEET_FAMILIES`` (name, type, help,
its samples from one ``Scrape``) and ``DEVICE_FAMILIES`` (gauges: name, help, a row's labels,
a row's value), so adding a metric is adding a row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple

from agent.fleet.ingest import LAG_BUCKETS_S, IngestStats
from agent.fleet.view import STATES, fleet_summary

if TYPE_CHECKING:
    from agent.fleet.controller import FleetController

UP_STATES = ("starting", "ready", "busy", "degraded", "draining")

# A sample is (suffix, value); a suffix is ``{labels}`` or, for histograms, ``_bucket{le=…}``,
# ``_sum``, ``_count``.
Samples = list[tuple[str, Any]]


@dataclass(frozen=True)
class Scrape:
    """What one /metrics answer is rendered from: computed once, read by every family."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    stats: IngestStats
    controller: FleetController


class FleetFamily(NamedTuple):
    name: str
    kind: str
    help: str
    samples: Callable[[Scrape], Samples]


class DeviceFamily(NamedTuple):
    """A per-device gauge: one sample a row."""

    name: str
    help: str
    labels: Callable[[dict[str, Any]], str]
    value: Callable[[dict[str, Any]], Any]


def escape_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> str:
    return (
        repr(float(value))
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else ""
    )


def _family(name: str, kind: str, help_text: str, samples: Samples) -> list[str]:
    """HELP, TYPE and the samples that are numbers (a None is left out, not written as 0)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for suffix, value in samples:
        text = _number(value)
        if text:
            lines.append(f"{name}{suffix} {text}")
    return lines


def _one(value: Callable[[Scrape], Any]) -> Callable[[Scrape], Samples]:
    """The samples of an unlabelled family: one value."""
    return lambda scrape: [("", value(scrape))]


def _telemetry_lag(scrape: Scrape) -> Samples:
    stats = scrape.stats
    cumulative, buckets = 0, []
    for bound, count in zip((*LAG_BUCKETS_S, "+Inf"), stats.lag_buckets, strict=True):
        cumulative += count
        buckets.append((f'_bucket{{le="{bound}"}}', cumulative))
    return [*buckets, ("_sum", stats.lag_sum_s), ("_count", cumulative)]


def _devices_by_build(scrape: Scrape) -> Samples:
    builds = Counter((r["version"] or "", r["engine_key"] or "") for r in scrape.rows)
    return [
        (f'{{agent_version="{escape_label(version)}",engine_key="{escape_label(key)}"}}', n)
        for (version, key), n in sorted(builds.items())
    ]


FLEET_FAMILIES = (
    FleetFamily(
        "edge_fleet_devices",
        "gauge",
        "Devices known to the controller by effective state",
        lambda s: [(f'{{state="{state}"}}', s.summary["counts"].get(state, 0)) for state in STATES],
    ),
    FleetFamily(
        "edge_fleet_decode_tokens_per_second",
        "gauge",
        "Sum of decode tok/s over devices that are up",
        _one(lambda s: s.summary["decode_tps_total"]),
    ),
    FleetFamily(
        "edge_fleet_ingest_messages_total",
        "counter",
        "Device messages received for ingest",
        _one(lambda s: s.stats.received),
    ),
    FleetFamily(
        "edge_fleet_ingest_rejected_total",
        "counter",
        "Device messages that were not valid",
        _one(lambda s: s.stats.rejected),
    ),
    FleetFamily(
        "edge_fleet_ingest_dropped_total",
        "counter",
        "Device messages dropped by reason: too_large, rate_limited, queue_full, bad_request",
        lambda s: [(f'{{reason="{reason}"}}', count) for reason, count in s.stats.dropped.items()],
    ),
    FleetFamily(
        "edge_fleet_ingest_coalesced_total",
        "counter",
        "Status/meta messages replaced by a newer one of the same device before the writer ran",
        _one(lambda s: s.stats.coalesced),
    ),
    FleetFamily(
        "edge_fleet_ingest_stale_status_total",
        "counter",
        "Status messages of an older session, ignored",
        _one(lambda s: s.stats.ignored_stale_status),
    ),
    FleetFamily(
        "edge_fleet_ingest_last_batch_lag_seconds",
        "gauge",
        "Device timestamp to commit, oldest of the last batch",
        _one(lambda s: s.stats.last_age_s),
    ),
    FleetFamily(
        "edge_fleet_telemetry_lag_seconds",
        "histogram",
        "Device timestamp to commit of each telemetry message",
        _telemetry_lag,
    ),
    FleetFamily(
        "edge_fleet_ingest_lag_max_seconds",
        "gauge",
        "Worst batch lag (device timestamp to commit) over the last 10 s",
        _one(lambda s: s.stats.worst_age()),
    ),
    FleetFamily(
        "edge_fleet_ingest_queue_lag_max_seconds",
        "gauge",
        "Worst batch receive-to-commit time over the last 10 s (the controller's own share)",
        _one(lambda s: s.stats.worst_age(queue_only=True)),
    ),
    FleetFamily(
        "edge_fleet_ingest_backlog",
        "gauge",
        "Messages waiting for the ingest writer",
        _one(lambda s: s.controller.ingest.backlog),
    ),
    FleetFamily(
        "edge_fleet_ingest_flush_milliseconds",
        "gauge",
        "Time the last batch took to commit",
        _one(lambda s: s.stats.last_flush_ms),
    ),
    FleetFamily(
        "edge_fleet_mqtt_connected",
        "gauge",
        "1 while the controller is connected to the broker",
        _one(lambda s: 1 if s.controller.connected else 0),
    ),
    FleetFamily(
        "edge_fleet_devices_by_build",
        "gauge",
        "Devices by agent version and engine build key (an upgrade's progress, per-device or not)",
        _devices_by_build,
    ),
)


def _device_label(row: dict[str, Any]) -> str:
    return f'{{device="{escape_label(row["id"])}"}}'


def _info_labels(row: dict[str, Any]) -> str:
    return (
        f'{{device="{escape_label(row["id"])}",state="{escape_label(row["state"])}",'
        f'model="{escape_label(row["model"])}",quant="{escape_label(row["quant"])}",'
        f'board="{escape_label(row["board"])}",version="{escape_label(row["version"] or "")}"}}'
    )


def _build_info_labels(row: dict[str, Any]) -> str:
    return (
        f'{{device="{escape_label(row["id"])}",'
        f'agent_version="{escape_label(row["version"] or "")}",'
        f'llama_cpp_python="{escape_label(row["llama_cpp_python"] or "")}",'
        f'engine_key="{escape_label(row["engine_key"] or "")}",'
        f'engine_flags="{escape_label(row["engine_flags"] or "")}"}}'
    )


# The per-device gauges that are a row's number as it stands: (name, help, row key).
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

DEVICE_FAMILIES = (
    DeviceFamily(
        "edge_device_up",
        "1 when the device is starting, ready, busy, degraded or draining",
        _device_label,
        lambda row: 1 if row["state"] in UP_STATES else 0,
    ),
    DeviceFamily(
        "edge_device_info", "Constant 1 with what the device runs", _info_labels, lambda row: 1
    ),
    DeviceFamily(
        "edge_device_build_info",
        "Constant 1 with the software the device runs: agent, llama-cpp-python, engine build",
        _build_info_labels,
        lambda row: 1,
    ),
    DeviceFamily(
        "edge_device_problem",
        "1 while the controller is refusing some of what the device sends (see its row)",
        _device_label,
        lambda row: 1 if row["problem"] else 0,
    ),
    *(
        DeviceFamily(name, help_text, _device_label, itemgetter(key))
        for name, help_text, key in PER_DEVICE
    ),
)


def render_metrics(rows: list[dict[str, Any]], controller: FleetController) -> str:
    scrape = Scrape(rows, fleet_summary(rows), controller.ingest.stats, controller)
    lines: list[str] = []
    for family in FLEET_FAMILIES:
        lines += _family(family.name, family.kind, family.help, family.samples(scrape))
    if controller.config.metrics_per_device:
        for device in DEVICE_FAMILIES:
            samples = [(device.labels(row), device.value(row)) for row in rows]
            lines += _family(device.name, "gauge", device.help, samples)
    return "\n".join(lines) + "\n"
