"""One attempt at one mirror: a GET that appends the body to the part, resuming with
``Range`` where the part already has bytes.

The request carries ``If-Range`` (the strong ETag, else Last-Modified, that came with the
bytes already on disk); a server that answers 200 instead of 206 is followed from byte 0.
An attempt ends in one of three ways: the part holds every byte, ``TransientFailure``
(asking the same mirror again may help: connect, read timeout, dropped connection, 5xx,
429) or ``MirrorRejected`` (this mirror will not give the file: a 4xx, a size mismatch).

This module must not retry, wait or choose a mirror: that is the downloader's policy
(agent/fetch/downloader.py), nor check the sha256, which needs every byte.
"""

from __future__ import annotations

import re

from agent.fetch.http import ConnectFailed, HttpClient, HttpError, Response, UnsupportedURL
from agent.fetch.part import PartFile
from agent.fetch.progress import ProgressReporter
from agent.log import get_logger

log = get_logger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# 4xx answers that can succeed when asked again: timeout, too many requests.
_RETRYABLE_CLIENT_STATUS = {408, 425, 429}


class TransientFailure(Exception):
    """This attempt failed in a way that asking the same mirror again may fix."""

    def __init__(self, reason: str, *, connect: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.connect = connect


class MirrorRejected(Exception):
    """This mirror will not give the file (4xx, size or hash mismatch): try the next one."""

    def __init__(self, reason: str, *, mismatch: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.mismatch = mismatch


def attempt(client: HttpClient, url: str, part: PartFile, size: int,
            reporter: ProgressReporter) -> None:
    """One GET that appends to the part until it holds ``size`` bytes or fails."""
    if part.offset == size:
        return  # a previous run got every byte; the sha256 check decides
    # identity: the part must hold the file's bytes, not a gzip of them.
    headers = {"Accept-Encoding": "identity"}
    if part.offset:
        headers["Range"] = f"bytes={part.offset}-"
        # Another mirror's validator means nothing here; the manifest's sha256 still
        # catches a mirror whose bytes differ.
        if part.validator and part.source_url == url:
            headers["If-Range"] = part.validator
    try:
        with client.get(url, headers) as response:
            _accept(response, url, part, size)
            _receive_body(response, part, size, reporter)
    except ConnectFailed as exc:
        raise TransientFailure(str(exc), connect=True) from exc
    except UnsupportedURL as exc:
        raise MirrorRejected(str(exc)) from exc
    except HttpError as exc:
        raise TransientFailure(str(exc)) from exc
    finally:
        part.settle()  # what is on disk is what the next attempt resumes from
    if part.offset < size:
        raise TransientFailure(f"connection closed at byte {part.offset} of {size}")


def _receive_body(response: Response, part: PartFile, size: int,
                  reporter: ProgressReporter) -> None:
    """Read the body into the part's buffers until ``size`` bytes, then check that it ends
    there (a chunked body states no length up front)."""
    while part.offset < size:
        space = part.space()
        count = response.readinto(space[: size - part.offset])
        if not count:
            return  # closed early: the caller retries from part.offset
        part.advance(count)
        reporter.advance(part.offset)
    if response.readinto(memoryview(bytearray(1))):
        raise MirrorRejected(f"sent more than the manifest's {size} bytes", mismatch=True)


def _accept(response: Response, url: str, part: PartFile, size: int) -> None:
    """Check the status and headers; reset the part when the body starts at byte 0."""
    status = response.status
    if status >= 500 or status in _RETRYABLE_CLIENT_STATUS:
        raise TransientFailure(f"HTTP {status}")
    if status == 416:
        # Our part does not fit the file the mirror has: start over from byte 0.
        part.reset()
        raise TransientFailure("HTTP 416 (range not satisfiable), restarting from byte 0")
    if status not in (200, 206):
        raise MirrorRejected(f"HTTP {status}")
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != part.offset:
            part.reset()
            raise TransientFailure(
                f"206 with Content-Range {response.headers.get('Content-Range')!r} for"
                f" bytes={part.offset}-, restarting from byte 0"
            )
        if match.group(3) != "*" and int(match.group(3)) != size:
            raise MirrorRejected(
                f"file is {match.group(3)} bytes, the manifest says {size}", mismatch=True
            )
    else:
        if part.offset:
            # Range ignored, or If-Range said the file changed: this body is the
            # whole file, so it replaces what we had.
            log.info("fetch_range_ignored", file=part.path.name, mirror=url,
                     discarded_bytes=part.offset)
            part.reset()
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) != size:
            raise MirrorRejected(
                f"file is {length} bytes, the manifest says {size}", mismatch=True
            )
    part.remember_source(url, _validator(response))


def _validator(response: Response) -> str | None:
    """The If-Range value for the bytes of this response: a strong ETag, else Last-Modified."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")
