"""The framed pipe protocol between the engine (parent) and the inference worker (child).

A frame is a 4-byte big-endian length followed by one msgpack-encoded msgspec Struct, tagged
with its kind: parent to worker ``load``, ``generate``, ``cancel``, ``stop``; worker to parent
``loaded``, ``load_failed``, ``chunk``, ``final``. Each side decodes into the Structs it may
receive, so a frame of the wrong shape is a ProtocolError at the pipe, not a KeyError later.
Both sides import this module, so it must stay free of llama_cpp, numpy and anything else
heavy: the parent has to stay light.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Any

import msgspec

_HEADER = struct.Struct(">I")
READ_BYTES = 64 * 1024  # a pipe's capacity on Linux
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a prompt is at most a context of text; anything bigger is a bug


class ProtocolError(Exception):
    """The other side sent something that is not a frame (a bug, never user input)."""


class _Frame(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=True):
    pass


# parent -> worker -------------------------------------------------------------------------

class Load(_Frame, tag="load"):
    settings: dict[str, Any]  # agent.runtime.ladder's settings of one rung
    canary_prompt: str = ""
    canary_tokens: int = 0


class Generate(_Frame, tag="generate"):
    id: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    stop: list[str] = []
    seed: int | None = None
    stream: bool = True
    messages: list[dict[str, str]] | None = None  # exactly one of messages and prompt
    prompt: str | None = None
    grammar: str | None = None
    response_format: dict[str, Any] | None = None  # agent.runtime.request.ResponseFormat


class Cancel(_Frame, tag="cancel"):
    id: str
    reason: str = "cancelled"  # "timeout" makes the final's code timeout


class Stop(_Frame, tag="stop"):
    pass


ToWorker = Load | Generate | Cancel | Stop


# worker -> parent -------------------------------------------------------------------------

class Loaded(_Frame, tag="loaded"):
    load_ms: float
    rss_before: int
    rss_after: int
    n_ctx: int
    n_ctx_train: int
    chat_template: bool
    canary_text: str = ""
    canary_tokens: int = 0


class LoadFailed(_Frame, tag="load_failed"):
    message: str


class Chunk(_Frame, tag="chunk"):
    id: str
    seq: int
    delta: str


class Final(_Frame, tag="final"):
    """The request's last frame: a result, or ``error`` ({code, message[, details]})."""

    id: str
    text: str = ""
    finish_reason: str = ""
    usage: dict[str, int] = {}
    timings: dict[str, float] = {}
    error: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """The final record of agent.runtime.request's contract."""
        if self.error is not None:
            return {"id": self.id, "done": True, "error": self.error}
        return {"id": self.id, "done": True, "text": self.text, "finish_reason": self.finish_reason,
                "usage": self.usage, "timings": self.timings}


FromWorker = Loaded | LoadFailed | Chunk | Final

_encoder = msgspec.msgpack.Encoder()


class FrameWriter:
    """Writes whole frames to a pipe fd; safe to share between threads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
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
    """Reads frames of ``frame_type`` (ToWorker, FromWorker) from a pipe fd; one reader thread."""

    def __init__(self, fd: int, frame_type: Any = Any) -> None:
        self._fd = fd
        self._decoder = msgspec.msgpack.Decoder(frame_type)
        # What one read brought beyond the frame it finished: a streamed reply's frames are
        # small, so most of them arrive, header and body, in a single read.
        self._buffer = bytearray()

    def _fill(self, size: int) -> bool:
        """Buffer at least ``size`` bytes; False at end of file."""
        while len(self._buffer) < size:
            chunk = os.read(self._fd, READ_BYTES)
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def receive(self) -> Any:
        """The next frame, or None at end of file (the other side is gone)."""
        if not self._fill(_HEADER.size):
            return None
        (size,) = _HEADER.unpack_from(self._buffer)
        if size > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
        end = _HEADER.size + size
        if not self._fill(end):
            return None
        body = self._buffer[_HEADER.size:end]
        del self._buffer[:end]
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise ProtocolError(f"not a frame: {exc}") from None

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
