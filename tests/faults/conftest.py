"""The fault suite: each test records the figures it observed (how many it tried, how each
ended, what was lost); they are printed at the end of the run and written to
$EDGE_AGENT_ARTIFACTS/fault-suite.json (default: artifacts/ in the checkout, gitignored).

Figures are counted from what the test saw, never written in: a test records before it
asserts, so a failing run still shows what happened."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

RESULTS: list[dict] = []
ARTIFACTS = Path(os.environ.get("EDGE_AGENT_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts"))


@pytest.fixture
def fault_report():
    def record(name: str, **figures) -> None:
        RESULTS.append({"fault": name, **figures})

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section("fault suite")
    for r in RESULTS:
        figures = ", ".join(f"{key}={value}" for key, value in r.items() if key != "fault")
        terminalreporter.write_line(f"{r['fault']}: {figures}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "fault-suite.json").write_text(json.dumps(RESULTS, indent=2))
