"""Verified downloads: one file from a list of mirrors into a final path, or not at all.

This module is the policy around the transfer: which mirror next, when to retry and how long
to wait, when to keep or drop the partial bytes, and the install. The bytes go to
``<name>.part`` beside the target (agent/fetch/part.py, which hashes them as they are
written) while an exclusive lock on ``<name>.lock`` is held, so two processes never write one
part; both files are opened as agent/fetch/store_files.py says, never through a link. Each
GET is one attempt (agent/fetch/transfer.py: Range and If-Range resume). Only a file whose
size and sha256 match is fsynced and renamed into place, so the target path either does not
exist or holds the right bytes.

Transient failures (connect, read timeout, dropped connection, 5xx, 429) are retried with
exponential backoff and full jitter; a 4xx, a size or sha256 mismatch, or running out of
retries moves on to the next mirror.

This module must not decide which file to fetch or what to keep: that is the store's job
(agent/fetch/store.py), nor speak HTTP itself: agent/fetch/http.py does, through a
transport the caller may replace.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from agent.config import FetchConfig
from agent.errors import ChecksumError, DiskFullError, FetchError
from agent.fetch import local_copy
from agent.fetch.disk_space import disk_full_midway, is_disk_full, require_free_space
from agent.fetch.http import HttpClient, Timeouts, Transport
from agent.fetch.part import PartFile
from agent.fetch.progress import ProgressCallback, ProgressReporter
from agent.fetch.store_files import FileLock, already_installed, sha256_of
from agent.fetch.transfer import MirrorRejected, TransientFailure, attempt
from agent.log import get_logger

# sha256_of is where callers have always found the hash the downloader checks.
__all__ = ["Downloader", "sha256_of"]

log = get_logger(__name__)


@dataclass
class MirrorFailure:
    url: str
    reason: str
    offline: bool = False  # the mirror could not be reached at all (connect error/timeout)
    mismatch: bool = False  # the mirror served bytes that do not match the manifest


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
            if already_installed(dest, size, sha256):
                return dest
            reporter = ProgressReporter(on_progress, file=dest.name, total=size)
            part = PartFile.open(dest.with_name(dest.name + ".part"), size)
            try:
                require_free_space(dest.name, dest.parent, size - part.offset,
                                   self.config.disk_margin_bytes)
                failures = self._from_mirrors(urls, part, dest, size, sha256, reporter)
            except DiskFullError:
                # Before the start the part is kept for a later resume; a disk that filled
                # up midway has already had it removed (see disk_full_midway).
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
            raise _all_failed(dest.name, failures)

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
        return local_copy.copy_local(source, dest, size=size, sha256=sha256,
                                     margin=self.config.disk_margin_bytes,
                                     on_progress=on_progress)

    # ---- internals ----------------------------------------------------------------

    def _install(self, part: PartFile, dest: Path) -> None:
        try:
            part.install(dest)
        except OSError as exc:  # the fsync is where a delayed-allocation ENOSPC shows up
            if is_disk_full(exc):
                raise disk_full_midway(dest.name, exc) from exc
            raise FetchError(
                f"{dest.name}: cannot install {part.path}: {exc.strerror}", file=dest.name
            ) from exc

    def _backoff_s(self, attempt: int) -> float:
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)

    def _from_mirrors(
        self,
        urls: list[str],
        part: PartFile,
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
        part: PartFile,
        size: int,
        sha256: str,
        reporter: ProgressReporter,
    ) -> MirrorFailure | None:
        """Fetch from one mirror with retries; None when the part is complete and verified."""
        attempts = 0
        reporter.state("starting", part.offset)
        while True:
            before = part.offset
            try:
                attempt(client, url, part, size, reporter)
                break
            except TransientFailure as exc:
                # Progress made in this attempt resets the count: a link that drops every
                # few megabytes still finishes, a dead one gives up after `retries`.
                attempts = 1 if part.offset > before else attempts + 1
                if attempts > self.config.retries:
                    return MirrorFailure(
                        url, f"{exc.reason} (after {attempts} attempts)", offline=exc.connect
                    )
                delay = self._backoff_s(attempts)
                log.info("fetch_retry", file=part.path.name, mirror=url, attempt=attempts,
                         delay_s=round(delay, 3), reason=exc.reason, have_bytes=part.offset)
                reporter.state("retrying", part.offset, attempt=attempts, error=exc.reason)
                time.sleep(delay)
                reporter.restart_window()
            except MirrorRejected as exc:
                if exc.mismatch:
                    part.reset()
                return MirrorFailure(url, exc.reason, mismatch=exc.mismatch)
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full_midway(part.path.name, exc) from exc
                raise FetchError(
                    f"{part.path.name}: cannot write {part.path}: {exc.strerror}",
                    file=part.path.name,
                ) from exc
        return _verify(part, url, size, sha256, reporter)


def _verify(part: PartFile, url: str, size: int, sha256: str,
            reporter: ProgressReporter) -> MirrorFailure | None:
    """None when the part holds the manifest's bytes; else the part is emptied for the next
    mirror and the mismatch is this one's failure."""
    reporter.state("verifying", part.offset)
    actual = part.sha256()
    if part.offset != size or actual != sha256:
        part.reset()
        return MirrorFailure(
            url, f"sha256 {actual}, the manifest says {sha256}", mismatch=True
        )
    return None


def _all_failed(name: str, failures: list[MirrorFailure]) -> FetchError:
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
