"""The framed pipe protocol between the engine (parent) and the inference worker (child).

A frame is a 4-byte big-endian length followed by a msgpack map. Parent to worker maps
carry ``op`` (load, generate, count, cancel, stop); worker to parent maps carry ``type``
(loaded, load_failed, chunk, final, count). Both sides import this module, so it must
stay free of llama_cpp, numpy and anything else heavy: the parent has to stay light.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Any

import msgspec

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a prompt is at most a context of text; anything bigger is a bug

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class ProtocolError(Exception):
    """The other side sent something that is not a frame (a bug, never user input)."""


class FrameWriter:
    """Writes whole frames to a pipe fd; safe to share between threads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        body = _encoder.encode(message)
        data = _HEADER.pack(len(body)) + body
        with self._lock:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


class FrameReader:
    """Reads frames from a pipe fd; one reader thread per fd."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def _read_exactly(self, size: int) -> bytes | None:
        chunks = []
        remaining = size
        while remaining:
            chunk = os.read(self._fd, min(remaining, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None at end of file (the other side is gone)."""
        header = self._read_exactly(_HEADER.size)
        if header is None:
            return None
        (size,) = _HEADER.unpack(header)
        if size > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
        body = self._read_exactly(size)
        if body is None:
            return None
        message = _decoder.decode(body)
        if not isinstance(message, dict):
            raise ProtocolError("frame is not a map")
        return message

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
