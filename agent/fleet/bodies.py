"""Request bodies read with a bound: Content-Length is only a claim (a chunked body has none),
so the bytes are counted as they arrive and the read stops at the limit."""

from __future__ import annotations

from typing import Protocol

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from agent.errors import TooLargeError

UPLOAD_WRITE_BYTES = 4 << 20  # an upload goes to disk in writes of about this size


class Spool(Protocol):
    received: int
    limit: int

    def write(self, data: bytes) -> None: ...


def refuse_declared_oversize(request: Request, limit: int) -> None:
    """An upload whose Content-Length already says it is over ``limit`` is refused before a
    byte is read (one that says less, or nothing, is still counted by ``spool_body``)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"larger than this controller takes ({limit} bytes, "
                            "fleet.upload_max_bytes)", field="file")


async def spool_body(request: Request, upload: Spool) -> None:
    """Stream the body into ``upload`` in writes of UPLOAD_WRITE_BYTES, each in a thread; the
    write that would pass ``upload.limit`` goes at once, so the upload refuses it early."""
    pending = bytearray()
    async for chunk in request.stream():
        pending += chunk
        if upload.received + len(pending) > upload.limit or len(pending) >= UPLOAD_WRITE_BYTES:
            await run_in_threadpool(upload.write, bytes(pending))
            pending.clear()
    await run_in_threadpool(upload.write, bytes(pending))


async def read_bounded(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"body: over {limit} bytes", field="body")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"body: over {limit} bytes", field="body")
        chunks.append(chunk)
    return b"".join(chunks)
