"""What the model store may hold, and which models go when it cannot hold more.

Two limits: the size budget (``fetch.store_budget_bytes``; None keeps only the current and
previous model) and the disk's free space, which must take every file of a variant still to
come plus ``fetch.disk_margin_bytes`` before a byte of it is written. Either evicts the least
recently used models first; the current and previous model are always kept, so a rollback
never needs the network. A split set counts, and goes, whole.

This module must not fetch, nor decide which model is current (agent/fetch/store.py does).
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

from agent.catalog.selection import SelectionPart
from agent.fetch.disk_space import require_free_space
from agent.fetch.store_index import IndexFile, StoredModel, StoreIndex
from agent.log import get_logger

log = get_logger(__name__)


class StoreSpace:
    """Eviction for the store under ``root``, by its budget and by the disk's free space."""

    def __init__(self, root: Path, index_file: IndexFile, *, budget_bytes: int | None,
                 margin_bytes: int) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.margin_bytes = margin_bytes
        self._index_file = index_file

    def make_room(self, name: str, files: list[SelectionPart]) -> None:
        """Evict unprotected models when the disk cannot take ``files`` (every file of the
        variant still to come) plus the margin; DiskFullError when even that is not enough,
        before a byte is written: a split whose last part cannot fit is not started."""
        size = self._bytes_missing(files)
        needed = size + self.margin_bytes
        if shutil.disk_usage(self.root).free < needed:
            self._evict_for_space(needed)
        require_free_space(name, self.root, size, self.margin_bytes)

    def prune(self, index: StoreIndex) -> None:
        """Drop records whose file is gone, then the least recently used beyond the budget.
        The caller holds the index lock and writes ``index`` afterwards."""
        for record in [m for m in index.models if m.installed_path(self.root) is None]:
            index.models.remove(record)
        for victim in _eviction_order(index):
            total = sum(m.size for m in index.models)
            if self.budget_bytes is not None and total <= self.budget_bytes:
                break
            self._remove(index, victim, reason="budget")

    def _bytes_missing(self, files: list[SelectionPart]) -> int:
        """What the disk must still take for these files: a file already in place costs
        nothing, a partial download only what it lacks."""
        missing = 0
        for file in files:
            have = 0
            # In place whole, or a partial download of at most the size (what it resumes).
            for path, whole in ((self.root / file.file, True),
                                (self.root / f"{file.file}.part", False)):
                try:
                    info = path.lstat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode) and (
                        info.st_size == file.size if whole else info.st_size <= file.size):
                    have = info.st_size
                    break
            missing += file.size - have
        return missing

    def _evict_for_space(self, needed: int) -> None:
        with self._index_file.lock():
            index = self._index_file.read()
            for victim in _eviction_order(index):
                if shutil.disk_usage(self.root).free >= needed:
                    break
                self._remove(index, victim, reason="disk_space")
            self._index_file.write(index)

    def _remove(self, index: StoreIndex, record: StoredModel, *, reason: str) -> None:
        # A worker that still has the file mmapped keeps its pages: unlink is safe on Linux.
        for file in record.files():
            (self.root / file.file).unlink(missing_ok=True)
        index.models.remove(record)
        log.info("fetch_store_evicted", file=record.file, sha256=record.sha256, reason=reason,
                 size=record.size)


def _eviction_order(index: StoreIndex) -> list[StoredModel]:
    """The models that may go, least recently used first: never the current or previous."""
    keep = {index.current, index.previous}
    return sorted((m for m in index.models if m.sha256 not in keep), key=lambda m: m.last_used_at)
