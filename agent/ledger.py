"""The RequestLedger: every request the daemon has taken, in flight or answered, in one place.

MQTT QoS 1 is at-least-once: a persistent session, a broker restart or a controller retry can
deliver the same request id again. The ledger maps each recent prompt and command id to "in
flight" (a prompt also keeps where its reply goes) or to its final reply. A duplicate of a
finished id gets the stored final again (the first may have been lost with the connection);
a duplicate of an in-flight id is dropped, because its reply is coming. The oldest finished
ids are forgotten first; in-flight ones only when nothing else is left to forget.

Thread-safe (one lock, held for dict operations only): the dispatcher admits, the replies
thread and the ModelSupervisor's thread finish. No I/O.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

Seen = Literal["new", "in_flight", "finished"]
Kind = Literal["prompt", "cmd"]


@dataclass(frozen=True)
class ReplyRoute:
    """Where the records of one request go."""

    topic: str
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Admission:
    seen: Seen
    final: bytes | None = None  # the stored final reply of a finished id


@dataclass(frozen=True)
class InFlight:
    """A prompt that was admitted and has no final yet."""

    route: ReplyRoute
    stream: bool


class RequestLedger:
    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._finals: OrderedDict[tuple[Kind, str], bytes | None] = OrderedDict()  # None: in flight
        self._prompts: dict[str, InFlight] = {}

    def admit(self, kind: Kind, request_id: str, flight: InFlight | None = None) -> Admission:
        """Mark the id in flight if it is new (a prompt with its ``flight``); otherwise say
        what is known about it."""
        key = (kind, request_id)
        with self._lock:
            if key in self._finals:
                final = self._finals[key]
                self._finals.move_to_end(key)
                return Admission("in_flight") if final is None else Admission("finished", final)
            self._finals[key] = None
            if flight is not None:
                self._prompts[request_id] = flight
            self._evict()
            return Admission("new")

    def finish(self, kind: Kind, request_id: str, final: bytes) -> InFlight | None:
        """Store the final reply; returns the prompt's InFlight, None if it had none. The
        first final wins: a request is answered once."""
        key = (kind, request_id)
        with self._lock:
            if self._finals.get(key) is not None:
                return None
            self._finals[key] = final
            self._finals.move_to_end(key)
            self._evict()
            return self._prompts.pop(request_id, None) if kind == "prompt" else None

    def forget(self, kind: Kind, request_id: str) -> None:
        """Drop the id: a request that was never started may be sent again and run."""
        with self._lock:
            self._finals.pop((kind, request_id), None)
            if kind == "prompt":
                self._prompts.pop(request_id, None)

    def in_flight(self, request_id: str) -> InFlight | None:
        with self._lock:
            return self._prompts.get(request_id)

    def prompts_in_flight(self) -> int:
        with self._lock:
            return len(self._prompts)

    def unanswered_prompts(self) -> dict[str, InFlight]:
        """A copy of the prompts in flight, for failing them at shutdown."""
        with self._lock:
            return dict(self._prompts)

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
