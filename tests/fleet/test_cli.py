"""`edge-agent fleet devices|prompt|cmd|rollout|manifests|hash-secret` against a real controller."""

from __future__ import annotations

import io
import json

import pytest

from agent.cli import main
from agent.fleet.auth import verify_secret
from tests.fleet.conftest import wait_for


@pytest.fixture
def cli(fleet, credentials, monkeypatch, capsys):
    monkeypatch.setenv("EDGE_AGENT_FLEET_URL", fleet.url)
    monkeypatch.setenv("EDGE_AGENT_FLEET_TOKEN", credentials.token)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["fleet", *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_devices_prompt_and_cmd(cli, sim, fleet):
    devices = sim(2)
    wait_for(lambda: len(fleet.controller.registry.devices) == 2, what="2 devices")
    code, out, _ = cli("devices")
    assert code == 0
    assert "\n2 devices (2 ready)" in "\n" + out
    assert devices.devices[0].id in out and devices.devices[0].quant in out

    code, out, _ = cli("prompt", devices.devices[0].id, "how warm is it", "--max-tokens", "9")
    assert code == 0
    # (the in-process controller's own log lines share this stdout in tests)
    assert out.endswith(f"\nsimulated reply from {devices.devices[0].id} to: how warm is it\n")

    code, out, _ = cli("cmd", devices.devices[1].id, "pin", "--args", '{"quant": "Q2_K"}')
    assert code == 0 and json.loads(out[out.index("{") :])["result"]["quant"] == "Q2_K"

    code, _, err = cli("cmd", devices.devices[1].id, "explode")
    assert code == 2 and "[unknown_op]" in err


def test_rollout_and_manifests_from_the_shell(cli, sim, fleet, tmp_path, ladder_model):
    from tests.fleet.test_api import manifest_for

    sim(2)
    wait_for(lambda: len(fleet.controller.registry.devices) == 2, what="2 devices")
    manifest = tmp_path / "q2.json"
    manifest.write_text(json.dumps(manifest_for(ladder_model("Q2_K"), "Q2_K")))
    assert cli("manifests", "--publish", str(manifest))[0] == 0
    code, out, _ = cli("manifests")
    assert code == 0 and "q2.json" in out and "Q2_K" in out
    code, out, _ = cli(
        "rollout", "start", "--manifest", "q2.json", "--group", "sim-*", "--rate", "600",
        "--soak", "0",
    )
    assert code == 0
    rollout_id = json.loads(out[out.index("{") :])["id"]
    wait_for(
        lambda: '"state": "completed"' in cli("rollout", "status", rollout_id)[1],
        timeout_s=20,
        what="rollout completed",
    )
    code, out, _ = cli("rollout", "events", rollout_id)
    assert code == 0 and "success" in out and "complete" in out


def test_missing_token_and_wrong_token(fleet, monkeypatch, capsys):
    monkeypatch.delenv("EDGE_AGENT_FLEET_TOKEN", raising=False)
    assert main(["fleet", "devices", "--url", fleet.url]) == 2
    assert "[config_invalid]" in capsys.readouterr().err
    monkeypatch.setenv("EDGE_AGENT_FLEET_TOKEN", "wrong")
    assert main(["fleet", "devices", "--url", fleet.url]) == 2
    assert "[unauthorized]" in capsys.readouterr().err
    assert main(["fleet", "devices", "--url", "http://127.0.0.1:9"]) == 2
    assert "[unreachable]" in capsys.readouterr().err


def test_hash_secret_reads_stdin(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hunter2\n"))
    assert main(["fleet", "hash-secret", "--method", "pbkdf2_sha256"]) == 0
    assert verify_secret("hunter2", capsys.readouterr().out.strip())


def test_fleet_serve_runs_until_sigterm_and_rejects_a_bad_config(tmp_path, broker):
    import os
    import signal
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    import yaml

    from tests.support.broker import free_port

    edge_agent = str(Path(sys.executable).with_name("edge-agent"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    port = free_port()
    config = tmp_path / "fleet.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "mqtt": {"host": broker.host, "port": broker.port},
                "http_port": port,
                "db_path": str(tmp_path / "fleet.db"),
                "model_dir": str(tmp_path / "m"),
            }
        )
    )
    process = subprocess.Popen(
        [edge_agent, "fleet", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def healthy():
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/health", timeout=1
                ) as response:
                    return json.loads(response.read())["mqtt_connected"]
            except OSError:
                return False

        wait_for(healthy, timeout_s=20, what="the controller's health")
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert (tmp_path / "fleet.db").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    config.write_text(yaml.safe_dump({"http_prot": 1}))
    bad = subprocess.run(
        [edge_agent, "fleet", "serve", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "[config_invalid]" in bad.stderr and "http_prot" in bad.stderr
