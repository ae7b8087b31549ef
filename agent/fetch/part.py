"""``<name>.part``: the bytes of a download or copy on their way to the store, hashed as
they are written.

The body is received into reusable 1 MiB buffers (agent/fetch/http.py reads the socket into
them), so nothing is allocated per chunk; a hasher and a writer thread, beside the receive
loop, compute sha256 and write each buffer. A resumed download hashes the bytes it already
has first. Only ``install`` fsyncs and renames the part into place, so the target path either
does not exist or holds what was installed.

This module must not decide whether the bytes are right (the downloader compares size and
sha256) nor speak HTTP.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Callable

from agent.atomic_file import fsync_directory
from agent.fetch.store_files import CHUNK_BYTES, open_store_file

# The body is received into reusable buffers of this size, each hashed and written as one
# piece: a hand-over per MiB instead of per 64 KiB socket read. IN_FLIGHT_BLOCKS of them
# bound memory and what a kill loses (bytes received but not yet on disk).
BLOCK_BYTES = 1 << 20
IN_FLIGHT_BLOCKS = 4
# Ask the kernel to start writing each this many new bytes to disk while the download
# goes on, so the fsync before the rename has little left to do instead of a whole model.
WRITEBACK_BYTES = 8 << 20


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


class PartFile:
    """``<name>.part``, its running sha256, and where its bytes came from.

    Bytes land in one of ``IN_FLIGHT_BLOCKS`` reusable buffers: ``space()`` is the free end
    of the current one for a ``recv_into``/``readinto``, ``advance(n)`` accepts what was
    put there. A full buffer goes to a hasher thread, then to a writer thread, then back to
    the free list. hashlib and os.write release the GIL, so sha256, disk writes and
    receiving run at once on three buffers: with one thread doing both, hash plus write was
    the slowest stage and held the download to that rate. The fixed buffers bound memory
    and nothing is allocated per chunk.
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
    def open(cls, path: Path, size: int) -> PartFile:
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

