"""A bounded record of recent request ids, so a redelivered prompt or command is answered once.

MQTT QoS 1 is at-least-once: a persistent session, a broker restart or a controller retry can
deliver the same request id again. The record maps each recent id to either "in flight" or its
final reply. A duplicate of a finished id gets the stored final again (the first may have been
lost with the connection); a duplicate of an in-flight id is dropped, because its reply is
coming. Thread-safe; the oldest finished ids are forgotten first. No I/O.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

Seen = Literal["new", "in_flight", "finished"]


@dataclass(frozen=True)
class Admission:
    seen: Seen
    final: bytes | None = None  # the stored final reply of a finished id


class RecentRequests:
    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._finals: OrderedDict[str, bytes | None] = OrderedDict()  # None: in flight

    def admit(self, key: str) -> Admission:
        """Mark ``key`` in flight if it is new; otherwise say what is known about it."""
        with self._lock:
            if key in self._finals:
                final = self._finals[key]
                self._finals.move_to_end(key)
                return Admission("in_flight") if final is None else Admission("finished", final)
            self._finals[key] = None
            self._evict()
            return Admission("new")

    def finish(self, key: str, final: bytes) -> None:
        with self._lock:
            self._finals[key] = final
            self._finals.move_to_end(key)
            self._evict()

    def forget(self, key: str) -> None:
        """Drop ``key`` (a request that was never started may be sent again)."""
        with self._lock:
            self._finals.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._finals)

    def _evict(self) -> None:
        # In-flight ids are bounded by the engine's queue; evict the oldest finished ones first.
        while len(self._finals) > self.capacity:
            victim = next((k for k, v in self._finals.items() if v is not None), None)
            if victim is None:
                victim = next(iter(self._finals))
            del self._finals[victim]
