"""The daemon's ``telemetry`` thread: one message every ``telemetry.interval_s``.

Built on the hardware readers, like the probe: memory is agent.hardware.memory's, so inside
a container or a systemd slice ``mem.total_bytes`` is the cgroup's limit and
``available_bytes`` what this cgroup may still use (the budget the selector plans with), not
the host's free RAM; temperatures are agent.hardware.thermal's (thermal zones, then hwmon);
disk is the free space under the model store. The start is jittered so a fleet that rebooted
together does not report in lockstep, and the thread waits on ``stop_event.wait(interval)``,
so a shutdown is immediate. It only reads: every figure comes from the engine's stats or
the callables it was given.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from agent.config import TelemetryConfig
from agent.hardware.device import MemoryInfo
from agent.hardware.disk import read_disk_free
from agent.hardware.memory import probe_memory
from agent.hardware.thermal import probe_temperatures
from agent.log import get_logger
from agent.runtime.engine import Engine

log = get_logger(__name__)


class Telemetry:
    def __init__(self, config: TelemetryConfig, *, engine: Engine, cache_dir: str,
                 state: Callable[[], str], model_name: Callable[[], str],
                 publish: Callable[[dict[str, Any]], None], stop_event: threading.Event) -> None:
        self.config = config
        self.engine = engine
        self.cache_dir = cache_dir
        self.state = state
        self.model_name = model_name
        self.publish = publish
        self.stop_event = stop_event
        self.seq = 0  # written by the telemetry thread only

    def run(self) -> None:
        """The thread's body: jittered start, then one message per interval until stopped."""
        interval = self.config.interval_s
        if self.stop_event.wait(random.uniform(0, interval)):
            return
        psutil.cpu_percent(None)  # the first call only primes the counter
        while not self.stop_event.wait(0 if self.seq == 0 else interval):
            try:
                self.publish(self.sample())
            except Exception:  # one bad reading must not end the reports
                log.exception("telemetry_failed")

    def sample(self) -> dict[str, Any]:
        self.seq += 1
        stats = self.engine.stats()
        window = stats.get("last_minute") or {}
        total = stats.get("since_start") or {}
        last = stats.get("last_request") or {}
        temps = probe_temperatures()
        return {
            "seq": self.seq,
            "ts": round(time.time(), 3),
            "state": self.state(),
            "cpu_percent": psutil.cpu_percent(None),
            "mem": _memory_now(probe_memory()),
            "temp_c": max(temps.values()) if temps else None,
            "disk_free_bytes": read_disk_free(self.cache_dir),
            "queue_depth": stats.get("queue_depth"),
            "prefill_tps": window.get("prefill_tokens_per_s") or last.get("prefill_tokens_per_s"),
            "decode_tps": window.get("decode_tokens_per_s") or last.get("decode_tokens_per_s"),
            "ttft_ms": window.get("ttft_ms") or last.get("ttft_ms"),
            "requests_ok": total.get("requests_ok", 0),
            "requests_error": total.get("requests_error", 0),
            "worker_rss_bytes": (stats.get("worker") or {}).get("rss_bytes"),
            "worker_restarts": stats.get("worker_restarts"),
            "model": self.model_name(),
        }


def _memory_now(memory: MemoryInfo) -> dict[str, Any]:
    """Total and available as this process sees them: a cgroup limit lower than RAM is the
    total, and what the cgroup may still use is what is available."""
    if not memory.total_bytes:  # no /proc/meminfo (macOS): psutil's view of the host
        host = psutil.virtual_memory()
        return {"total_bytes": host.total, "available_bytes": host.available,
                "percent": host.percent, "cgroup_limit_bytes": None}
    total = memory.cgroup_limit_bytes or memory.total_bytes
    available = memory.budget_bytes
    return {"total_bytes": total, "available_bytes": available,
            "percent": round(100.0 * (1 - available / total), 1) if total else None,
            "cgroup_limit_bytes": memory.cgroup_limit_bytes}
