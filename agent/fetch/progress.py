"""Download progress: throttled event dicts for MQTT, and a terminal bar that renders them.

The downloader reports every chunk to a ``ProgressReporter``; the reporter turns that into
at most a few ``{event: "download", file, bytes, total, rate_bps, mirror, state}`` dicts a
second for the caller's callback (the daemon publishes them on ``events``). State changes
(``starting``, ``retrying``, ``complete`` …) always pass; only ``downloading`` is throttled.

``TerminalProgressBar`` is one such callback: a one-line bar on stderr when stderr is a
TTY, nothing otherwise (journald does not want carriage returns). It must not do any I/O
other than writing to its stream, and neither class may raise into the download loop.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Literal, TextIO

from agent.log import get_logger

log = get_logger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]
State = Literal["starting", "downloading", "retrying", "verifying", "complete", "cached", "failed"]

# MQTT events are QoS 1 and go through the broker to every dashboard: a few a second
# shows movement without flooding a constrained link.
MIN_INTERVAL_S = 0.25
# Rate smoothing: each throttled sample moves the shown rate this far toward the newest
# window, so one slow socket read does not make the figure jump.
RATE_SMOOTHING = 0.5


class ProgressReporter:
    """Throttles per-chunk updates into progress events for one file."""

    def __init__(
        self,
        callback: ProgressCallback | None,
        *,
        file: str,
        total: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._callback = callback
        self._clock = clock
        self.file = file
        self.total = total
        self.mirror: str | None = None
        self._last_emit = float("-inf")
        self._window_start = clock()
        self._window_bytes = 0
        self._last_bytes = 0
        self.rate_bps = 0.0

    def state(self, state: State, done: int, **extra: Any) -> None:
        """Report a state change; never throttled."""
        self._last_bytes = done
        self._emit(state, done, extra)

    def advance(self, done: int) -> None:
        """Report that ``done`` bytes of the file are on disk; throttled."""
        self._window_bytes += max(0, done - self._last_bytes)
        self._last_bytes = done
        now = self._clock()
        if now - self._last_emit < MIN_INTERVAL_S:
            return
        elapsed = now - self._window_start
        if elapsed > 0:
            window_rate = self._window_bytes / elapsed
            self.rate_bps = (
                window_rate
                if self.rate_bps == 0
                else self.rate_bps + RATE_SMOOTHING * (window_rate - self.rate_bps)
            )
        self._window_start, self._window_bytes = now, 0
        self._emit("downloading", done, {})

    def restart_window(self) -> None:
        """Start measuring the rate afresh (after a retry's wait, which is not throughput)."""
        self._window_start, self._window_bytes = self._clock(), 0

    def _emit(self, state: State, done: int, extra: dict[str, Any]) -> None:
        self._last_emit = self._clock()
        if self._callback is None:
            return
        event: dict[str, Any] = {
            "event": "download",
            "file": self.file,
            "bytes": done,
            "total": self.total,
            "rate_bps": round(self.rate_bps),
            "mirror": self.mirror,
            "state": state,
            **extra,
        }
        try:
            self._callback(event)
        except Exception as exc:  # a failed MQTT publish must not abort the download
            log.warning("fetch_progress_callback_failed", file=self.file, error=repr(exc))


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


class TerminalProgressBar:
    """A progress callback that draws one line on a TTY and stays silent otherwise."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._width = width
        self._enabled = self._stream.isatty()

    def __call__(self, event: dict[str, Any]) -> None:
        if not self._enabled:
            return
        total = event.get("total") or 0
        done = event.get("bytes") or 0
        fraction = min(1.0, done / total) if total else 0.0
        filled = int(fraction * self._width)
        bar = "#" * filled + "." * (self._width - filled)
        line = (
            f"\r{event.get('file')} [{bar}] {fraction * 100:5.1f}% "
            f"{_mib(done)}/{_mib(total)} MiB {_mib(event.get('rate_bps') or 0)} MiB/s "
            f"{event.get('state')}"
        )
        self._stream.write(line + "\x1b[K")
        if event.get("state") in ("complete", "cached", "failed"):
            self._stream.write("\n")
        self._stream.flush()
