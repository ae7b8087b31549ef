"""The model store's index: ``index.json`` in the store root, recording each verified
model's files, sha256 and size, the ``current`` model (the last one ensured) and the
``previous`` one.

Whoever changes the index holds ``lock()`` from the read to the write, so two agents sharing
a store do not lose each other's records; the file is replaced by
agent.atomic_file.atomic_write (a fresh ``O_EXCL`` temporary, fsynced, renamed). An index
that cannot be read counts as empty: the files stay on disk and are adopted again by hash
when they are ensured.

This module must not decide what to keep (agent/fetch/store_space.py evicts) nor fetch.
"""

from __future__ import annotations

import stat
from pathlib import Path

import msgspec

from agent.atomic_file import atomic_write
from agent.fetch.store_files import FileLock
from agent.log import get_logger

log = get_logger(__name__)

INDEX_NAME = "index.json"


class StoredPart(msgspec.Struct, kw_only=True):
    file: str
    sha256: str
    size: int


class StoredModel(msgspec.Struct, kw_only=True):
    file: str  # name inside the store root (a split's first part)
    sha256: str  # a split's first part's
    size: int  # a split's parts together
    installed_at: float
    last_used_at: float
    parts: list[StoredPart] = []  # a split's files in order; empty for one file

    def files(self) -> list[StoredPart]:
        return list(self.parts) or [StoredPart(file=self.file, sha256=self.sha256, size=self.size)]

    def installed_path(self, root: Path) -> Path | None:
        """The (first) file under ``root`` when it and every other part are in place."""
        for file in self.files():
            try:
                # lstat: a symlink put in place of a verified file is not that file.
                info = (root / file.file).lstat()
            except FileNotFoundError:
                return None
            if not stat.S_ISREG(info.st_mode) or info.st_size != file.size:
                return None
        return root / self.file


class StoreIndex(msgspec.Struct, kw_only=True):
    schema: int = 1
    models: list[StoredModel] = []
    current: str | None = None  # sha256 of the model last ensured
    previous: str | None = None  # sha256 of the one before it: the rollback target

    def record(self, sha256: str) -> StoredModel | None:
        return next((m for m in self.models if m.sha256 == sha256), None)


class IndexFile:
    """``index.json`` in ``root`` and the lock that serialises its read-modify-write."""

    def __init__(self, root: Path) -> None:
        self.path = root / INDEX_NAME
        self._lock_path = root / f".{INDEX_NAME}.lock"

    def read(self) -> StoreIndex:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=StoreIndex)
        except FileNotFoundError:
            return StoreIndex()
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Files stay on disk; the downloader re-adopts one by hash when it is ensured.
            log.warning("fetch_store_index_unreadable", path=str(self.path), error=str(exc))
            return StoreIndex()

    def write(self, index: StoreIndex) -> None:
        atomic_write(self.path, msgspec.json.format(msgspec.json.encode(index)))

    def lock(self) -> FileLock:
        return FileLock(self._lock_path)
