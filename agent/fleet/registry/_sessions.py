"""The registry's dashboard sessions table (agent.fleet.auth's ``SessionStore``), so a login
outlives one controller and holds across several.

A mixin of ``Registry``: it needs only ``self.backend``. Every method blocks on the database.
Expired rows are refused here and removed by ``Registry.prune``.
"""

from __future__ import annotations

import time

from agent.fleet.registry._backends import Backend


class SessionTable:
    backend: Backend

    def save_session(self, key: str, csrf: str, user: str, expires: float) -> None:
        with self.backend.transaction() as tx:
            tx.execute(
                "INSERT INTO sessions (key, csrf, username, expires) VALUES (?,?,?,?)",
                (key, csrf, user, expires),
            )

    def load_session(self, key: str) -> tuple[str, str, float] | None:
        """(csrf, user, expires) of a live session, or None."""
        rows = self.backend.query(
            "SELECT csrf, username, expires FROM sessions WHERE key=? AND expires>=?",
            (key, time.time()),
        )
        return (rows[0]["csrf"], rows[0]["username"], rows[0]["expires"]) if rows else None

    def delete_session(self, key: str) -> None:
        with self.backend.transaction() as tx:
            tx.execute("DELETE FROM sessions WHERE key=?", (key,))
