"""What the daemon keeps in ``state_dir`` between runs: the MQTT session counter, the command
overrides (``pin``, ``manifest``) and the last good Selection.

Each is a small file replaced by agent.atomic_file.atomic_write, so a crash or a power cut
leaves the old value or the new one. Not thread-safe by itself: the session counter is
written once at start (main thread), the overrides and the selection only by the
ModelSupervisor's thread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from agent.atomic_file import atomic_write
from agent.catalog.selection import Selection


class DaemonState:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)

    def next_session(self) -> int:
        """A counter bumped at every start; a controller ignores a ``lost`` older than it saw."""
        path = self.dir / "mqtt-session"
        try:
            current = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            current = 0
        atomic_write(path, str(current + 1).encode())
        return current + 1

    def overrides(self) -> dict[str, Any]:
        """``pin`` and ``manifest`` set by commands; they win over the config file."""
        try:
            data = json.loads((self.dir / "overrides.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def set_override(self, key: str, value: Any) -> None:
        data = self.overrides()
        data[key] = value
        atomic_write(self.dir / "overrides.json", json.dumps(data).encode())

    def clear_override(self, key: str) -> None:
        """Back to the config file's value (an override of None means "none", not absent)."""
        data = self.overrides()
        data.pop(key, None)
        atomic_write(self.dir / "overrides.json", json.dumps(data).encode())

    def last_good_selection(self) -> Selection | None:
        try:
            return msgspec.json.decode((self.dir / "selection.json").read_bytes(), type=Selection)
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def save_selection(self, selection: Selection) -> None:
        atomic_write(self.dir / "selection.json", msgspec.json.encode(selection))
