"""Manifest signing and set_manifest sources, end to end (issue 10, findings 3 and 9).

Real processes only: the controller on uvicorn makes its key on first start and signs what
/files serves; `edge-agent run` pinned to that key on a real Mosquitto fetches it, and the
attacks come over MQTT as a writer of `cmd` would send them: an unsigned manifest, a
tampered one, /etc/passwd, a file outside the allowed directory."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from agent.catalog.signing import verify_manifest
from agent.errors import ConfigError
from agent.fleet.hosting import ControllerKey
from agent.fleet.service import FleetService
from tests.fleet.conftest import make_config
from tests.support.daemon import BASE, RunningDaemon, wait_ready
from tests.support.observer import Observer
from tests.support.range_server import link_into
from tests.support.signing import TEST_PRIVATE_KEY, sign_file

QUANT = "Q2_K"  # the smallest rung: the agent fetches it from the controller


def one_variant(ladder_dir: Path, quant: str) -> dict:
    manifest = json.loads((ladder_dir / "manifest.json").read_text())
    model = manifest["models"][0]
    model["variants"] = [v for v in model["variants"] if v["quant"] == quant]
    return manifest


def command(observer: Observer, op: str, **args) -> dict:
    command_id = f"c-{uuid.uuid4().hex[:8]}"
    observer.publish(f"{BASE}/cmd", json.dumps({"id": command_id, "op": op, "args": args}).encode())
    message = observer.wait_for(lambda m: m.topic == f"{BASE}/cmd/result"
                                and json.loads(m.payload).get("id") == command_id, 120)
    return json.loads(message.payload)


def ask(observer: Observer) -> dict:
    prompt_id = f"q-{uuid.uuid4().hex[:8]}"
    body = {"id": prompt_id, "prompt": "Hello", "max_tokens": 4, "temperature": 0.0}
    observer.publish(f"{BASE}/prompt", json.dumps(body).encode())
    message = observer.wait_for(lambda m: m.topic == f"{BASE}/reply/{prompt_id}"
                                and json.loads(m.payload).get("done"), 60)
    return json.loads(message.payload)


def test_controller_key_is_made_once_kept_private_and_reused(tmp_path, broker) -> None:
    config = make_config(tmp_path, broker)
    key_file = tmp_path / "signing.key"  # beside db_path, in the controller's state dir
    assert not key_file.exists()
    keys = []
    for _ in range(2):  # first start makes it, the restart reads it
        service = FleetService(config).start()
        try:
            keys.append(httpx.get(f"{service.url}/api/signing-key", timeout=10).json())
        finally:
            service.stop()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert keys[0] == keys[1] and keys[0]["algorithm"] == "ed25519" and len(keys[0]["key_id"]) == 16
    # The operator's way to read it for install.sh, on the controller's host: the same key.
    fleet_yaml = tmp_path / "fleet.yaml"
    fleet_yaml.write_text(f"db_path: {config.db_path}\n")
    shown = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "signing-key", "--config",
                            str(fleet_yaml), "--json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == keys[0]
    written = key_file.read_bytes()
    # A key readable by others is refused, not silently used or replaced.
    key_file.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        FleetService(config)
    assert key_file.read_bytes() == written


RACE = """
import sys, time
from agent.fleet.hosting import ControllerKey
start = float(sys.argv[2])
while time.time() < start:  # every process reaches load_or_create at the same instant
    pass
print(ControllerKey.load_or_create(sys.argv[1]).public_key)
"""


def test_controllers_starting_together_end_with_one_key_they_agree_on(tmp_path) -> None:
    for attempt in range(5):  # the window is short: several rounds, each a fresh state dir
        key_file = tmp_path / str(attempt) / "signing.key"
        start = time.time() + 1.5  # after every interpreter has imported
        racers = [
            subprocess.Popen([sys.executable, "-c", RACE, str(key_file), str(start)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(8)
        ]
        results = [racer.communicate(timeout=60) for racer in racers]
        assert all(racer.returncode == 0 for racer in racers), [err for _, err in results]
        assert len({out.strip() for out, _ in results}) == 1
        assert ControllerKey.load(key_file).public_key == results[0][0].strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert [p.name for p in key_file.parent.iterdir()] == ["signing.key"]  # no temp left


def test_an_empty_key_file_is_refused_not_replaced(tmp_path) -> None:
    # What a crash mid-creation used to leave: it is not a key, and replacing it on its own
    # would orphan every device that pinned the lost one.
    key_file = tmp_path / "signing.key"
    key_file.touch(mode=0o600)
    with pytest.raises(ConfigError, match="not a base64 Ed25519 private key"):
        ControllerKey.load_or_create(key_file)
    assert key_file.read_bytes() == b""


def test_every_manifest_the_controller_serves_is_signed_with_its_key(fleet, api, ladder_dir):
    key = httpx.get(f"{fleet.url}/api/signing-key", timeout=10).json()["public_key"]
    published = api.post("/api/manifests",
                         json={"name": "q2.json", "manifest": one_variant(ladder_dir, QUANT)})
    assert published.status_code == 201, published.text
    by_hand = Path(fleet.config.model_dir) / "copied.json"  # put there by an operator by hand
    by_hand.write_bytes((ladder_dir / "manifest.json").read_bytes())
    for name in ("q2.json", "copied.json"):
        body = httpx.get(f"{fleet.url}/files/{name}", timeout=10).content
        signature = httpx.get(f"{fleet.url}/files/{name}.sig", timeout=10)
        assert signature.status_code == 200
        verify_manifest(body, signature.text, key)
    by_hand.write_bytes(by_hand.read_bytes().replace(b'"quality": 1.0', b'"quality": 0.5'))
    edited = httpx.get(f"{fleet.url}/files/copied.json.sig", timeout=10).text
    verify_manifest(by_hand.read_bytes(), edited, key)  # signed as it is now, never a stale .sig
    (Path(fleet.config.model_dir) / "broken.json").write_text('{"schema": 1, "models": []}')
    assert httpx.get(f"{fleet.url}/files/broken.json.sig", timeout=10).status_code == 404


@pytest.fixture
def pinned_agent(tmp_path, broker, fleet, api, ladder_dir):
    """A daemon pinned to the controller's key, serving the controller's signed Q2_K manifest;
    set_manifest may name local files under ``allowed/`` only. Yields (daemon, observer)."""
    name = f"smollm2-135m-instruct.{QUANT}.gguf"
    link_into(Path(fleet.config.model_dir), ladder_dir / name)
    published = api.post("/api/manifests",
                         json={"name": "q2.json", "manifest": one_variant(ladder_dir, QUANT)})
    assert published.status_code == 201, published.text
    key = httpx.get(f"{fleet.url}/api/signing-key", timeout=10).json()["public_key"]
    observer = Observer(broker.host, broker.port)
    for topic in (f"{BASE}/cmd/result", f"{BASE}/reply/+", f"{BASE}/events", f"{BASE}/meta"):
        observer.subscribe(topic)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    daemon = RunningDaemon(tmp_path / "agent", broker, ladder_dir,
                           model={"manifest": f"{fleet.url}/files/q2.json", "pin": None,
                                  "manifest_dir": str(allowed)},
                           signing={"public_key": key}).start()
    try:
        wait_ready(daemon)
        yield daemon, observer, allowed, fleet.url
    finally:
        daemon.close()
        observer.close()


def test_agent_pinned_to_the_controller_loads_its_manifest_and_refuses_others(
        pinned_agent, ladder_dir, tmp_path) -> None:
    daemon, observer, allowed, fleet_url = pinned_agent
    meta = json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/meta"
                                        and json.loads(m.payload)["selection"], 60).payload)
    assert meta["selection"]["quant"] == QUANT  # the controller-signed manifest was accepted
    assert meta["signing"]["required"] is True and meta["signing"]["allow_unsigned"] is False
    assert meta["signing"]["key_id"]

    # No `signing.required` in the config: a pinned key alone makes signatures mandatory.
    other = "smollm2-135m-instruct.Q4_K_M.gguf"
    link_into(allowed, ladder_dir / other)  # so each manifest below would really load
    unsigned = allowed / "unsigned.json"
    unsigned.write_text(json.dumps(one_variant(ladder_dir, "Q4_K_M")))
    foreign = allowed / "foreign.json"  # signed, but not by the controller
    foreign.write_text(json.dumps(one_variant(ladder_dir, "Q4_K_M")))
    sign_file(foreign, TEST_PRIVATE_KEY)
    tampered = allowed / "tampered.json"  # the controller's signature over other bytes
    tampered.write_text(json.dumps(one_variant(ladder_dir, "Q4_K_M")))
    signature = httpx.get(f"{fleet_url}/files/q2.json.sig", timeout=10).text
    Path(f"{tampered}.sig").write_text(signature)
    for source in (unsigned, foreign, tampered):
        result = command(observer, "set_manifest", source=str(source))
        assert result["ok"] is False, (source.name, result)
        assert result["error"]["code"] == "bad_signature", (source.name, result)
    reply = ask(observer)
    assert "error" not in reply, reply  # the old model keeps serving
    assert command(observer, "select")["result"]["quant"] == QUANT  # and the old manifest stays set


def test_set_manifest_refuses_local_files_outside_the_manifest_dir(pinned_agent, tmp_path) -> None:
    daemon, observer, allowed, _ = pinned_agent
    secret = f"secret-{uuid.uuid4().hex}"
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"schema": secret}))  # an error that quoted it would leak it
    (allowed / "escape.json").symlink_to(outside)
    passwd_line = Path("/etc/passwd").read_text().splitlines()[0]
    sources = ["/etc/passwd", str(outside), str(allowed / ".." / "outside.json"),
               str(allowed / "escape.json"), "file:///etc/passwd"]
    for source in sources:
        result = command(observer, "set_manifest", source=source)
        assert result["ok"] is False and result["error"]["code"] == "bad_request", (source, result)
    said = b"".join(m.payload for m in observer.messages)
    assert secret.encode() not in said and passwd_line.encode() not in said
    assert secret not in daemon.log_path.read_text()
    assert "error" not in ask(observer)


def test_unsigned_opt_out_is_logged_and_shown_in_meta(tmp_path, broker, ladder_dir) -> None:
    observer = Observer(broker.host, broker.port)
    observer.subscribe(f"{BASE}/meta")
    daemon = RunningDaemon(tmp_path / "agent", broker, ladder_dir,
                           model={"manifest": None, "pin": None},
                           signing={"public_key": None, "allow_unsigned": True}).start()
    try:
        meta = json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/meta", 60).payload)
        assert meta["signing"] == {"required": False, "allow_unsigned": True, "key_id": None}
        warnings = [json.loads(line) for line in daemon.log_path.read_text().splitlines()
                    if line.startswith("{") and '"manifest_signatures_off"' in line]
        assert warnings and warnings[0]["level"] == "warning"
    finally:
        daemon.close()
        observer.close()
