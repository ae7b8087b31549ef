"""Request bodies read with a bound: Content-Length is only a claim (a chunked body has none),
so the bytes are counted as they arrive and the read stops at the limit."""

from __future__ import annotations

from starlette.requests import Request

from agent.errors import TooLargeError


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
