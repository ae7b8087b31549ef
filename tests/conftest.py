"""Shared fixtures: a real Mosquitto broker, the real model ladder, a real Range HTTP server.

Also the skip log for .ci/run: with ``$EDGE_AGENT_SKIP_LOG`` set, every skipped (or xfailed)
test and collector is appended there as one JSON line, so CI can fail on a skip it does not
expect instead of letting a missing tool silently shrink the suite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import structlog

from tests.support.broker import Broker
from tests.support.range_server import RangeServer
from tests.support.signing import sign_file


def _log_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    path = os.environ.get("EDGE_AGENT_SKIP_LOG")
    if not path or not report.skipped:
        return
    if hasattr(report, "wasxfail"):
        reason = f"xfail: {report.wasxfail}"
    elif isinstance(report.longrepr, tuple):  # (file, line, "Skipped: reason")
        reason = report.longrepr[2].removeprefix("Skipped: ")
    else:
        reason = str(report.longrepr)
    with open(path, "a") as log:
        log.write(json.dumps({"nodeid": report.nodeid, "reason": reason}) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _log_skip(report)


@pytest.fixture(autouse=True)
def _restore_structlog_config():
    """A command run in-process (``agent.cli.main``) configures structlog at its own level
    (warning, for most); later tests that capture info lines must not depend on test order."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _log_skip(report)


@pytest.fixture(scope="session")
def ladder_dir() -> Path:
    """The SmolLM2 ladder made by scripts/make-test-models (scripts/test makes it)."""
    path = Path(os.environ.get("EDGE_AGENT_LADDER", Path.home() / ".cache/edge-agent/ladder"))
    if not (path / "manifest.json").exists():
        pytest.fail(f"no model ladder at {path}: run scripts/make-test-models (scripts/test does)")
    sign_file(path / "manifest.json")  # signed with the test key that RunningDaemon pins
    return path


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    """The second architecture (Gemma 3 270M: gemma3, tied embeddings, 262k vocabulary,
    sliding-window attention, no chat template), made by scripts/make-test-models."""
    path = Path(os.environ.get("EDGE_AGENT_GEMMA", Path.home() / ".cache/edge-agent/gemma"))
    if not (path / "manifest.json").exists():
        pytest.fail(f"no gemma models at {path}: run scripts/make-test-models (scripts/test does)")
    sign_file(path / "manifest.json")  # signed with the test key that RunningDaemon pins
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


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory):
    """A real Mosquitto shared by one test module's tests (and its module-scoped daemons)."""
    broker = Broker(tmp_path_factory.mktemp("broker")).start()
    yield broker
    broker.stop()


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
