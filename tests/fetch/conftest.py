"""Fixtures for the fetch tests: fast retry settings, a second server, a small tmpfs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.config import FetchConfig
from tests.support.range_server import RangeServer


@pytest.fixture
def fast_fetch() -> FetchConfig:
    """Short timeouts and backoff so failure paths take milliseconds, no disk margin."""
    return FetchConfig(
        connect_timeout_s=1.0,
        read_timeout_s=0.5,
        retries=3,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        disk_margin_bytes=0,
    )


@pytest.fixture
def second_server(tmp_path: Path):
    root = tmp_path / "www2"
    root.mkdir()
    server = RangeServer(root).start()
    yield server
    server.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """An 8 MiB tmpfs: a disk that really fills up."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
