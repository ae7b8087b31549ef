"""Installing a model file that is already on this machine (next to a local manifest):
checked for size and sha256 like a download, with no network.

A hard link when source and store share a filesystem (no second copy of a large model),
else a copy through ``<name>.part`` hashed on the way, installed only when it matches.

This module must not fetch anything over the network (agent/fetch/downloader.py does).
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.atomic_file import fsync_directory
from agent.errors import ChecksumError, FetchError
from agent.fetch.disk_space import disk_full_midway, is_disk_full, require_free_space
from agent.fetch.part import PartFile
from agent.fetch.progress import ProgressCallback, ProgressReporter
from agent.fetch.store_files import FileLock, already_installed, check_sha256
from agent.log import get_logger

log = get_logger(__name__)


def copy_local(source: Path, dest: Path, *, size: int, sha256: str, margin: int,
               on_progress: ProgressCallback | None = None) -> Path:
    """Install ``source`` at ``dest`` after checking its size and sha256; returns ``dest``.
    ``margin`` is the free space a copy must leave on the disk."""
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
        if already_installed(dest, size, sha256):
            return dest
        reporter = ProgressReporter(on_progress, file=dest.name, total=size)
        reporter.mirror = str(source)
        reporter.state("starting", 0)
        if not _link_verified(source, dest, sha256):
            require_free_space(dest.name, dest.parent, size, margin)
            _copy_through_part(source, dest, size, sha256, reporter)
        reporter.state("complete", size)
        log.info("fetch_complete", file=dest.name, mirror=str(source), size=size)
        return dest


def _link_verified(source: Path, dest: Path, sha256: str) -> bool:
    """Hard-link ``source`` to ``dest`` after checking its sha256; False where the
    filesystem cannot (another device, no hard links), so the caller copies instead."""
    if source.stat().st_dev != dest.parent.stat().st_dev:
        return False
    check_sha256(source, sha256, dest.name)
    try:
        os.link(source, dest)
    except OSError as exc:
        log.info("fetch_link_unavailable", file=dest.name, error=exc.strerror)
        return False
    fsync_directory(dest.parent)
    return True


def _copy_through_part(source: Path, dest: Path, size: int, sha256: str,
                       reporter: ProgressReporter) -> None:
    part = PartFile.open(dest.with_name(dest.name + ".part"), size)
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
        if is_disk_full(exc):
            raise disk_full_midway(dest.name, exc) from exc
        raise FetchError(f"{dest.name}: copy failed: {exc}", file=dest.name) from exc
    finally:
        part.close()
