"""Shared fixtures: a real Mosquitto broker, the real model ladder, a real Range HTTP server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.range_server import RangeServer


@pytest.fixture(scope="session")
def ladder_dir() -> Path:
    """The SmolLM2 ladder made by scripts/make-test-models (scripts/test makes it)."""
    path = Path(os.environ.get("EDGE_AGENT_LADDER", Path.home() / ".cache/edge-agent/ladder"))
    if not (path / "manifest.json").exists():
        pytest.fail(f"no model ladder at {path}: run scripts/make-test-models (scripts/test does)")
    return path


@pytest.fixture(scope="session")
def ladder_manifest(ladder_dir: Path) -> dict:
    return json.loads((ladder_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def ladder_model(ladder_dir: Path):
    """Path of one variant by quant: ``ladder_model("Q4_K_M")``."""

    def path_of(quant: str) -> Path:
        found = ladder_dir / f"smollm2-135m-instruct.{quant}.gguf"
        assert found.exists(), f"{found} missing from the ladder"
        return found

    return path_of


@pytest.fixture
def broker(tmp_path: Path):
    """A fresh mosquitto on a free port, with persistence so restarts keep sessions."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def range_server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    server = RangeServer(root).start()
    yield server
    server.stop()
