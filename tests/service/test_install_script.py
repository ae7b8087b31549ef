"""scripts/install.sh without root: the agent.yaml it writes on a first install, option checks.

The install itself (user, venv, unit, enable --now, uninstall) runs under a real systemd in
tests/service/test_container.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from tests.support.signing import TEST_PUBLIC_KEY

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
        "--broker-port", "8883", "--manifest", manifest, "--signing-key", TEST_PUBLIC_KEY,
    )
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / "agent.yaml"
    rendered.write_text(result.stdout)
    config = load_config(rendered, env={})
    assert config.device_id == "pi-kitchen.2"
    assert (config.mqtt.host, config.mqtt.port) == ("10.1.2.3", 8883)
    assert config.model.manifest == manifest
    assert config.signing.public_key == TEST_PUBLIC_KEY and config.signing.required
    # The comments that explain each key survive the rendering.
    assert result.stdout.count("\n#") == TEMPLATE.read_text().count("\n#") - 1


def test_with_only_a_key_the_template_changes_only_there() -> None:
    result = install_sh("--print-config", "--signing-key", TEST_PUBLIC_KEY)
    assert result.returncode == 0, result.stderr
    expected = TEMPLATE.read_text().replace("  public_key: null", f'  public_key: "{TEST_PUBLIC_KEY}"')
    assert result.stdout == expected


def test_no_install_without_a_signing_key_unless_unsigned_is_explicit(tmp_path: Path) -> None:
    refused = install_sh("--print-config")
    assert refused.returncode == 2 and "--signing-key" in refused.stderr and refused.stdout == ""
    allowed = install_sh("--print-config", "--allow-unsigned")
    assert allowed.returncode == 0, allowed.stderr
    rendered = tmp_path / "agent.yaml"
    rendered.write_text(allowed.stdout)
    signing = load_config(rendered, env={}).signing
    assert signing.allow_unsigned and not signing.required and signing.public_key is None


@pytest.mark.parametrize(
    ("option", "value", "complaint"),
    [
        ("--device-id", "edge/v1/other", "--device-id"),
        ("--device-id", "dev+", "--device-id"),
        ("--broker-port", "70000", "--broker-port"),
        ("--broker-host", "host name", "--broker-host"),
        ("--signing-key", "bm90IGEga2V5", "--signing-key"),
        ("--wheels-from", "ftp://ctl.lan/files", "--wheels-from"),
        ("--wheels-from", "http://ctl.lan:8080/$(reboot)", "--wheels-from"),
    ],
)
def test_bad_options_are_refused_with_a_reason(option: str, value: str, complaint: str) -> None:
    key = [] if option == "--signing-key" else ["--signing-key", TEST_PUBLIC_KEY]
    result = install_sh("--print-config", *key, option, value)
    assert result.returncode == 2
    assert complaint in result.stderr and "error" in result.stderr
    assert result.stdout == ""

