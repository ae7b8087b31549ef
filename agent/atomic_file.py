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
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``, durably; the directory must exist."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
