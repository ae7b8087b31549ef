"""The registry's rollout tables (agent.fleet.rollout): rollouts with their device steps and
decision events, and the lease that says which controller drives each.

A mixin of ``Registry``: it needs only ``self.backend``. Low rate, from the rollout thread and
the web side, each call its own short transaction; every method blocks on the database.
"""

from __future__ import annotations

import time
from typing import Any

from agent.fleet.registry._backends import Backend

_UPSERT_STEP = (
    "INSERT INTO rollout_devices (rollout_id, device_id, position, state, previous, cmd_id,"
    " progress, error, updated_ts, detail) VALUES (?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT(rollout_id, device_id) DO UPDATE SET position=excluded.position,"
    " state=excluded.state, previous=excluded.previous, cmd_id=excluded.cmd_id,"
    " progress=excluded.progress, error=excluded.error, updated_ts=excluded.updated_ts,"
    " detail=excluded.detail"
)
_INSERT_ROLLOUT_EVENT = (
    "INSERT INTO rollout_events (rollout_id, ts, device_id, decision, reason) VALUES (?,?,?,?,?)"
)


class RolloutTables:
    backend: Backend

    def insert_rollout(
        self,
        rollout_id: str,
        created: float,
        spec: str,
        state: str,
        steps: list[tuple],
        *,
        expect: str | None = None,
        events: list[tuple] = (),
    ) -> None:
        """A new rollout with its device steps (rows as ``save_rollout`` takes), at once."""
        with self.backend.transaction() as tx:
            tx.execute(
                "INSERT INTO rollouts (id, created_ts, spec, state, expect) VALUES (?,?,?,?,?)",
                (rollout_id, created, spec, state, expect),
            )
            tx.executemany(_UPSERT_STEP, [(rollout_id, *step) for step in steps])
            if events:
                tx.executemany(_INSERT_ROLLOUT_EVENT, [(rollout_id, *e) for e in events])

    def save_rollout(
        self,
        rollout_id: str,
        state: str,
        reason: str | None,
        steps: list[tuple],
        *,
        owner: str,
        events: list[tuple] = (),
    ) -> bool:
        """A rollout's state, the device steps given and its new decision events, in one
        transaction, written only while ``owner`` holds its lease: False (nothing written)
        when another controller took it. ``steps`` rows: (device_id, position, state, previous
        JSON, cmd_id, progress, error, sent_ts, detail JSON); ``events``: (ts, device_id,
        decision, reason)."""
        with self.backend.transaction() as tx:
            if (
                tx.execute(
                    "UPDATE rollouts SET state=?, reason=? WHERE id=? AND lease_owner=?",
                    (state, reason, rollout_id, owner),
                )
                != 1
            ):
                return False
            if steps:
                tx.executemany(_UPSERT_STEP, [(rollout_id, *step) for step in steps])
            if events:
                tx.executemany(_INSERT_ROLLOUT_EVENT, [(rollout_id, *e) for e in events])
        return True

    def rollout_events(
        self, rollout_id: str, *, after_id: int = 0, limit: int = 50
    ) -> list[dict[str, Any]]:
        """A rollout's decisions, oldest first: those after ``after_id``, or (at 0) the latest
        ``limit``."""
        columns = "SELECT id, ts, device_id, decision, reason FROM rollout_events"
        if after_id:
            return self.backend.query(
                f"{columns} WHERE rollout_id=? AND id>? ORDER BY id LIMIT ?",
                (rollout_id, after_id, limit),
            )
        rows = self.backend.query(
            f"{columns} WHERE rollout_id=? ORDER BY id DESC LIMIT ?", (rollout_id, limit)
        )
        return rows[::-1]

    def rollout_rows(self, rollout_id: str | None = None) -> list[tuple[dict, list[dict]]]:
        """Stored rollouts (one, or all) with their device steps in position order."""
        where, params = ("WHERE id=?", (rollout_id,)) if rollout_id else ("", ())
        rollouts = self.backend.query(
            "SELECT id, created_ts, spec, state, reason, lease_owner, lease_expires, expect"
            f" FROM rollouts {where}",
            params,
        )
        steps: dict[str, list[dict]] = {row["id"]: [] for row in rollouts}
        if rollouts:
            step_where = "WHERE rollout_id=?" if rollout_id else ""
            for step in self.backend.query(
                f"SELECT * FROM rollout_devices {step_where} ORDER BY rollout_id, position",
                params,
            ):
                steps.setdefault(step["rollout_id"], []).append(step)
        return [(row, steps[row["id"]]) for row in rollouts]

    # --- leases ------------------------------------------------------------------------

    def take_lease(self, rollout_id: str, owner: str, ttl_s: float, *, force: bool = False) -> bool:
        """Hold (or renew) the right to drive one rollout for ``ttl_s``: True when ``owner``
        holds it now. Free, expired or already ours is taken; someone else's live lease only
        with ``force`` (a rollback asked of this controller)."""
        now = time.time()
        condition = (
            "" if force else " AND (lease_owner IS NULL OR lease_owner=? OR lease_expires<?)"
        )
        params: tuple = (owner, now + ttl_s, rollout_id) + (() if force else (owner, now))
        with self.backend.transaction() as tx:
            return (
                tx.execute(
                    f"UPDATE rollouts SET lease_owner=?, lease_expires=? WHERE id=?{condition}",
                    params,
                )
                == 1
            )

    def release_lease(self, rollout_id: str, owner: str) -> None:
        with self.backend.transaction() as tx:
            tx.execute(
                "UPDATE rollouts SET lease_owner=NULL, lease_expires=NULL"
                " WHERE id=? AND lease_owner=?",
                (rollout_id, owner),
            )
