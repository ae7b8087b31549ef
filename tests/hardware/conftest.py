"""Fixtures for the hardware tests: the captured fake roots under fixtures/ (see SOURCES.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixture_root():
    """Path of one captured device root: ``fixture_root("raspberry-pi-5")``."""

    def path_of(name: str) -> Path:
        found = FIXTURES / name
        assert found.is_dir(), f"no fixture root {found}"
        return found

    return path_of
