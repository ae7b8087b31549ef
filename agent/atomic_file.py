"""One way to replace a small state file so that a crash or a power cut leaves the old file
or the new one, never a torn or empty one.

Every state file goes through ``atomic_write``: the daemon's session counter, overrides and
last good Selection, the runtime's remembered settings, the learned corrections and the model
store's index. Losing one is not cosmetic: a session counter that goes back makes the
controller ignore the device's ``status`` as older than a ``lost`` it already saw.

The order is what makes it durable: write a temporary file beside the target, fsync it,
rename it over the target, fsync the directory (the rename itself lives in the directory).
The temporary gets a fresh random name opened with O_EXCL (``tempfile.mkstemp``), so a
symlink planted under a predictable name is never followed. No imports from the rest of the
package: every layer may use it.

A writer killed before its rename leaves its temporary behind, ``.<target>.<pid>.<random>.tmp``
(the pid says whose it was). Each write of a target removes the ones its earlier writers
abandoned. Whether a writer is still alive is told by a lock, not by its pid (pids are reused
and differ between pid namespaces): a writer holds an exclusive ``flock`` on its temporary
until the rename, the kernel drops it when the process dies, and a sweep removes only a
temporary whose lock it can take.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``, durably; the directory must exist. Then remove the
    temporaries that dead writers of ``path`` left."""
    fd, temporary = _locked_temporary(path)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
            # Renamed while still open: the lock tells a sweep this temporary is being written.
            os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    _sweep_abandoned_temporaries(path)


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _locked_temporary(path: Path) -> tuple[int, str]:
    """A new temporary beside ``path``, open and locked by this writer."""
    while True:
        fd, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Between mkstemp and the lock, a sweep sees an unlocked temporary and may remove it;
        # then this one has no name left and the writer starts again with another.
        if os.fstat(fd).st_nlink:
            return fd, temporary
        os.close(fd)


def _sweep_abandoned_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` whose writers died before their rename.

    Housekeeping after a write that has already succeeded: whatever fails here is left for
    the next write to try again."""
    own = re.compile(rf"\.{re.escape(path.name)}\.\d+\.[a-z0-9_]+\.tmp")
    try:
        names = [entry.name for entry in os.scandir(path.parent) if own.fullmatch(entry.name)]
    except OSError:
        return
    for name in names:
        _remove_if_abandoned(path.parent / name)


def _remove_if_abandoned(temporary: Path) -> None:
    try:
        # O_NOFOLLOW: a symlink under that name is not ours; O_NONBLOCK: nor does a FIFO hang us.
        fd = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its writer is alive
        # Still the file that was locked (another sweep may have removed it meanwhile).
        if os.path.samestat(os.fstat(fd), os.lstat(temporary)):
            os.unlink(temporary)
    except OSError:
        pass
    finally:
        os.close(fd)
