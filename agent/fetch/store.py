"""The on-disk model store: which verified model files this device has, and which to keep.

``ModelStore.ensure(selection)`` returns the path of the selected file, fetching it first
when the store does not have it (from the variant's URLs, else from next to the manifest:
the same URL prefix, or the manifest's own directory for a local manifest), and marks it the
``current`` model; the one before becomes ``previous``. Those two are always kept, so a
rollback never needs the network; others are evicted, least recently used first, beyond the
size budget or when the disk cannot take a new model (agent/fetch/store_space.py). What the
store has is recorded in its index (agent/fetch/store_index.py), changed under a lock, so two
agents sharing a store do not lose each other's records.

The store root is checked when a store is opened (so the daemon refuses to start on one that
others can write) and before each fetch, and every file the store writes is opened as
agent/fetch/store_files.py says: never through a symlink or hard link planted there.

A split variant (llama.cpp's ``<name>-00001-of-0000N.gguf`` parts) is one entry of the index:
every part is downloaded (each resumable and verified by the downloader), the first part
last, so the path the worker is given appears only once all the others are verified beside
it, under the names llama.cpp opens; the record is written after that. Eviction, the
disk-space check, moving an older version aside and "is it here" all take the set whole.

A file already in the store is used without touching the network. When every mirror is
unreachable the error says so (``offline``) and lists what the store still has.

This module must not choose variants (agent.catalog.select does) nor talk HTTP itself
(agent.fetch.downloader does).
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

from agent.catalog.gguf import split_name, split_part_name
from agent.catalog.selection import Selection, SelectionPart
from agent.config import FetchConfig
from agent.errors import FetchError, ManifestError
from agent.fetch.downloader import Downloader
from agent.fetch.progress import ProgressCallback, ProgressReporter
from agent.fetch.store_files import bare_file_name, check_store_root
from agent.fetch.store_index import IndexFile, StoredModel, StoredPart
from agent.fetch.store_space import StoreSpace
from agent.log import get_logger

__all__ = ["ModelStore", "StoredModel"]

log = get_logger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelStore:
    """Verified model files under ``root``, keeping the current and previous model."""

    def __init__(
        self,
        root: Path | str,
        *,
        budget_bytes: int | None = None,
        fetch: FetchConfig | None = None,
    ) -> None:
        self.root = Path(root)
        self.fetch_config = fetch or FetchConfig()
        self._index_file = IndexFile(self.root)
        self._space = StoreSpace(
            self.root, self._index_file,
            # None keeps only the current and previous model.
            budget_bytes=(budget_bytes if budget_bytes is not None
                          else self.fetch_config.store_budget_bytes),
            margin_bytes=self.fetch_config.disk_margin_bytes,
        )
        self._downloader = Downloader(self.fetch_config)
        self.check_root()

    # ---- public -------------------------------------------------------------------

    def find(self, sha256: str, parts: list[SelectionPart] | None = None) -> Path | None:
        """The stored file with this sha256 (a split's first part, with every other part
        beside it; when ``parts`` are given, exactly those), or None."""
        record = self._index_file.read().record(sha256.lower())
        if record is None or parts is not None and [
            (p.file, p.sha256, p.size) for p in record.parts
        ] != [(p.file, p.sha256.lower(), p.size) for p in parts]:
            return None
        return record.installed_path(self.root)

    def models(self) -> list[StoredModel]:
        return list(self._index_file.read().models)

    def ensure(self, selection: Selection, on_progress: ProgressCallback | None = None) -> Path:
        """The local path of the selected file, fetched and verified if it is not here yet.

        Marks it the current model (the old current becomes the previous one) and evicts
        what the budget does not keep. Raises FetchError, ChecksumError, DiskFullError.
        """
        name = bare_file_name(selection.file)
        sha256 = selection.sha256.lower()
        if not _SHA256.fullmatch(sha256):
            raise ManifestError(f"{name}: sha256 must be 64 hex characters", file=name)
        self.check_root()

        parts = _checked_parts(selection, name, sha256)

        cached = self.find(sha256, parts)
        if cached is not None:
            log.info("fetch_cached", file=cached.name, sha256=sha256)
            ProgressReporter(on_progress, file=name, total=selection.size).state(
                "cached", selection.size
            )
            self._mark_current(sha256, name, selection.size, parts)
            return cached

        self._move_aside_other_version(name, sha256)
        # The first part last: the path the worker is given exists only once the parts
        # llama.cpp will open beside it are all in place and verified.
        files = parts[1:] + parts[:1] or [
            SelectionPart(file=name, size=selection.size, sha256=sha256, urls=list(selection.urls))]
        self._space.make_room(name, files)
        for file in files:
            self._fetch_file(selection, file, on_progress)
        self._mark_current(sha256, name, selection.size, parts)
        return self.root / name

    def check_root(self) -> None:
        """Make the root if it is missing; raise StoreError unless it is a directory, not a
        symlink, owned by this user and writable by nobody else."""
        check_store_root(self.root)

    # ---- fetching -----------------------------------------------------------------

    def _fetch_file(self, selection: Selection, file: SelectionPart,
                    on_progress: ProgressCallback | None) -> None:
        dest = self.root / file.file
        source = self._source(selection, file.file, file.urls)
        try:
            if isinstance(source, Path):
                self._downloader.copy_local(
                    source, dest, size=file.size, sha256=file.sha256, on_progress=on_progress
                )
            else:
                self._downloader.download(
                    source, dest, size=file.size, sha256=file.sha256, on_progress=on_progress
                )
        except FetchError as exc:
            if exc.details.get("offline"):
                raise self._offline_error(exc) from exc
            raise

    # ---- sources ------------------------------------------------------------------

    def _source(self, selection: Selection, name: str, urls: list[str]) -> list[str] | Path:
        """The file's URLs, else the file next to the manifest (URL or local path)."""
        if urls:
            return list(urls)
        manifest = selection.manifest_url
        if not manifest:
            raise FetchError(
                f"{name}: the variant has no urls and the manifest's location is unknown",
                file=name,
            )
        scheme = urllib.parse.urlsplit(manifest).scheme.lower()
        if scheme in ("http", "https"):
            return [urllib.parse.urljoin(manifest, urllib.parse.quote(name))]
        if scheme == "file":
            manifest = urllib.request.url2pathname(urllib.parse.urlsplit(manifest).path)
        return Path(manifest).resolve().parent / name

    # ---- index --------------------------------------------------------------------

    def _mark_current(self, sha256: str, name: str, size: int,
                      parts: list[SelectionPart] | None = None) -> None:
        stored_parts = [StoredPart(file=p.file, sha256=p.sha256, size=p.size) for p in parts or []]
        with self._index_file.lock():
            index = self._index_file.read()
            now = time.time()
            record = index.record(sha256)
            if record is not None and record.parts != stored_parts:
                index.models.remove(record)  # another set with this first part: replaced
                record = None
            if record is None:
                index.models.append(
                    StoredModel(file=name, sha256=sha256, size=size, installed_at=now,
                                last_used_at=now, parts=stored_parts)
                )
            else:
                record.last_used_at = now
            if index.current != sha256:
                index.previous, index.current = index.current, sha256
            self._space.prune(index)
            self._index_file.write(index)

    def _move_aside_other_version(self, name: str, sha256: str) -> None:
        """Keep an older file of the same name (maybe the rollback target) under a new name;
        an older split set moves whole, to names llama.cpp still finds beside each other."""
        with self._index_file.lock():
            index = self._index_file.read()
            other = next((m for m in index.models if m.file == name and m.sha256 != sha256), None)
            if other is None or not (self.root / name).exists():
                return
            named = split_name(name) if other.parts else None
            if named is None:
                aside = f"{name}.{other.sha256[:16]}"
                os.replace(self.root / name, self.root / aside)
                other.file = aside
            else:
                prefix = f"{named[0]}.{other.sha256[:16]}"
                for number, part in enumerate(other.parts, start=1):
                    moved = split_part_name(prefix, number, len(other.parts))
                    if (self.root / part.file).exists():
                        os.replace(self.root / part.file, self.root / moved)
                    part.file = moved
                aside = other.file = other.parts[0].file
            log.info("fetch_store_moved_aside", file=name, to=aside, sha256=other.sha256)
            self._index_file.write(index)

    def _offline_error(self, exc: FetchError) -> FetchError:
        index = self._index_file.read()
        cached: list[dict[str, Any]] = [
            {"file": m.file, "sha256": m.sha256, "current": m.sha256 == index.current}
            for m in index.models
            if m.installed_path(self.root) is not None
        ]
        have = ", ".join(c["file"] for c in cached) or "nothing"
        log.warning("fetch_offline", file=exc.details.get("file"), cached=cached)
        return FetchError(
            f"{exc.message}; no mirror could be reached (offline?) and the store has {have}",
            **{**exc.details, "cached": cached},
        )


def _checked_parts(selection: Selection, name: str, sha256: str) -> list[SelectionPart]:
    """A split selection's parts, checked to be the set the manifest rules describe (the
    manifest checked them too: a Selection may come from elsewhere, e.g. a cmd)."""
    if not selection.parts:
        return []
    parts = [msgspec.structs.replace(p, sha256=p.sha256.lower()) for p in selection.parts]
    named = split_name(name)
    expected = [split_part_name(named[0], n, len(parts)) for n in range(1, len(parts) + 1)] \
        if named else []
    if [bare_file_name(p.file) for p in parts] != expected or parts[0].sha256 != sha256 or \
            sum(p.size for p in parts) != selection.size or \
            not all(_SHA256.fullmatch(p.sha256) for p in parts):
        raise ManifestError(
            f"{name}: the split's parts are not one set named <name>-0000i-of-0000N.gguf "
            "whose first part is the variant's file and sha256 and whose sizes add up",
            file=name)
    return parts
