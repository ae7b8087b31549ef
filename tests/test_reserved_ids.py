"""Finding 2 of issue 10, on the device side: the contract's topic words (`all`, `pool`, …) are
never device ids. The config refuses them naming the key, install.sh refuses them as
--device-id, and a real `edge-agent run` with one exits before it touches the broker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.topic_rules import RESERVED_DEVICE_IDS, device_id_problem
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


# Ids on both sides of each edge of the rule: first character, allowed characters, length, words.
ID_TABLE = ["pi-kitchen-1", "a", "9", "A.b_c-d", "a" * 64, "a" * 65, "all-1", "Pool", "dev 1",
            "kïtchen", "dev$", "$SYS", "-dev", ".dev", "_dev", "a/b", "a+b", "a#", "dev\t",
            "all", "pool", "reply"]


@pytest.mark.parametrize("device_id", ID_TABLE)
def test_install_sh_and_the_python_rule_agree_on_device_ids(device_id: str) -> None:
    # install.sh keeps its own shell copy of the rule; the config, the topic helpers and the ACL
    # generator share the Python one. A difference would install a device the ACL cannot name.
    result = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--print-config",
                             "--allow-unsigned", "--device-id", device_id],
                            capture_output=True, text=True, timeout=30)
    shell_accepts = result.returncode == 0
    assert shell_accepts or "--device-id" in result.stderr, result.stderr
    assert shell_accepts is (device_id_problem(device_id) is None)


@pytest.mark.parametrize("device_id", ["dev 1", "kïtchen", "a" * 65, "dev$"])
def test_the_config_refuses_ids_the_acl_generator_refuses(device_id: str) -> None:
    with pytest.raises(ConfigError, match="device_id: .*use letters, digits"):
        load_config(None, env={"EDGE_AGENT_DEVICE_ID": json.dumps(device_id)})


def test_config_imports_no_upper_layer() -> None:
    # DESIGN.md: config is the bottom layer; its id rules come from agent.topic_rules.
    code = ("import sys, agent.config; "
            "print([m for m in sys.modules if m.startswith('agent.') and m not in "
            "('agent.config', 'agent.errors', 'agent.topic_rules')])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
