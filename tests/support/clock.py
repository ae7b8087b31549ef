"""A clock a test moves by hand: what a rollout manager decides by (its ``clock``), so a soak,
a rate or a timeout passes in a step of the test instead of in seconds of waiting."""

from __future__ import annotations

import threading
import time


class ManualClock:
    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._now += seconds
            return self._now
