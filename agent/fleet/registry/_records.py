"""What the registry holds in memory and hands out: device records, incoming messages, batch
outcomes, the charted telemetry numbers, and how a stored row becomes a record again.

A stored row is validated as if it had just arrived (agent.fleet.schemas), so a record written
by an older controller cannot break the dashboard; a device whose stored meta fails is flagged
instead. Pure: no database, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from agent.errors import RequestError
from agent.fleet import schemas
from agent.log import get_logger

log = get_logger(__name__)

# Telemetry keys as the daemon sends them; the first present name wins, so a renamed field
# on older agents still charts.
TELEMETRY_FIELDS = {
    "decode_tps": ("decode_tps", "decode_tokens_per_s"),
    "prefill_tps": ("prefill_tps", "prefill_tokens_per_s"),
    "mem_bytes": ("mem_used_bytes", "mem_bytes"),
    "rss_bytes": ("worker_rss_bytes", "rss_bytes"),
    "temp_c": ("temp_c", "temperature_c"),
    "cpu_percent": ("cpu_percent", "cpu"),
    "queue_depth": ("queue_depth",),
}
STATES = frozenset({"starting", "ready", "busy", "degraded", "draining", "stopped", "lost"})
# The columns of the devices table a record is loaded from.
DEVICE_COLUMNS = (
    "id, first_seen, last_seen, state, session, status_ts, version, meta, meta_ts,"
    " telemetry, telemetry_ts"
)

_json = msgspec.json.Encoder()
from_json = msgspec.json.Decoder().decode


def to_json(value: Any) -> str:
    return _json.encode(value).decode()


def pick(source: dict[str, Any] | None, names: Iterable[str]) -> Any:
    if not source:
        return None
    for name in names:
        value = source.get(name)
        if value is not None:
            return value
    return None


def telemetry_point(payload: dict[str, Any]) -> dict[str, Any]:
    """The charted numbers of one telemetry payload (None where the device did not say)."""
    point: dict[str, Any] = {}
    for column, names in TELEMETRY_FIELDS.items():
        value = pick(payload, names)
        if column == "mem_bytes" and value is None:
            value = _memory_used(payload.get("mem"))
        point[column] = (
            value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        )
    return point


def _memory_used(mem: Any) -> int | None:
    """The daemon sends ``mem: {total_bytes, available_bytes, percent}``;
    used = total - available."""
    if (
        isinstance(mem, dict)
        and isinstance(mem.get("total_bytes"), int)
        and isinstance(mem.get("available_bytes"), int)
    ):
        return mem["total_bytes"] - mem["available_bytes"]
    return None


@dataclass
class DeviceRecord:
    """The latest of one device, kept in memory; ``version`` grows on every change."""

    id: str
    first_seen: float
    last_seen: float
    state: str | None = None
    session: int | None = None
    status_ts: float | None = None
    agent_version: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    meta_ts: float | None = None
    telemetry: dict[str, Any] = field(default_factory=dict)
    telemetry_ts: float | None = None
    last_sample_ts: float = 0.0
    # Seen spacing of telemetry (EWMA): the stale rule needs each device's own interval even
    # when the device does not state it.
    interval_estimate_s: float | None = None
    # What the controller refused from the device, by topic kind ("meta": "bad_request: …");
    # a valid message of the same kind clears its entry. Memory only: a retained bad message
    # is redelivered, so the flag comes back after a restart by itself.
    problems: dict[str, str] = field(default_factory=dict)
    last_rejection_event: float = 0.0
    version: int = 0


@dataclass
class Incoming:
    """One decoded device message, as the ingest queue hands it to ``apply_batch``."""

    # status | meta | telemetry | events | cmd/result, validated; or "rejected": what ingest
    # refused from the device, {kind, code, reason, dropped}
    kind: str
    device_id: str
    body: dict[str, Any]
    received: float


@dataclass
class BatchOutcome:
    applied: int = 0
    ignored_stale_status: int = 0
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    cmd_results: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    sent_times: list[float] = field(default_factory=list)  # the devices' own ts of each telemetry


def load_stored(record: DeviceRecord, kind: str, text: str | None) -> dict[str, Any]:
    """A stored meta/telemetry validated as if it had just arrived; {} and a flag if not."""
    if not text:
        return {}
    try:
        try:
            body = from_json(text)
        except msgspec.DecodeError:
            raise RequestError(f"{kind}: not valid JSON", field=kind) from None
        return schemas.validate(kind, body)
    except RequestError as exc:
        record.problems[kind] = f"bad_request: stored {exc.message}"
        log.warning("stored_record_invalid", device=record.id, kind=kind, reason=exc.message)
        return {}


def record_of(row: dict[str, Any]) -> DeviceRecord:
    """A stored devices row as a record, every field checked as if it had just arrived."""
    record = DeviceRecord(
        id=row["id"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        state=row["state"] if row["state"] in STATES else None,
        session=row["session"] if isinstance(row["session"], int) else None,
        status_ts=row["status_ts"] if isinstance(row["status_ts"], float) else None,
        agent_version=row["version"] if isinstance(row["version"], str) else None,
        meta_ts=row["meta_ts"],
    )
    record.meta = load_stored(record, "meta", row["meta"])
    record.telemetry = load_stored(record, "telemetry", row["telemetry"])
    if record.telemetry:
        record.telemetry_ts = row["telemetry_ts"]
        record.last_sample_ts = row["telemetry_ts"] or 0.0
    return record
