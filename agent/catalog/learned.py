"""Learned memory corrections: what a load really took on this device, remembered.

After every successful load the runtime records the worker's measured RSS growth over
its pre-load baseline (the quantity MemoryEstimate.ram_bytes - process_bytes estimates)
for (device id, model sha256, settings). Later selections for the same key use that
figure instead of the raw estimate and still show both. The largest figure seen for a
key is kept: the same load only grows as longer prompts touch more of its buffers.

Stored as one small JSON file in the state directory, written atomically (temp file,
fsync, rename) and bounded to MAX_ENTRIES (the least recently recorded go first). A
missing or unreadable file means "nothing learned yet", never an error. This module
does not estimate or choose anything.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.catalog.selection import Selection
from agent.log import get_logger

log = get_logger(__name__)

FILE_NAME = "learned-memory.json"
MAX_ENTRIES = 256
FORMAT = 1


def settings_key_for(
    n_ctx: int, n_batch: int, n_ubatch: int, kv_type: str, n_gpu_layers: int, flash_attn: bool
) -> str:
    """The settings that change memory use, as a stable string."""
    return (
        f"ctx={n_ctx},batch={n_batch},ubatch={n_ubatch},kv={kv_type},"
        f"gpu={n_gpu_layers},fa={int(flash_attn)}"
    )


def settings_key(selection: Selection) -> str:
    return settings_key_for(selection.n_ctx, selection.n_batch, selection.n_ubatch,
                            selection.kv_type, selection.n_gpu_layers, selection.flash_attn)


class LearnedMemory:
    def __init__(self, state_dir: Path | str) -> None:
        self.path = Path(state_dir) / FILE_NAME

    @staticmethod
    def _key(device_id: str, sha256: str, settings: str) -> str:
        return f"{device_id}|{sha256}|{settings}"

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("learned_memory_unreadable", path=str(self.path), error=str(exc))
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            return {}
        return {
            k: v
            for k, v in entries.items()
            if isinstance(v, dict) and isinstance(v.get("ram_bytes"), int) and v["ram_bytes"] > 0
        }

    def lookup(self, device_id: str, sha256: str, settings: str) -> int | None:
        entry = self._load().get(self._key(device_id, sha256, settings))
        return entry["ram_bytes"] if entry else None

    def record(self, device_id: str, sha256: str, settings: str, measured_ram_bytes: int) -> None:
        if measured_ram_bytes <= 0:
            return
        entries = self._load()
        key = self._key(device_id, sha256, settings)
        previous = entries.pop(key, {}).get("ram_bytes", 0)
        entries[key] = {"ram_bytes": max(previous, int(measured_ram_bytes)), "at": time.time()}
        if len(entries) > MAX_ENTRIES:
            newest = sorted(entries.items(), key=lambda item: item[1].get("at", 0))[-MAX_ENTRIES:]
            entries = dict(newest)
        self._write({"format": FORMAT, "entries": entries})
        log.info("learned_memory_recorded", sha256=sha256[:12], settings=settings,
                 ram_bytes=entries[key]["ram_bytes"])

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".learned-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
