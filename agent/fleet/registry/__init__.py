"""The controller's registry (see ``_registry``): SQLite by default, PostgreSQL by URL.

``_schema`` holds the migrations both databases share, ``_backends`` the two connections,
``_registry`` the registry itself, ``_records`` what it keeps in memory, ``_batch`` and
``_events`` its ingest writes, and ``_commands``, ``_rollouts``, ``_sessions`` and
``_history`` its other tables; callers import from here and never learn which database.
"""

from agent.fleet.registry._batch import MAX_CLOCK_SKEW_S
from agent.fleet.registry._records import (
    TELEMETRY_FIELDS,
    BatchOutcome,
    DeviceRecord,
    Incoming,
    pick,
    telemetry_point,
)
from agent.fleet.registry._registry import Registry

__all__ = [
    "MAX_CLOCK_SKEW_S",
    "TELEMETRY_FIELDS",
    "BatchOutcome",
    "DeviceRecord",
    "Incoming",
    "Registry",
    "pick",
    "telemetry_point",
]
