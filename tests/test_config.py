"""Config: YAML + EDGE_AGENT_* overrides + secrets; unknown keys rejected with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config, read_secret
from agent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None, env={})
    assert config.mqtt.port == 1883
    assert config.mqtt.protocol == "5"
    assert config.runtime.queue_size > 0


def test_file_values_and_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: pi-kitchen\nmqtt:\n  host: broker.lan\n  port: 8883\n")
    config = load_config(path, env={"EDGE_AGENT_MQTT__PORT": "1884", "EDGE_AGENT_MODEL__PIN": "Q4_K_M"})
    assert config.device_id == "pi-kitchen"
    assert config.mqtt.host == "broker.lan"
    assert config.mqtt.port == 1884  # environment beats the file
    assert config.model.pin == "Q4_K_M"


def test_unknown_key_names_file_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt:\n  hots: broker.lan\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(path) in err.value.message
    assert "mqtt" in err.value.message and "hots" in err.value.message
    assert err.value.code == "config_invalid"


def test_wrong_type_names_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt:\n  tls:\n    verify: sometimes\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert "mqtt.tls.verify" in err.value.message


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "mqtt: [unclosed\n"), env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml", env={})


def test_secret_from_file_then_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    assert read_secret(str(tmp_path / "pw"), "mqtt-password", env={}) == "s3cret"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd")
    assert read_secret(None, "mqtt-password", env={"CREDENTIALS_DIRECTORY": str(creds)}) == "from-systemd"
    assert read_secret(None, "mqtt-password", env={}) is None
    (creds / "mqtt-password").write_text("\n")
    assert read_secret(None, "mqtt-password", env={"CREDENTIALS_DIRECTORY": str(creds)}) is None
    with pytest.raises(ConfigError, match="does not exist"):
        read_secret(str(tmp_path / "nope"), "mqtt-password", env={})


def test_tool_variables_are_not_config_keys(tmp_path: Path) -> None:
    env = {"EDGE_AGENT_VENV": "/opt/venv", "EDGE_AGENT_LADDER": "/tmp/l", "EDGE_AGENT_FLEET_URL": "http://x"}
    assert load_config(None, env=env).mqtt.host == "localhost"
    with pytest.raises(ConfigError, match="hsot"):
        load_config(None, env={"EDGE_AGENT_MQTT__HSOT": "broker.lan"})


def test_labels_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "labels:\n  site: store-12\n  role: kiosk\n  rack: 3\n")
    config = load_config(path, env={"EDGE_AGENT_LABELS__ROLE": "till"})
    assert config.labels == {"site": "store-12", "role": "till", "rack": "3"}
    assert load_config(None, env={}).labels == {}


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        ("{site: store 12}", "'store 12'"),  # a space: not one word
        ("{site: 'a/b'}", "'a/b'"),
        ("{'': x}", "key ''"),
        ("{site: ''}", "value ''"),
        ("{-site: x}", "'-site'"),
        ("{site: " + "x" * 65 + "}", "at most 64"),
        ("{" + ", ".join(f"k{n}: v" for n in range(17)) + "}", "at most 16 labels"),
        ("{site: [a, b]}", "labels"),
        ("{site: true}", "labels"),
        ("[site]", "labels"),
    ],
)
def test_bad_labels_name_the_key_and_the_file(tmp_path: Path, labels: str, says: str) -> None:
    path = write(tmp_path, f"labels: {labels}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(path) in err.value.message
    assert "labels" in err.value.message and says in err.value.message
