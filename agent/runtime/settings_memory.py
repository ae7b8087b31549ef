"""Which fallback step worked, per (device, model sha256), kept in the state directory.

The next start goes straight to the remembered step instead of crashing through the
ladder again. One small JSON file, written by agent.atomic_file.atomic_write, so a
power cut leaves either the old or the new content. Must not hold anything else.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from agent.atomic_file import atomic_write

FILE_NAME = "runtime-settings.json"


class SettingsMemory:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._lock = threading.Lock()

    @staticmethod
    def key(device_id: str, model_key: str) -> str:
        return f"{device_id}/{model_key}"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            # A missing or damaged file costs one walk down the ladder, nothing more.
            return {}
        return data.get("entries", {}) if isinstance(data, dict) else {}

    def lookup(self, device_id: str, model_key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._read().get(self.key(device_id, model_key))

    def remember(self, device_id: str, model_key: str, step: str, settings: dict[str, Any]) -> None:
        with self._lock:
            entries = self._read()
            entries[self.key(device_id, model_key)] = {
                "step": step,
                "settings": settings,
                "recorded_at": time.time(),
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            body = json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True)
            atomic_write(self.path, body.encode())
