"""The on-disk model store: which verified model files this device has, and which to keep.

``ModelStore.ensure(selection)`` returns the path of the selected file, fetching it first
when the store does not have it (from the variant's URLs, else from next to the manifest:
the same URL prefix, or the manifest's own directory for a local manifest). A small JSON
index in the store root records each file's sha256 and size, the ``current`` model (the
last one ensured) and the ``previous`` one; those two are always kept, so a rollback never
needs the network, and other files are evicted, least recently used first, beyond the
size budget. The index is rewritten atomically under a lock, so two agents sharing a
store do not lose each other's records.

The store root must be a real directory (not a symlink) owned by the user running the
store and not writable by group or others, checked when a store is opened (so the daemon
refuses to start on one) and before each fetch: whoever else can write there could plant
a symlink for a root-run fetch to truncate its target, or swap a verified model for their
own. Files the store writes are opened with ``O_NOFOLLOW`` (downloader.open_store_file);
the index is replaced by agent.atomic_file.atomic_write, whose temporary is made
fresh with ``O_EXCL``.

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
import shutil
import stat
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

from agent.atomic_file import atomic_write
from agent.catalog.gguf import split_name, split_part_name
from agent.catalog.selection import Selection, SelectionPart
from agent.config import FetchConfig
from agent.errors import DiskFullError, FetchError, ManifestError, StoreError
from agent.fetch.downloader import Downloader, FileLock
from agent.fetch.progress import ProgressCallback, ProgressReporter
from agent.log import get_logger

log = get_logger(__name__)

INDEX_NAME = "index.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


class StoreIndex(msgspec.Struct, kw_only=True):
    schema: int = 1
    models: list[StoredModel] = []
    current: str | None = None  # sha256 of the model last ensured
    previous: str | None = None  # sha256 of the one before it: the rollback target


def bare_file_name(name: str) -> str:
    """``name`` if it is a plain file name; the store never writes outside its root."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name.startswith(".")
        or name.endswith((".part", ".lock", ".json"))
    ):
        raise ManifestError(
            f"file {name!r}: must be a bare file name (no path, no leading dot, not ending in"
            " .part, .lock or .json, which the store uses itself)",
            file=name,
        )
    return name


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
        # None keeps only the current and previous model.
        self.budget_bytes = (
            budget_bytes if budget_bytes is not None else self.fetch_config.store_budget_bytes
        )
        self._downloader = Downloader(self.fetch_config)
        self.check_root()

    # ---- public -------------------------------------------------------------------

    def find(self, sha256: str, parts: list[SelectionPart] | None = None) -> Path | None:
        """The stored file with this sha256 (a split's first part, with every other part
        beside it; when ``parts`` are given, exactly those), or None."""
        record = self._record(self._read_index(), sha256.lower())
        if record is not None and parts is not None and [
            (p.file, p.sha256, p.size) for p in record.parts
        ] != [(p.file, p.sha256.lower(), p.size) for p in parts]:
            return None
        return self._usable(record)

    def models(self) -> list[StoredModel]:
        return list(self._read_index().models)

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

        parts = self._checked_parts(selection, name, sha256)

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
        self._make_room(name, self._bytes_missing(files))
        for file in files:
            self._fetch_file(selection, file, on_progress)
        self._mark_current(sha256, name, selection.size, parts)
        return self.root / name

    def check_root(self) -> None:
        """Make the root if it is missing; raise StoreError unless it is a directory, not a
        symlink, owned by this user and writable by nobody else."""
        try:
            info = os.lstat(self.root)
        except FileNotFoundError:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            try:
                # An explicit mode, not the default 0o777: under a umask of 002 that would be
                # group-writable, and then refused below.
                os.mkdir(self.root, 0o755)
            except FileExistsError:
                pass  # another process made it first; checked below like any other
            info = os.lstat(self.root)
        where = str(self.root)
        if stat.S_ISLNK(info.st_mode):
            raise StoreError(
                f"model store {where} is a symbolic link: point cache_dir at the real"
                " directory", path=where)
        if not stat.S_ISDIR(info.st_mode):
            raise StoreError(f"model store {where} is not a directory", path=where)
        uid = os.geteuid()
        if info.st_uid != uid:
            raise StoreError(
                f"model store {where} belongs to uid {info.st_uid}, not to this user (uid"
                f" {uid}): run as its owner (sudo -u <owner> edge-agent ...) or use another"
                " cache_dir", path=where, owner=info.st_uid, uid=uid)
        if info.st_mode & 0o022:
            raise StoreError(
                f"model store {where} is writable by group or others (mode"
                f" {stat.S_IMODE(info.st_mode):04o}): chmod go-w {where}",
                path=where, mode=f"{stat.S_IMODE(info.st_mode):04o}")

    # ---- fetching -----------------------------------------------------------------

    @staticmethod
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

    def _bytes_missing(self, parts: list[SelectionPart]) -> int:
        """What the disk must still take for these files: a part already in place costs
        nothing, a partial download only what it lacks."""
        missing = 0
        for part in parts:
            have = 0
            # In place whole, or a partial download of at most the size (what it resumes).
            for path, whole in ((self.root / part.file, True),
                                (self.root / f"{part.file}.part", False)):
                try:
                    info = path.lstat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode) and (
                        info.st_size == part.size if whole else info.st_size <= part.size):
                    have = info.st_size
                    break
            missing += part.size - have
        return missing

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

    @property
    def _index_path(self) -> Path:
        return self.root / INDEX_NAME

    def _read_index(self) -> StoreIndex:
        try:
            return msgspec.json.decode(self._index_path.read_bytes(), type=StoreIndex)
        except FileNotFoundError:
            return StoreIndex()
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Files stay on disk; the downloader re-adopts one by hash when it is ensured.
            log.warning("fetch_store_index_unreadable", path=str(self._index_path), error=str(exc))
            return StoreIndex()

    def _write_index(self, index: StoreIndex) -> None:
        atomic_write(self._index_path, msgspec.json.format(msgspec.json.encode(index)))

    def _index_lock(self) -> FileLock:
        return FileLock(self.root / f".{INDEX_NAME}.lock")

    @staticmethod
    def _record(index: StoreIndex, sha256: str) -> StoredModel | None:
        return next((m for m in index.models if m.sha256 == sha256), None)

    def _usable(self, record: StoredModel | None) -> Path | None:
        """The record's (first) file when it and every other part of it are in place."""
        if record is None:
            return None
        for file in record.files():
            try:
                # lstat: a symlink put in place of a verified file is not that file.
                info = (self.root / file.file).lstat()
            except FileNotFoundError:
                return None
            if not stat.S_ISREG(info.st_mode) or info.st_size != file.size:
                return None
        return self.root / record.file

    def _mark_current(self, sha256: str, name: str, size: int,
                      parts: list[SelectionPart] | None = None) -> None:
        stored_parts = [StoredPart(file=p.file, sha256=p.sha256, size=p.size) for p in parts or []]
        with self._index_lock():
            index = self._read_index()
            now = time.time()
            record = self._record(index, sha256)
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
            self._evict(index, keep={index.current, index.previous}, budget=self.budget_bytes)
            self._write_index(index)

    def _move_aside_other_version(self, name: str, sha256: str) -> None:
        """Keep an older file of the same name (maybe the rollback target) under a new name;
        an older split set moves whole, to names llama.cpp still finds beside each other."""
        with self._index_lock():
            index = self._read_index()
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
            self._write_index(index)

    def _make_room(self, name: str, size: int) -> None:
        """Evict unprotected models when the disk cannot take ``size`` (every file of the
        variant still to come) plus the margin; DiskFullError when even that is not enough,
        before a byte is written: a split whose last part cannot fit is not started."""
        needed = size + self.fetch_config.disk_margin_bytes
        if shutil.disk_usage(self.root).free < needed:
            self._evict_for_space(needed)
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise DiskFullError(
                f"{name}: needs {size} bytes plus a {self.fetch_config.disk_margin_bytes}-byte"
                f" margin on {self.root}, only {free} free; free some space or lower"
                " fetch.disk_margin_bytes",
                file=name, needed_bytes=needed, free_bytes=free,
            )

    def _evict_for_space(self, needed: int) -> None:
        with self._index_lock():
            index = self._read_index()
            keep = {index.current, index.previous}
            for victim in sorted(
                (m for m in index.models if m.sha256 not in keep), key=lambda m: m.last_used_at
            ):
                if shutil.disk_usage(self.root).free >= needed:
                    break
                self._remove(index, victim, reason="disk_space")
            self._write_index(index)

    def _evict(self, index: StoreIndex, *, keep: set[str | None], budget: int | None) -> None:
        """Drop records whose file is gone, then the least recently used beyond the budget."""
        for record in [m for m in index.models if self._usable(m) is None]:
            index.models.remove(record)
        for victim in sorted(
            (m for m in index.models if m.sha256 not in keep), key=lambda m: m.last_used_at
        ):
            total = sum(m.size for m in index.models)
            if budget is not None and total <= budget:
                break
            self._remove(index, victim, reason="budget")

    def _remove(self, index: StoreIndex, record: StoredModel, *, reason: str) -> None:
        # A worker that still has the file mmapped keeps its pages: unlink is safe on Linux.
        for file in record.files():
            (self.root / file.file).unlink(missing_ok=True)
        index.models.remove(record)
        log.info("fetch_store_evicted", file=record.file, sha256=record.sha256, reason=reason,
                 size=record.size)

    def _offline_error(self, exc: FetchError) -> FetchError:
        index = self._read_index()
        cached: list[dict[str, Any]] = [
            {"file": m.file, "sha256": m.sha256, "current": m.sha256 == index.current}
            for m in index.models
            if self._usable(m) is not None
        ]
        have = ", ".join(c["file"] for c in cached) or "nothing"
        log.warning("fetch_offline", file=exc.details.get("file"), cached=cached)
        return FetchError(
            f"{exc.message}; no mirror could be reached (offline?) and the store has {have}",
            **{**exc.details, "cached": cached},
        )
