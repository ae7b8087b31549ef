"""Disk space for the model store: refusing a fetch the disk cannot take before a byte is
written, and telling a full disk apart from other write failures.

This module must not delete anything to make room: which model goes is the store's
eviction (agent/fetch/eviction.py).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from agent.errors import DiskFullError


def require_free_space(name: str, directory: Path, remaining: int, margin: int) -> None:
    """Raise DiskFullError unless ``directory``'s filesystem has ``remaining`` bytes for
    ``name`` plus the margin free."""
    needed = remaining + margin
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFullError(
            f"{name}: needs {remaining} bytes plus a {margin}-byte margin on {directory}, only"
            f" {free} free; free some space or lower fetch.disk_margin_bytes",
            file=name, needed_bytes=needed, free_bytes=free,
        )


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_midway(name: str, exc: OSError) -> DiskFullError:
    # The part is deleted, not kept for a resume: a device whose disk is full stops
    # writing its logs and state, and the bytes are cheap to fetch again.
    return DiskFullError(
        f"{name}: the disk filled up during the download ({exc.strerror}); the partial"
        " file was removed",
        file=name,
    )
