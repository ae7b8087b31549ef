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
index temporaries are made fresh with ``O_EXCL``.

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

from agent.catalog.selection import Selection
from agent.config import FetchConfig
from agent.errors import FetchError, ManifestError, StoreError
from agent.fetch.downloader import Downloader, FileLock, fsync_directory, open_store_file
from agent.fetch.progress import ProgressCallback, ProgressReporter
from agent.log import get_logger

log = get_logger(__name__)

INDEX_NAME = "index.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class StoredModel(msgspec.Struct, kw_only=True):
    file: str  # name inside the store root
    sha256: str
    size: int
    installed_at: float
    last_used_at: float


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

    def find(self, sha256: str) -> Path | None:
        """The stored file with this sha256, or None."""
        record = self._record(self._read_index(), sha256.lower())
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

        cached = self.find(sha256)
        if cached is not None:
            log.info("fetch_cached", file=cached.name, sha256=sha256)
            ProgressReporter(on_progress, file=name, total=selection.size).state(
                "cached", selection.size
            )
            self._mark_current(sha256, name, selection.size)
            return cached

        dest = self.root / name
        self._move_aside_other_version(name, sha256)
        self._make_room(selection.size)
        source = self._source(selection, name)
        try:
            if isinstance(source, Path):
                self._downloader.copy_local(
                    source, dest, size=selection.size, sha256=sha256, on_progress=on_progress
                )
            else:
                self._downloader.download(
                    source, dest, size=selection.size, sha256=sha256, on_progress=on_progress
                )
        except FetchError as exc:
            if exc.details.get("offline"):
                raise self._offline_error(exc) from exc
            raise
        self._mark_current(sha256, name, selection.size)
        return dest

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

    # ---- sources ------------------------------------------------------------------

    def _source(self, selection: Selection, name: str) -> list[str] | Path:
        """The variant's URLs, else the file next to the manifest (URL or local path)."""
        if selection.urls:
            return list(selection.urls)
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
        temporary = self._index_path.with_name(f".{INDEX_NAME}.{os.getpid()}.tmp")
        # Left by a crashed run of this pid, or planted: unlinking never touches a link's
        # target, and O_EXCL then makes a new file or fails.
        temporary.unlink(missing_ok=True)
        fd = open_store_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(index)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self._index_path)
        fsync_directory(self.root)

    def _index_lock(self) -> FileLock:
        return FileLock(self.root / f".{INDEX_NAME}.lock")

    @staticmethod
    def _record(index: StoreIndex, sha256: str) -> StoredModel | None:
        return next((m for m in index.models if m.sha256 == sha256), None)

    def _usable(self, record: StoredModel | None) -> Path | None:
        if record is None:
            return None
        path = self.root / record.file
        try:
            # lstat: a symlink put in place of a verified file is not that file.
            info = path.lstat()
        except FileNotFoundError:
            return None
        if stat.S_ISREG(info.st_mode) and info.st_size == record.size:
            return path
        return None

    def _mark_current(self, sha256: str, name: str, size: int) -> None:
        with self._index_lock():
            index = self._read_index()
            now = time.time()
            record = self._record(index, sha256)
            if record is None:
                index.models.append(
                    StoredModel(file=name, sha256=sha256, size=size, installed_at=now,
                                last_used_at=now)
                )
            else:
                record.last_used_at = now
            if index.current != sha256:
                index.previous, index.current = index.current, sha256
            self._evict(index, keep={index.current, index.previous}, budget=self.budget_bytes)
            self._write_index(index)

    def _move_aside_other_version(self, name: str, sha256: str) -> None:
        """Keep an older file of the same name (maybe the rollback target) under a new name."""
        with self._index_lock():
            index = self._read_index()
            other = next((m for m in index.models if m.file == name and m.sha256 != sha256), None)
            if other is None or not (self.root / name).exists():
                return
            aside = f"{name}.{other.sha256[:16]}"
            os.replace(self.root / name, self.root / aside)
            other.file = aside
            log.info("fetch_store_moved_aside", file=name, to=aside, sha256=other.sha256)
            self._write_index(index)

    def _make_room(self, size: int) -> None:
        """Evict unprotected models when the disk cannot take ``size`` plus the margin."""
        needed = size + self.fetch_config.disk_margin_bytes
        if shutil.disk_usage(self.root).free >= needed:
            return
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
        (self.root / record.file).unlink(missing_ok=True)
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
