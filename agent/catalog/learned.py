"""Learned figures: what a load really took, and how fast it decoded, on this device.

After every successful load the runtime records the worker's measured RSS growth over
its pre-load baseline (the quantity MemoryEstimate.ram_bytes - process_bytes estimates)
for (device id, model sha256, settings). Later selections for the same key use that
figure instead of the raw estimate and still show both. The largest figure seen for a
key is kept: the same load only grows as longer prompts touch more of its buffers.

Stored as one small JSON file in the state directory, written by
agent.atomic_file.atomic_write and bounded to MAX_ENTRIES (the least recently recorded go
first). A missing or unreadable file means "nothing learned yet", never an error. This module
does not estimate or choose anything.

LearnedSpeed does the same for decode speed: every generation the engine measured adds the
effective read rate it achieved (decode tok/s x bytes read per token, agent.catalog.speed)
for (device id, llama.cpp build, model sha256, GPU layers). The build is part of the key
because a different build (another version, CUDA instead of CPU) decodes at another rate;
see llama_build_key.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.atomic_file import atomic_write
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
        return {
            k: v
            for k, v in _read_entries(self.path, "learned_memory_unreadable").items()
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
        _write_atomically(self.path, data)


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data).encode())


def _read_entries(path: Path, event: str) -> dict[str, Any]:
    """The ``entries`` object of a learned file, or {} when it is missing or not ours."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning(event, path=str(path), error=str(exc))
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


SPEED_FILE_NAME = "learned-speed.json"
# Samples kept per key: the median of the last few generations, so one slow turn (a swap
# loading beside it, a thermal dip) does not move the figure much.
SPEED_SAMPLES = 16
# Generations that decoded fewer tokens than this time mostly the first token's overhead.
MIN_DECODED_TOKENS = 8
# A busy daemon decodes many turns a minute; the file is written at most this often (and on
# flush), the first sample of an engine at once.
SPEED_WRITE_INTERVAL_S = 30.0
_NATIVE_SUFFIXES = (".so", ".dylib", ".dll")


def llama_build_key(distribution: importlib.metadata.Distribution | None = None) -> str:
    """The installed llama.cpp build: llama-cpp-python's version and a fingerprint of its
    native libraries' hashes from the wheel's RECORD, so a CUDA build and a CPU build of one
    version differ. Read from package metadata, without importing llama_cpp."""
    try:
        dist = distribution or importlib.metadata.distribution("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "none"
    libraries = sorted(
        f"{file}={file.hash.value if file.hash else file.size}"
        for file in dist.files or []
        if file.name.endswith(_NATIVE_SUFFIXES) or ".so." in file.name
    )
    fingerprint = hashlib.sha256("\n".join(libraries).encode()).hexdigest()[:12]
    return f"{dist.version}+{fingerprint}"


@dataclass(frozen=True)
class LearnedDecode:
    """What one variant decoded at on this device and build (medians of recent samples)."""

    bytes_per_s: float  # effective read rate: tok/s x bytes read per token
    tokens_per_s: float  # as measured, at whatever context the generations had
    samples: int


@dataclass(frozen=True)
class DecodeRates:
    """Everything learned about decode speed for one device and build; plain data for the
    selector. ``variants`` is keyed by (sha256, n_gpu_layers)."""

    variants: dict[tuple[str, int], LearnedDecode]

    def variant(self, sha256: str, n_gpu_layers: int) -> LearnedDecode | None:
        return self.variants.get((sha256, n_gpu_layers))

    def build_bytes_per_s(self, n_gpu_layers: int) -> float | None:
        """The build's median rate over the variants that ran here with (or without) GPU
        offload like ``n_gpu_layers``: the figure for a variant that has not run yet."""
        offloaded = n_gpu_layers > 0
        rates = [d.bytes_per_s for (_, gpu), d in self.variants.items() if (gpu > 0) == offloaded]
        return statistics.median(rates) if rates else None

    def bytes_per_s(self, sha256: str, n_gpu_layers: int) -> float | None:
        own = self.variant(sha256, n_gpu_layers)
        return own.bytes_per_s if own else self.build_bytes_per_s(n_gpu_layers)


def _valid_sample(sample: Any) -> bool:
    return (isinstance(sample, list) and len(sample) == 2
            and all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in sample))


class LearnedSpeed:
    """Decode rates per (device, build, sha256, GPU layers) in the state directory.

    Thread-safe: the engine's dispatcher records, its close() flushes."""

    def __init__(self, state_dir: Path | str) -> None:
        self.path = Path(state_dir) / SPEED_FILE_NAME
        self._lock = threading.Lock()
        self._pending: dict[str, list[list[float]]] = {}
        self._last_write: float | None = None

    @staticmethod
    def _key(device_id: str, build: str, sha256: str, n_gpu_layers: int) -> str:
        return f"{device_id}|{build}|{sha256}|gpu={n_gpu_layers}"

    def _load(self) -> dict[str, dict[str, Any]]:
        entries = {}
        for key, entry in _read_entries(self.path, "learned_speed_unreadable").items():
            samples = entry.get("samples") if isinstance(entry, dict) else None
            if isinstance(samples, list) and key.count("|") == 3:
                kept = [s for s in samples if _valid_sample(s)][-SPEED_SAMPLES:]
                if kept:
                    at = entry.get("at")
                    entries[key] = {"samples": kept, "at": at if isinstance(at, (int, float)) else 0}
        return entries

    def rates(self, device_id: str, build: str) -> DecodeRates:
        prefix = f"{device_id}|{build}|"
        with self._lock:
            entries = self._load()
            for key, samples in self._pending.items():  # not yet written, but measured
                stored = entries.setdefault(key, {"samples": [], "at": 0})
                stored["samples"] = (stored["samples"] + samples)[-SPEED_SAMPLES:]
        variants = {}
        for key, entry in entries.items():
            sha256, marker, gpu = key[len(prefix):].rpartition("|gpu=")
            if not key.startswith(prefix) or not marker or not gpu.isdigit():
                continue
            samples = entry["samples"]
            variants[(sha256, int(gpu))] = LearnedDecode(
                bytes_per_s=statistics.median(s[0] for s in samples),
                tokens_per_s=statistics.median(s[1] for s in samples),
                samples=len(samples),
            )
        return DecodeRates(variants)

    def record(self, device_id: str, build: str, sha256: str, n_gpu_layers: int, *,
               tokens_per_s: float, bytes_per_token: float, clock=time.monotonic) -> None:
        """Add one measured generation; written now if the last write is old enough."""
        if not (tokens_per_s > 0 and bytes_per_token > 0):
            return
        key = self._key(device_id, build, sha256, n_gpu_layers)
        with self._lock:
            self._pending.setdefault(key, []).append([tokens_per_s * bytes_per_token, tokens_per_s])
            now = clock()
            if self._last_write is not None and now - self._last_write < SPEED_WRITE_INTERVAL_S:
                return
            self._last_write = now
            self._write_pending()

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._write_pending()

    def _write_pending(self) -> None:
        entries = self._load()
        now = time.time()
        for key, samples in self._pending.items():
            previous = entries.pop(key, {}).get("samples", [])
            entries[key] = {"samples": (previous + samples)[-SPEED_SAMPLES:], "at": now}
        if len(entries) > MAX_ENTRIES:
            entries = dict(sorted(entries.items(), key=lambda item: item[1]["at"])[-MAX_ENTRIES:])
        pending, self._pending = self._pending, {}
        _write_atomically(self.path, {"format": FORMAT, "entries": entries})
        log.info("learned_speed_recorded", keys=len(pending))
