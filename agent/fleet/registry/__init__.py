"""The controller's registry (see ``_registry``): SQLite by default, PostgreSQL by URL.

``_schema`` holds the migrations both databases share, ``_backends`` the two connections,
``_registry`` the registry itself; callers import from here and never learn which database.
"""

from agent.fleet.registry._registry import (
    MAX_CLOCK_SKEW_S,
    TELEMETRY_FIELDS,
    BatchOutcome,
    DeviceRecord,
    Incoming,
    Registry,
    pick,
    telemetry_point,
)

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
