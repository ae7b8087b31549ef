"""Finding 2 of issue 10, on the device side: the contract's topic words (`all`, `pool`, …) are
never device ids. The config refuses them naming the key, install.sh refuses them as
--device-id, and a real `edge-agent run` with one exits before it touches the broker."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.mqtt.topics import RESERVED_DEVICE_IDS
from tests.support.daemon import RunningDaemon
from tests.support.observer import Observers

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("word", sorted(RESERVED_DEVICE_IDS) + ["$SYS"])
def test_the_config_refuses_a_reserved_device_id_naming_the_key(tmp_path: Path, word: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(f"device_id: {json.dumps(word)}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.code == "config_invalid"
    assert caught.value.message.startswith(f"{path}: device_id: ")
    with pytest.raises(ConfigError, match="device_id: "):  # an environment override too
        load_config(None, env={"EDGE_AGENT_DEVICE_ID": word})


def test_the_config_refuses_bad_pools_and_reply_filters(tmp_path: Path) -> None:
    for mqtt, key in (({"pool": "a/b"}, "pool"), ({"pool": "+"}, "pool"),
                      ({"reply_topics": ["ok/#", "a/#/b"]}, "reply_topics[1]"),
                      ({"reply_topics": ["$SYS/#"]}, "reply_topics[0]")):
        path = tmp_path / "agent.yaml"
        path.write_text(json.dumps({"device_id": "dev-1", "mqtt": mqtt}))
        with pytest.raises(ConfigError, match=re.escape(f"mqtt: {key}: ")):
            load_config(path, env={})
    path.write_text(json.dumps({"device_id": "all-1", "mqtt": {"reply_topics": ["edge/v1/+/in"]}}))
    assert load_config(path, env={}).mqtt.reply_topics == ["edge/v1/+/in"]


@pytest.mark.parametrize("word", sorted(RESERVED_DEVICE_IDS))
def test_install_sh_refuses_a_reserved_device_id(word: str) -> None:
    result = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--print-config",
                             "--device-id", word], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "reserved topic word" in result.stderr
    assert result.stdout == ""


def test_an_agent_named_all_exits_before_it_touches_the_broker(tmp_path, broker, ladder_dir) -> None:
    observers = Observers(broker)
    try:
        everything = observers.connect("#")
        daemon = RunningDaemon(tmp_path / "agent", broker, ladder_dir, device_id="all").start()
        try:
            assert daemon.process.wait(60) == 2
        finally:
            daemon.close()
        log = daemon.log_path.read_text()
        assert "config_invalid" in log and "device_id: 'all' is a reserved topic word" in log
        assert everything.messages == []  # no status, no Will, nothing under edge/v1/all/
    finally:
        observers.close()
