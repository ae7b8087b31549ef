"""Verified downloads: one file from a list of mirrors into a final path, or not at all.

The bytes go to ``<name>.part`` beside the target while an exclusive ``fcntl`` lock on
``<name>.lock`` is held, so two processes never write one part. Both are opened with
``O_NOFOLLOW`` and must be regular files with one link: a symlink planted there (pointing at
a file the fetching user, maybe root, can write) is refused, never truncated. sha256 is
computed as the bytes are written (a hasher and a writer thread, beside the receive loop); a resumed
download hashes the bytes it already has first. The body is read into reusable 1 MiB buffers
(agent/fetch/http.py reads the socket into them), so nothing is allocated per chunk. Only a
file whose size and sha256 match is fsynced and renamed into place, so the target path
either does not exist or holds the right bytes.

Resume uses ``Range`` plus ``If-Range`` (the strong ETag, else Last-Modified, that came
with the bytes already on disk); a server that answers 200 instead of 206 is followed from
byte 0. Transient failures (connect, read timeout, dropped connection, 5xx, 429) are
retried with exponential backoff and full jitter; a 4xx, a size or sha256 mismatch, or
running out of retries moves on to the next mirror.

This module must not decide which file to fetch or what to keep: that is the store's job
(agent/fetch/store.py), nor speak HTTP itself: agent/fetch/http.py does, through a
transport the caller may replace.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import queue
import random
import re
import shutil
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable

from agent.atomic_file import fsync_directory
from agent.config import FetchConfig
from agent.errors import ChecksumError, DiskFullError, FetchError, StoreError
from agent.fetch.http import (ConnectFailed, HttpClient, HttpError, Response, Timeouts,
                              Transport, UnsupportedURL)
from agent.fetch.progress import ProgressCallback, ProgressReporter
from agent.log import get_logger

log = get_logger(__name__)

# Bytes per read when hashing or copying local files.
CHUNK_BYTES = 1 << 20
# The body is received into reusable buffers of this size, each hashed and written as one
# piece: a hand-over per MiB instead of per 64 KiB socket read. IN_FLIGHT_BLOCKS of them
# bound memory and what a kill loses (bytes received but not yet on disk).
BLOCK_BYTES = 1 << 20
IN_FLIGHT_BLOCKS = 4
# Ask the kernel to start writing each this many new bytes to disk while the download
# goes on, so the fsync before the rename has little left to do instead of a whole model.
WRITEBACK_BYTES = 8 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# 4xx answers that can succeed when asked again: timeout, too many requests.
_RETRYABLE_CLIENT_STATUS = {408, 425, 429}


@dataclass
class MirrorFailure:
    url: str
    reason: str
    offline: bool = False  # the mirror could not be reached at all (connect error/timeout)
    mismatch: bool = False  # the mirror served bytes that do not match the manifest


class _Transient(Exception):
    """This attempt failed in a way that asking the same mirror again may fix."""

    def __init__(self, reason: str, *, connect: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.connect = connect


class _MirrorRejected(Exception):
    """This mirror will not give the file (4xx, size or hash mismatch): try the next one."""

    def __init__(self, reason: str, *, mismatch: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.mismatch = mismatch


def open_store_file(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` for a file the store writes: never through a symlink, never inherited
    by a child, and only a regular file with one link (a hard link to someone else's file
    is the same attack as a symlink). Raises StoreError naming the path otherwise; a missing
    file (no ``O_CREAT``) raises FileNotFoundError, which callers expect."""
    try:
        # O_NONBLOCK: opening a planted FIFO for reading would otherwise wait for a writer
        # forever, before the fstat below could refuse it.
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except FileNotFoundError:
        raise
    except OSError as exc:
        # ELOOP on Linux and macOS, EMLINK on FreeBSD: the last component is a symlink.
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise StoreError(
                f"{path} is a symbolic link; the model store writes only files it made itself:"
                " remove the link (and find out who planted it)", path=str(path)) from exc
        # ENXIO is a FIFO opened for writing with no reader.
        raise StoreError(f"cannot open {path} in the model store: {exc.strerror}",
                         path=str(path)) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise StoreError(
            f"{path} is not a plain file of the store (a device, FIFO or a hard link to another"
            " file): remove it", path=str(path))
    # A regular file: back to blocking I/O, which the writer and hasher threads rely on.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


class FileLock:
    """An exclusive ``fcntl.flock`` on a lock file, held for the ``with`` block.

    The lock file is never deleted: removing it while another process waits on it would
    let a third process lock a new inode and both would write.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> FileLock:
        fd = open_store_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("fetch_lock_wait", lock=str(self.path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def _writeback_starter() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), used with SYNC_FILE_RANGE_WRITE: start, don't wait."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _writeback_starter()
_SYNC_FILE_RANGE_WRITE = 2


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class _Part:
    """``<name>.part``, its running sha256, and where its bytes came from.

    Bytes land in one of ``IN_FLIGHT_BLOCKS`` reusable buffers: ``space()`` is the free end
    of the current one for a ``recv_into``/``readinto``, ``advance(n)`` accepts what was
    put there, ``append(chunk)`` copies a chunk in. A full buffer goes to a hasher thread,
    then to a writer thread, then back to the free list. hashlib and os.write release the
    GIL, so sha256, disk writes and receiving run at once on three buffers: with one
    thread doing both, hash plus write was the slowest stage and held the download to
    that rate. The fixed buffers bound memory and nothing is allocated per chunk.
    ``settle()`` waits for both threads; ``offset`` counts accepted bytes and equals the
    file's size once settled.

    ``<name>.part.json`` remembers the URL and validator (ETag or Last-Modified) of the
    response that produced the bytes, so a later process can resume with If-Range.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.offset = 0
        self.source_url: str | None = None
        self.validator: str | None = None
        self._hasher = hashlib.sha256()
        self._written_back = 0  # writeback has been started for the bytes before this
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(IN_FLIGHT_BLOCKS):
            self._free.put(bytearray(BLOCK_BYTES))
        self._block: bytearray | None = None  # the buffer being filled, `_filled` bytes so far
        self._filled = 0
        self._failure: OSError | None = None  # what the writer thread hit
        self._blocks: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._hashed: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._hasher_thread = threading.Thread(target=self._hash_blocks, name="fetch-hasher",
                                               daemon=True)
        self._writer = threading.Thread(target=self._write_blocks, name="fetch-writer",
                                        daemon=True)

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    @classmethod
    def open(cls, path: Path, size: int) -> _Part:
        part = cls(path, open_store_file(path, os.O_RDWR | os.O_CREAT))
        try:
            fd = open_store_file(part.meta_path, os.O_RDONLY)
        except FileNotFoundError:
            pass  # no record: resume without If-Range; the final sha256 still guards
        except BaseException:
            part.close()
            raise
        else:
            try:
                with os.fdopen(fd, "rb") as f:
                    meta = json.loads(f.read(64 << 10))
                part.source_url, part.validator = meta.get("url"), meta.get("validator")
            except (OSError, ValueError, AttributeError):
                pass  # unreadable record: as if there were none
        existing = os.fstat(part.fd).st_size
        if existing > size:
            part.reset()
        else:
            part._hash_existing(existing)
        part._hasher_thread.start()
        part._writer.start()
        return part

    def _hash_existing(self, length: int) -> None:
        os.lseek(self.fd, 0, os.SEEK_SET)
        remaining = length
        while remaining:
            chunk = os.read(self.fd, min(CHUNK_BYTES, remaining))
            if not chunk:
                break
            self._hasher.update(chunk)
            remaining -= len(chunk)
        self.offset = self._written_back = length - remaining
        os.ftruncate(self.fd, self.offset)
        os.lseek(self.fd, self.offset, os.SEEK_SET)

    def reset(self) -> None:
        """Drop every byte: the next one written is byte 0 of the file."""
        self._filled = 0
        self._blocks.join()
        self._hashed.join()
        self._failure = None
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.offset = self._written_back = 0
        self._hasher = hashlib.sha256()
        self.source_url = self.validator = None
        self.meta_path.unlink(missing_ok=True)

    def remember_source(self, url: str, validator: str | None) -> None:
        if (url, validator) == (self.source_url, self.validator):
            return
        self.source_url, self.validator = url, validator
        fd = open_store_file(self.meta_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"url": url, "validator": validator}))

    def space(self) -> memoryview:
        """The free end of the current buffer (waits for one while all are being written)."""
        if self._block is None:
            if self._failure is not None:
                raise self._failure
            self._block, self._filled = self._free.get(), 0
        return memoryview(self._block)[self._filled :]

    def advance(self, count: int) -> None:
        """Accept ``count`` bytes just put at the start of ``space()``."""
        self._filled += count
        self.offset += count
        if self._filled == BLOCK_BYTES:
            self._submit()

    def append(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            space = self.space()
            taken = min(len(space), len(view))
            space[:taken] = view[:taken]
            self.advance(taken)
            view = view[taken:]

    def _submit(self) -> None:
        if self._block is not None and self._filled:
            self._blocks.put((self._block, self._filled))
            self._block, self._filled = None, 0
        if self._failure is not None:
            raise self._failure

    def settle(self) -> None:
        """Wait until every accepted byte is written and hashed; raise what the writer hit."""
        self._submit()
        self._blocks.join()
        self._hashed.join()
        if self._failure is not None:
            raise self._failure

    def sha256(self) -> str:
        self.settle()
        return self._hasher.hexdigest()

    def _hash_blocks(self) -> None:
        while (item := self._blocks.get()) is not None:
            block, length = item
            self._hasher.update(memoryview(block)[:length])
            self._hashed.put(item)
            self._blocks.task_done()
        self._hashed.put(None)
        self._blocks.task_done()

    def _write_blocks(self) -> None:
        while (item := self._hashed.get()) is not None:
            block, length = item
            try:
                if self._failure is None:
                    self._write_block(memoryview(block)[:length])
            except OSError as exc:
                self._failure = exc
            finally:
                self._free.put(block)
                self._hashed.task_done()
        self._hashed.task_done()

    def _write_block(self, data: memoryview) -> None:
        while data:
            data = data[os.write(self.fd, data) :]
        written_to = os.lseek(self.fd, 0, os.SEEK_CUR)
        if _sync_file_range and written_to - self._written_back >= WRITEBACK_BYTES:
            # Advisory: a failure here resurfaces at the fsync, which is checked.
            _sync_file_range(self.fd, self._written_back, written_to - self._written_back,
                             _SYNC_FILE_RANGE_WRITE)
            self._written_back = written_to

    def install(self, dest: Path) -> None:
        self.settle()
        os.fsync(self.fd)
        self.close()
        os.replace(self.path, dest)
        self.meta_path.unlink(missing_ok=True)
        fsync_directory(dest.parent)

    def close(self) -> None:
        if self._writer.is_alive():
            self._block, self._filled = None, 0
            self._blocks.put(None)
            self._hasher_thread.join()
            self._writer.join()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)


def _validator(response: Response) -> str | None:
    """The If-Range value for the bytes of this response: a strong ETag, else Last-Modified."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


class Downloader:
    """Fetches one file, verified by size and sha256, from mirrors or a local file."""

    def __init__(self, config: FetchConfig | None = None, *,
                 transport: Transport | None = None) -> None:
        self.config = config or FetchConfig()
        self.transport = transport  # None: agent.fetch.http's real connections

    # ---- public -------------------------------------------------------------------

    def download(
        self,
        urls: list[str],
        dest: Path,
        *,
        size: int,
        sha256: str,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Put the file at ``dest``; returns ``dest``. Raises FetchError and subclasses."""
        if not urls:
            raise FetchError(f"{dest.name}: no URL to fetch it from", file=dest.name)
        sha256 = sha256.lower()
        with FileLock(dest.with_name(dest.name + ".lock")):
            if self._already_there(dest, size, sha256):
                return dest
            reporter = ProgressReporter(on_progress, file=dest.name, total=size)
            part = _Part.open(dest.with_name(dest.name + ".part"), size)
            try:
                self._check_free_space(dest, size - part.offset)
                failures = self._from_mirrors(urls, part, dest, size, sha256, reporter)
            except DiskFullError:
                # Before the start the part is kept for a later resume; a disk that filled
                # up midway has already had it removed (see _disk_full_midway).
                reporter.state("failed", part.offset, error="disk_full")
                if part.offset == 0:
                    part.discard()
                raise
            finally:
                part.close()
            if not failures:
                return dest
            if part.offset == 0 or any(f.mismatch for f in failures):
                part.discard()
            reporter.state("failed", part.offset)
            raise self._all_failed(dest.name, failures)

    def copy_local(
        self,
        source: Path,
        dest: Path,
        *,
        size: int,
        sha256: str,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Install a local file at ``dest`` after checking its size and sha256.

        A hard link when both are on one filesystem (no second copy of a large model),
        else a copy through ``<name>.part`` hashed on the way.
        """
        sha256 = sha256.lower()
        try:
            actual_size = source.stat().st_size
        except OSError as exc:
            raise FetchError(
                f"{dest.name}: cannot read {source}: {exc.strerror}", file=dest.name
            ) from exc
        if actual_size != size:
            raise ChecksumError(
                f"{source}: size {actual_size} bytes, the manifest says {size}",
                file=dest.name, expected_size=size, actual_size=actual_size,
            )
        with FileLock(dest.with_name(dest.name + ".lock")):
            if self._already_there(dest, size, sha256):
                return dest
            reporter = ProgressReporter(on_progress, file=dest.name, total=size)
            reporter.mirror = str(source)
            reporter.state("starting", 0)
            if not self._link_verified(source, dest, sha256):
                self._copy_through_part(source, dest, size, sha256, reporter)
            reporter.state("complete", size)
            log.info("fetch_complete", file=dest.name, mirror=str(source), size=size)
            return dest

    # ---- internals ----------------------------------------------------------------

    def _already_there(self, dest: Path, size: int, sha256: str) -> bool:
        """True when another process (or an earlier run) already installed the file."""
        try:
            if dest.stat().st_size == size and sha256_of(dest) == sha256:
                log.info("fetch_already_installed", file=dest.name)
                return True
        except FileNotFoundError:
            return False
        log.warning("fetch_replacing_damaged_file", file=dest.name)
        dest.unlink()
        return False

    def _link_verified(self, source: Path, dest: Path, sha256: str) -> bool:
        """Hard-link ``source`` to ``dest`` after checking its sha256; False where the
        filesystem cannot (another device, no hard links), so the caller copies instead."""
        if source.stat().st_dev != dest.parent.stat().st_dev:
            return False
        self._check_sha256(source, sha256, dest.name)
        try:
            os.link(source, dest)
        except OSError as exc:
            log.info("fetch_link_unavailable", file=dest.name, error=exc.strerror)
            return False
        fsync_directory(dest.parent)
        return True

    def _check_sha256(self, path: Path, sha256: str, name: str) -> None:
        actual = sha256_of(path)
        if actual != sha256:
            raise ChecksumError(
                f"{path}: sha256 {actual}, the manifest says {sha256}",
                file=name, expected_sha256=sha256, actual_sha256=actual,
            )

    def _copy_through_part(
        self, source: Path, dest: Path, size: int, sha256: str, reporter: ProgressReporter
    ) -> None:
        self._check_free_space(dest, size)
        part = _Part.open(dest.with_name(dest.name + ".part"), size)
        try:
            part.reset()
            with open(source, "rb", buffering=0) as src:
                while count := src.readinto(part.space()):
                    part.advance(count)
                    reporter.advance(part.offset)
            actual = part.sha256()
            if part.offset != size or actual != sha256:
                part.discard()
                raise ChecksumError(
                    f"{source}: sha256 {actual}, the manifest says {sha256}",
                    file=dest.name, expected_sha256=sha256, actual_sha256=actual,
                )
            part.install(dest)
        except OSError as exc:
            part.discard()
            if _is_disk_full(exc):
                raise self._disk_full_midway(dest.name, exc) from exc
            raise FetchError(f"{dest.name}: copy failed: {exc}", file=dest.name) from exc
        finally:
            part.close()

    def _install(self, part: _Part, dest: Path) -> None:
        try:
            part.install(dest)
        except OSError as exc:  # the fsync is where a delayed-allocation ENOSPC shows up
            if _is_disk_full(exc):
                raise self._disk_full_midway(dest.name, exc) from exc
            raise FetchError(
                f"{dest.name}: cannot install {part.path}: {exc.strerror}", file=dest.name
            ) from exc

    def _check_free_space(self, dest: Path, remaining: int) -> None:
        needed = remaining + self.config.disk_margin_bytes
        free = shutil.disk_usage(dest.parent).free
        if free < needed:
            raise DiskFullError(
                f"{dest.name}: needs {remaining} bytes plus a {self.config.disk_margin_bytes}-byte"
                f" margin on {dest.parent}, only {free} free; free some space or lower"
                " fetch.disk_margin_bytes",
                file=dest.name, needed_bytes=needed, free_bytes=free,
            )

    def _disk_full_midway(self, name: str, exc: OSError) -> DiskFullError:
        # The part is deleted, not kept for a resume: a device whose disk is full stops
        # writing its logs and state, and the bytes are cheap to fetch again.
        return DiskFullError(
            f"{name}: the disk filled up during the download ({exc.strerror}); the partial"
            " file was removed",
            file=name,
        )

    def _backoff_s(self, attempt: int) -> float:
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)

    def _from_mirrors(
        self,
        urls: list[str],
        part: _Part,
        dest: Path,
        size: int,
        sha256: str,
        reporter: ProgressReporter,
    ) -> list[MirrorFailure]:
        """Try each mirror in turn; an empty list means the file is installed at ``dest``."""
        failures: list[MirrorFailure] = []
        client = HttpClient(
            Timeouts(connect_s=self.config.connect_timeout_s, read_s=self.config.read_timeout_s),
            transport=self.transport,
        )
        for url in urls:
            reporter.mirror = url
            try:
                failure = self._from_mirror(client, url, part, size, sha256, reporter)
                if failure is None:
                    self._install(part, dest)
            except DiskFullError:
                part.discard()
                raise
            if failure is None:
                reporter.state("complete", size)
                log.info("fetch_complete", file=dest.name, mirror=url, size=size)
                return []
            failures.append(failure)
            log.warning("fetch_mirror_failed", file=dest.name, mirror=url,
                        reason=failure.reason)
        return failures

    def _from_mirror(
        self,
        client: HttpClient,
        url: str,
        part: _Part,
        size: int,
        sha256: str,
        reporter: ProgressReporter,
    ) -> MirrorFailure | None:
        """Fetch from one mirror with retries; None when the part is complete and verified."""
        attempt = 0
        reporter.state("starting", part.offset)
        while True:
            before = part.offset
            try:
                self._attempt(client, url, part, size, reporter)
                break
            except _Transient as exc:
                # Progress made in this attempt resets the count: a link that drops every
                # few megabytes still finishes, a dead one gives up after `retries`.
                attempt = 1 if part.offset > before else attempt + 1
                if attempt > self.config.retries:
                    return MirrorFailure(
                        url, f"{exc.reason} (after {attempt} attempts)", offline=exc.connect
                    )
                delay = self._backoff_s(attempt)
                log.info("fetch_retry", file=part.path.name, mirror=url, attempt=attempt,
                         delay_s=round(delay, 3), reason=exc.reason, have_bytes=part.offset)
                reporter.state("retrying", part.offset, attempt=attempt, error=exc.reason)
                time.sleep(delay)
                reporter.restart_window()
            except _MirrorRejected as exc:
                if exc.mismatch:
                    part.reset()
                return MirrorFailure(url, exc.reason, mismatch=exc.mismatch)
            except OSError as exc:
                if _is_disk_full(exc):
                    raise self._disk_full_midway(part.path.name, exc) from exc
                raise FetchError(
                    f"{part.path.name}: cannot write {part.path}: {exc.strerror}",
                    file=part.path.name,
                ) from exc
        reporter.state("verifying", part.offset)
        actual = part.sha256()
        if part.offset != size or actual != sha256:
            part.reset()
            return MirrorFailure(
                url, f"sha256 {actual}, the manifest says {sha256}", mismatch=True
            )
        return None

    def _attempt(
        self, client: HttpClient, url: str, part: _Part, size: int, reporter: ProgressReporter
    ) -> None:
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
                self._accept(response, url, part, size)
                self._receive_body(response, part, size, reporter)
        except ConnectFailed as exc:
            raise _Transient(str(exc), connect=True) from exc
        except UnsupportedURL as exc:
            raise _MirrorRejected(str(exc)) from exc
        except HttpError as exc:
            raise _Transient(str(exc)) from exc
        finally:
            part.settle()  # what is on disk is what the next attempt resumes from
        if part.offset < size:
            raise _Transient(f"connection closed at byte {part.offset} of {size}")

    def _receive_body(
        self, response: Response, part: _Part, size: int, reporter: ProgressReporter
    ) -> None:
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
            raise _MirrorRejected(f"sent more than the manifest's {size} bytes", mismatch=True)

    def _accept(self, response: Response, url: str, part: _Part, size: int) -> None:
        """Check the status and headers; reset the part when the body starts at byte 0."""
        status = response.status
        if status >= 500 or status in _RETRYABLE_CLIENT_STATUS:
            raise _Transient(f"HTTP {status}")
        if status == 416:
            # Our part does not fit the file the mirror has: start over from byte 0.
            part.reset()
            raise _Transient("HTTP 416 (range not satisfiable), restarting from byte 0")
        if status not in (200, 206):
            raise _MirrorRejected(f"HTTP {status}")
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != part.offset:
                part.reset()
                raise _Transient(
                    f"206 with Content-Range {response.headers.get('Content-Range')!r} for"
                    f" bytes={part.offset}-, restarting from byte 0"
                )
            if match.group(3) != "*" and int(match.group(3)) != size:
                raise _MirrorRejected(
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
                raise _MirrorRejected(
                    f"file is {length} bytes, the manifest says {size}", mismatch=True
                )
        part.remember_source(url, _validator(response))

    def _all_failed(self, name: str, failures: list[MirrorFailure]) -> FetchError:
        listing = "; ".join(f"{f.url}: {f.reason}" for f in failures)
        details = {
            "file": name,
            "mirrors": [{"url": f.url, "reason": f.reason} for f in failures],
            "offline": all(f.offline for f in failures),
        }
        if any(f.mismatch for f in failures):
            return ChecksumError(
                f"{name}: no mirror served the file the manifest describes ({listing})",
                **details,
            )
        return FetchError(f"{name}: every mirror failed ({listing})", **details)
