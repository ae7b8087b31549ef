"""The README's first command, end to end: broker, controller, agent, a streamed answer,
and nothing left behind afterwards; on Mosquitto and on the embedded broker that a machine
without Mosquitto gets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def children_named(fragment: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if fragment in cmdline:
            found.append(proc)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])  # scripts/test installs mosquitto
def test_quickstart_answers_and_cleans_up(ladder_dir: Path, broker: str) -> None:
    before = set(ladder_dir.parent.glob("quickstart-run-*"))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/quickstart.py"), "--exit-after-prompt",
         "--http-port", "0", "--ladder", str(ladder_dir), "--broker", broker],
        capture_output=True, text=True, timeout=400,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    shown = "mosquitto" if broker == "mosquitto" else "embedded broker"
    assert f"quickstart: broker: {shown} on " in out
    assert "agent ready: smollm2-135m-instruct" in out
    # Signed end to end: the agent pinned the key the controller made, and says so in meta.
    key_id = out.split("manifests signed by the controller's key ", 1)[1].split()[0]
    assert f"agent requires signed manifests: True, key {key_id}" in out
    answer = out.split("quickstart: prompt:", 1)[1].split("quickstart: dashboard:", 1)[0]
    assert len(answer.strip().splitlines()) >= 2, "no streamed answer after the prompt line"
    assert "login password: " in out
    # Nothing left behind: the run directory and every process it started are gone.
    assert set(ladder_dir.parent.glob("quickstart-run-*")) == before
    assert not children_named("quickstart-run-")
