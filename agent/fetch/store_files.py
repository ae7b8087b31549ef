"""How the model store's files and root are opened, locked and hashed, so that nobody else
can redirect what the store (maybe run as root) writes.

Files are opened with ``O_NOFOLLOW`` and must be regular files with one link: a symlink or a
hard link planted in the store (pointing at a file the fetching user can write) is refused,
never truncated. The root must be a real directory owned by the user running the store and
writable by nobody else, or whoever can write there could plant such a link, or swap a
verified model for their own. Names from a manifest are bare file names, so the store never
writes outside its root.

This module must not decide what to fetch or keep (agent.fetch.store does) nor move bytes
over the network (agent.fetch.downloader does).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from pathlib import Path
from types import TracebackType

from agent.errors import ChecksumError, ManifestError, StoreError
from agent.log import get_logger

log = get_logger(__name__)

# Bytes per read when hashing or copying local files.
CHUNK_BYTES = 1 << 20


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


def check_sha256(path: Path, sha256: str, name: str) -> None:
    """Raise ChecksumError unless the file at ``path`` has this sha256."""
    actual = sha256_of(path)
    if actual != sha256:
        raise ChecksumError(
            f"{path}: sha256 {actual}, the manifest says {sha256}",
            file=name, expected_sha256=sha256, actual_sha256=actual,
        )


def already_installed(dest: Path, size: int, sha256: str) -> bool:
    """True when another process (or an earlier run) already installed the file; a file of
    the wrong size or sha256 at ``dest`` is removed."""
    try:
        if dest.stat().st_size == size and sha256_of(dest) == sha256:
            log.info("fetch_already_installed", file=dest.name)
            return True
    except FileNotFoundError:
        return False
    log.warning("fetch_replacing_damaged_file", file=dest.name)
    dest.unlink()
    return False


def check_store_root(root: Path) -> None:
    """Make the root if it is missing; raise StoreError unless it is a directory, not a
    symlink, owned by this user and writable by nobody else."""
    try:
        info = os.lstat(root)
    except FileNotFoundError:
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            # An explicit mode, not the default 0o777: under a umask of 002 that would be
            # group-writable, and then refused below.
            os.mkdir(root, 0o755)
        except FileExistsError:
            pass  # another process made it first; checked below like any other
        info = os.lstat(root)
    where = str(root)
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

