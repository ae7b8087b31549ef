"""Free disk space where models are stored. The directory need not exist yet: the
nearest existing parent is on the same filesystem in the usual case."""

from __future__ import annotations

import shutil
from pathlib import Path


def read_disk_free(directory: str | Path) -> int | None:
    path = Path(directory).expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None
