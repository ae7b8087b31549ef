"""The shipped systemd units: `systemd-analyze verify` accepts them, their exposure is at most
what the README states, and the controller and the agent run as two users.

verify checks that ExecStart's binary exists, so it runs with ``--root`` on a staged root
that holds the distribution's own unit files (for network-online.target and friends), our
units, and the real ``edge-agent`` console script of the environment running the tests
copied to /opt/edge-agent/venv/bin/edge-agent, where install.sh puts it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = ("edge-agent.service", "edge-fleet.service")

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def readme_exposure() -> dict[str, float]:
    """The ratings the README promises: "rates it 1.6 (the fleet unit 1.4)"."""
    text = " ".join((REPO / "README.md").read_text().split())
    match = re.search(r"`systemd-analyze security` rates it ([0-9.]+) \(the fleet unit ([0-9.]+)\)",
                      text)
    assert match, "README no longer states the units' exposure"
    return {"edge-agent.service": float(match.group(1)),
            "edge-fleet.service": float(match.group(2))}


def service_settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def staged_root(tmp_path: Path, *, with_binary: bool = True) -> Path:
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for unit in UNITS:
        shutil.copy(REPO / "systemd" / unit, root / "etc/systemd/system" / unit)
    if with_binary:
        console_script = Path(sys.prefix) / "bin" / "edge-agent"
        assert console_script.exists(), f"{console_script}: run scripts/setup first"
        target = root / "opt/edge-agent/venv/bin/edge-agent"
        target.parent.mkdir(parents=True)
        shutil.copy(console_script, target)
    # ExecStart runs releases/current, which install.sh points at the venv.
    (root / "opt/edge-agent/releases").mkdir(parents=True)
    (root / "opt/edge-agent/releases/current").symlink_to("/opt/edge-agent/venv")
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *UNITS],
        capture_output=True, text=True, timeout=60,
    )


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    result = verify(staged_root(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 on some warnings (an unknown key is "ignoring"): none may name our units.
    assert not [line for line in output.splitlines() if any(u in line for u in UNITS)], output


@needs_analyze
def test_verify_catches_a_missing_exec_start_binary(tmp_path: Path) -> None:
    result = verify(staged_root(tmp_path, with_binary=False))
    assert result.returncode != 0
    assert "/opt/edge-agent/venv/bin/edge-agent" in result.stderr


def exposure(unit: str) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(REPO / "systemd" / unit)],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_is_at_most_what_the_readme_states(unit: str) -> None:
    level = exposure(unit)
    print(f"{unit}: overall exposure {level}")
    assert level <= readme_exposure()[unit]


def test_controller_and_agent_run_as_different_users_with_private_state() -> None:
    """A compromised daemon must neither read the controller's fleet.db nor signal it: two
    system users, and the controller's state directory closed to everyone else."""
    agent, fleet = (service_settings(unit) for unit in UNITS)
    assert agent["User"] != fleet["User"] and agent["Group"] != fleet["Group"]
    assert "root" not in agent["User"] + fleet["User"]
    assert fleet["StateDirectoryMode"] == ["0700"]
    # Each unit's own state, no directory of one inside the other's.
    assert set(agent["StateDirectory"]).isdisjoint(fleet["StateDirectory"])
    assert set(agent["CacheDirectory"]).isdisjoint(fleet["CacheDirectory"])
    # Other users' processes are invisible in /proc, so not even their pids are found.
    assert agent["ProtectProc"] == fleet["ProtectProc"] == ["invisible"]
