"""scripts/install.sh without root: the agent.yaml it writes on a first install, option checks.

The install itself (user, venv, unit, enable --now, uninstall) runs under a real systemd in
tests/service/test_container.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "systemd/agent.yaml.example"


def install_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts/install.sh"), *args], capture_output=True, text=True, timeout=30
    )


def test_template_is_a_valid_config_with_the_defaults() -> None:
    config = load_config(TEMPLATE, env={})
    defaults = AgentConfig()
    assert config.mqtt == defaults.mqtt
    assert config.model == defaults.model
    assert config.device_id == defaults.device_id  # commented out: the host name


def test_first_install_config_carries_the_options(tmp_path: Path) -> None:
    # A URL with every character that is special to sed or to YAML double quotes.
    manifest = 'http://ctl.lan:8080/m|a&b"c\\d/manifest.json'
    result = install_sh(
        "--print-config", "--device-id", "pi-kitchen.2", "--broker-host", "10.1.2.3",
        "--broker-port", "8883", "--manifest", manifest,
    )
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / "agent.yaml"
    rendered.write_text(result.stdout)
    config = load_config(rendered, env={})
    assert config.device_id == "pi-kitchen.2"
    assert (config.mqtt.host, config.mqtt.port) == ("10.1.2.3", 8883)
    assert config.model.manifest == manifest
    # The comments that explain each key survive the rendering.
    assert result.stdout.count("\n#") == TEMPLATE.read_text().count("\n#") - 1


def test_without_options_the_template_is_written_unchanged() -> None:
    result = install_sh("--print-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout == TEMPLATE.read_text()


@pytest.mark.parametrize(
    ("option", "value", "complaint"),
    [
        ("--device-id", "edge/v1/other", "--device-id"),
        ("--device-id", "dev+", "--device-id"),
        ("--broker-port", "70000", "--broker-port"),
        ("--broker-host", "host name", "--broker-host"),
    ],
)
def test_bad_options_are_refused_with_a_reason(option: str, value: str, complaint: str) -> None:
    result = install_sh("--print-config", option, value)
    assert result.returncode == 2
    assert complaint in result.stderr and "error" in result.stderr
    assert result.stdout == ""

