"""Generated test payloads served by the range server, and selections that point at them."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from agent.catalog.selection import MemoryEstimate, Selection
from tests.support.range_server import RangeServer


@dataclass
class Payload:
    path: Path
    size: int
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def write_payload(directory: Path, name: str, size: int, seed: int = 0) -> Payload:
    """A file of pseudo-random bytes (seeded, so a failure can be replayed)."""
    data = hashlib.shake_256(f"{name}:{seed}".encode()).digest(size)
    path = directory / name
    path.write_bytes(data)
    return Payload(path, size, hashlib.sha256(data).hexdigest())


def selection_for(payload: Payload, urls: list[str], manifest_url: str | None = None) -> Selection:
    return Selection(
        model_id="test-model",
        quant="Q4_K_M",
        file=payload.name,
        size=payload.size,
        sha256=payload.sha256,
        urls=urls,
        quality=1.0,
        n_ctx=512,
        estimate=MemoryEstimate(ram_bytes=payload.size),
        manifest_url=manifest_url,
    )


def served_file(server: RangeServer, payload: Payload) -> str:
    """Put the payload in the server root (a hard link) and return its URL."""
    target = server.root / payload.name
    if not target.exists():
        os.link(payload.path, target)
    return f"{server.url}/{payload.name}"
