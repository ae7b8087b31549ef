"""The fault suite: each test records "N tried, N survived, M lost"; the totals are printed
at the end of the run and written to artifacts/fault-suite.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

RESULTS: list[dict] = []
ARTIFACTS = Path(os.environ.get("EDGE_AGENT_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts"))


@pytest.fixture
def fault_report():
    def record(name: str, *, tried: int, survived: int, lost: int, **detail) -> None:
        RESULTS.append({"fault": name, "tried": tried, "survived": survived, "lost": lost, **detail})

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section("fault suite")
    for r in RESULTS:
        terminalreporter.write_line(
            f"{r['fault']}: {r['tried']} tried, {r['survived']} survived, {r['lost']} lost"
        )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "fault-suite.json").write_text(json.dumps(RESULTS, indent=2))
