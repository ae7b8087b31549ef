"""The devices as the pages, the API, the live stream and /metrics show them: rows
(agent.fleet.view.device_row) built from the registry's in-memory records, and events and
commands with their text."""

from __future__ import annotations

import time
from typing import Any

from agent.config import FleetConfig
from agent.fleet.registry import DeviceRecord, Registry
from agent.fleet.table import FactsCache, TableQuery, table_page
from agent.fleet.view import command_text, device_row, event_text


class DeviceRows:
    def __init__(self, registry: Registry, config: FleetConfig) -> None:
        self.registry = registry
        self.config = config
        self.facts = FactsCache()  # read from worker threads (see FactsCache)

    def _row(self, record: DeviceRecord, now: float) -> dict[str, Any]:
        return device_row(
            record,
            now,
            default_interval_s=self.config.default_telemetry_interval_s,
            stale_after_intervals=self.config.stale_after_intervals,
        )

    def rows(self) -> list[dict[str, Any]]:
        now = time.time()
        return [self._row(record, now) for record in self.registry.snapshot()]

    def table(self, query: TableQuery) -> dict[str, Any]:
        """One page of the fleet table. Builds every row: call it in a thread."""
        now = time.time()
        pairs = [(record, self._row(record, now)) for record in self.registry.snapshot()]
        return table_page(pairs, query, self.facts)

    def record(self, device_id: str) -> DeviceRecord | None:
        return self.registry.devices.get(device_id)

    def detail(self, device_id: str) -> dict[str, Any] | None:
        record = self.record(device_id)
        if record is None:
            return None
        return {
            "row": self._row(record, time.time()),
            "meta": record.meta,
            "telemetry": record.telemetry,
            "status": {"state": record.state, "session": record.session, "ts": record.status_ts},
        }


def with_text(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**event, "text": event_text(event["kind"], event["body"])} for event in events]


def commands_with_text(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**command, "text": command_text(command)} for command in commands]
