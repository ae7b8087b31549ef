"""Per-request and rolling inference metrics: last minute and since start.

Fed one finished request at a time by the engine; read by stats() for telemetry, the
estimator's learned correction and the selector's efficiency factor. Plain arithmetic,
thread-safe, no I/O.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

WINDOW_S = 60.0


class _Totals:
    def __init__(self) -> None:
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.prefill_s = 0.0  # prompt tokens / prefill rate, summed: a token-weighted rate
        self.prefill_tokens = 0
        self.decode_s = 0.0
        self.decode_tokens = 0
        self.ttft_ms_sum = 0.0

    def add(self, record: dict[str, Any]) -> None:
        error = record.get("error")
        if error:
            self.errors[error["code"]] += 1
            return
        self.ok += 1
        usage, timings = record["usage"], record["timings"]
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.ttft_ms_sum += timings["ttft_ms"]
        if timings["prefill_tokens_per_s"] > 0:
            self.prefill_tokens += usage["prompt_tokens"]
            self.prefill_s += usage["prompt_tokens"] / timings["prefill_tokens_per_s"]
        decoded = max(usage["completion_tokens"] - 1, 0)
        if timings["decode_tokens_per_s"] > 0 and decoded:
            self.decode_tokens += decoded
            self.decode_s += decoded / timings["decode_tokens_per_s"]

    def summary(self) -> dict[str, Any]:
        return {
            "requests_ok": self.ok,
            "requests_error": sum(self.errors.values()),
            "errors": dict(self.errors),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": round(self.ttft_ms_sum / self.ok, 3) if self.ok else None,
            "prefill_tokens_per_s": round(self.prefill_tokens / self.prefill_s, 2)
            if self.prefill_s
            else None,
            "decode_tokens_per_s": round(self.decode_tokens / self.decode_s, 2)
            if self.decode_s
            else None,
        }


class Metrics:
    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._since_start = _Totals()
        self._recent: deque[tuple[float, dict[str, Any]]] = deque()
        self.last: dict[str, Any] | None = None

    def record(self, final: dict[str, Any]) -> None:
        """Count one final record (success or error)."""
        with self._lock:
            self._since_start.add(final)
            self._recent.append((self._clock(), final))
            if not final.get("error"):
                self.last = {
                    "finish_reason": final["finish_reason"],
                    **final["usage"],
                    **final["timings"],
                }

    def summary(self) -> dict[str, Any]:
        with self._lock:
            horizon = self._clock() - WINDOW_S
            while self._recent and self._recent[0][0] < horizon:
                self._recent.popleft()
            window = _Totals()
            for _, final in self._recent:
                window.add(final)
            return {
                "last_minute": window.summary(),
                "since_start": self._since_start.summary(),
                "last_request": self.last,
            }
