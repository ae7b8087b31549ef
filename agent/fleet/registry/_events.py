"""The bound on stored events: at most ``per_device`` (plus 10 % slack) per device, the newest,
each at most ``max_bytes``.

It counts each device's stored events so a trim costs one DELETE per device per ~100 events,
not one per event, and trims inside the writer's transaction. The counts are this controller's
own: with N controllers on one database each trims on its own count (up to the cap plus
N x 10 %). Blocking: called on the registry's writer paths only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from agent.fleet.registry._backends import Backend, Transaction
from agent.log import get_logger

log = get_logger(__name__)

EVENT_COLUMNS = ("device_id", "ts", "kind", "body")
TRIM_SLACK = 1.1


class EventBounds:
    def __init__(self, per_device: int, max_bytes: int) -> None:
        self.per_device = per_device
        self.max_bytes = max_bytes
        self._counts: dict[str, int] = {}

    def hold_stored(self, backend: Backend) -> None:
        """Hold events written before these bounds to them too: drop oversize bodies, trim
        each device to its cap, and learn the per-device counts that later trims use."""
        with backend.transaction() as tx:
            tx.execute("DELETE FROM events WHERE length(body) > ?", (self.max_bytes,))
            counts = tx.fetchall("SELECT device_id, COUNT(*) FROM events GROUP BY device_id")
            for device_id, count in counts:
                self._counts[device_id] = count
                if count > self.per_device:
                    self._trim(tx, device_id)

    def insert(self, tx: Transaction, rows: list[Sequence[Any]], devices: Iterable[str]) -> None:
        """Insert event rows (``EVENT_COLUMNS``) and trim those of ``devices`` past the cap."""
        tx.insert_rows("events", EVENT_COLUMNS, rows)
        for device_id, *_ in rows:
            self._counts[device_id] = self._counts.get(device_id, 0) + 1
        for device_id in devices:
            if self._counts[device_id] > self.per_device * TRIM_SLACK:
                self._trim(tx, device_id)

    def _trim(self, tx: Transaction, device_id: str) -> None:
        """Keep the newest ``per_device`` events of one device (inside ``tx``)."""
        removed = tx.execute(
            "DELETE FROM events WHERE device_id=? AND id <= (SELECT id FROM events WHERE"
            " device_id=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (device_id, device_id, self.per_device),
        )
        # Counted again rather than decremented: retention prunes without telling the counts.
        self._counts[device_id] = tx.fetchall(
            "SELECT COUNT(*) FROM events WHERE device_id=?", (device_id,)
        )[0][0]
        log.info("events_trimmed", device=device_id, removed=removed)
