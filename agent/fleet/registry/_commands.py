"""The registry's commands table: what was sent to which device, and (written by the ingest
batch, agent.fleet.registry._batch) its result.

A mixin of ``Registry``: it needs only ``self.backend``. Low rate, from the web side, each call
its own short transaction; every method blocks on the database.
"""

from __future__ import annotations

import time
from typing import Any

from agent.fleet.registry._backends import Backend
from agent.fleet.registry._records import from_json, to_json


class CommandTable:
    backend: Backend

    def record_command(
        self, command_id: str, device_id: str, op: str, args: dict, source: str
    ) -> None:
        with self.backend.transaction() as tx:
            tx.execute(
                "INSERT INTO commands (id, device_id, op, args, sent_ts, source) VALUES"
                " (?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET device_id=excluded.device_id,"
                " op=excluded.op, args=excluded.args, sent_ts=excluded.sent_ts,"
                " done_ts=NULL, ok=NULL, result=NULL, source=excluded.source",
                (command_id, device_id, op, to_json(args), time.time(), source),
            )

    def command(self, command_id: str) -> dict[str, Any] | None:
        rows = self.backend.query("SELECT * FROM commands WHERE id=?", (command_id,))
        return _command_dict(rows[0]) if rows else None

    def commands(self, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.backend.query(
            "SELECT * FROM commands WHERE device_id=? ORDER BY sent_ts DESC LIMIT ?",
            (device_id, limit),
        )
        return [_command_dict(row) for row in rows]


def _command_dict(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "device_id": row["device_id"],
        "op": row["op"],
        "args": from_json(row["args"]),
        "sent_ts": row["sent_ts"],
        "done_ts": row["done_ts"],
        "ok": None if row["ok"] is None else bool(row["ok"]),
        "result": from_json(row["result"]) if row["result"] else None,
        "source": row["source"],
    }
