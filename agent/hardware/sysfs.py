"""Reading files under a probe root: the one place the hardware readers touch the disk.

Every ``read_*`` in agent.hardware takes a ``root`` so that a directory of captured files
(a fake root) stands in for ``/``. These functions turn "absent or unreadable" into None;
they never raise for a missing file and never parse.
"""

from __future__ import annotations

import os
from pathlib import Path


def under(root: str | os.PathLike[str], path: str) -> Path:
    """``path`` (absolute, as on a device) inside ``root``."""
    return Path(root) / path.lstrip("/")


def read_text(root: str | os.PathLike[str], path: str) -> str | None:
    try:
        return under(root, path).read_text(errors="replace")
    except (OSError, ValueError):
        return None


def read_first_line(root: str | os.PathLike[str], path: str) -> str | None:
    text = read_text(root, path)
    if text is None:
        return None
    stripped = text.strip()
    return stripped or None


def is_live(root: str | os.PathLike[str]) -> bool:
    """True when ``root`` is the real filesystem, so live tools may be run."""
    return Path(root).resolve() == Path("/")
