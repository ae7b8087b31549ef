"""A health-gated rollout on real agents: `edge-agent run` processes with the real ladder
model, on a real broker, driven by a real controller. Each agent must come up ready with the
new variant's sha256, answer the controller's canary prompt with the real model, and stay
healthy for the soak before it counts; a rollback puts each back on its old variant.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fleet.conftest import wait_for
from tests.support.daemon import EDGE_AGENT

AGENTS = ("real-rollout-1", "real-rollout-2")


def ladder_subset(ladder_dir: Path, quants: list[str]) -> dict:
    manifest = json.loads((ladder_dir / "manifest.json").read_text())
    for model in manifest["models"]:
        model["variants"] = [v for v in model["variants"] if v["quant"] in quants]
    return manifest


@pytest.fixture
def agents(tmp_path, broker, fleet, ladder_dir):
    """Two agents on a Q4_K_M-only manifest the controller hosts (and signs)."""
    models = Path(fleet.config.model_dir)
    for quant in ("Q4_K_M", "Q2_K"):
        name = f"smollm2-135m-instruct.{quant}.gguf"
        (models / name).symlink_to(ladder_dir / name)
    (models / "ladder-q4.json").write_text(json.dumps(ladder_subset(ladder_dir, ["Q4_K_M"])))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    processes = []
    for device_id in AGENTS:
        config = {
            "device_id": device_id,
            "state_dir": str(tmp_path / device_id / "state"),
            "cache_dir": str(tmp_path / device_id / "models"),
            "mqtt": {"host": broker.host, "port": broker.port, "will_delay_s": 1},
            "model": {"manifest": f"{fleet.url}/files/ladder-q4.json"},
            "signing": {"public_key": fleet.controller.signing_key.public_key},
            "runtime": {"default_max_tokens": 16},
            "telemetry": {"interval_s": 1.0},
            "log": {"json": True, "level": "info"},
        }
        path = tmp_path / f"{device_id}.yaml"
        path.write_text(yaml.safe_dump(config))
        with open(tmp_path / f"{device_id}.log", "ab") as log:  # the child keeps its copy
            process = subprocess.Popen(
                [EDGE_AGENT, "run", "--config", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        process.log_path = tmp_path / f"{device_id}.log"
        processes.append(process)
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_rollout_on_real_agents_passes_the_health_gate_and_rolls_back(
    api, fleet, agents, ladder_dir
):
    def devices() -> dict[str, dict]:
        return {d["id"]: d for d in api.get("/api/devices").json()["devices"]}

    def logs() -> str:
        return "\n".join(p.log_path.read_text()[-2000:] for p in agents)

    try:
        wait_for(
            lambda: all(
                devices().get(a, {}).get("state") == "ready"
                and devices()[a].get("quant") == "Q4_K_M"
                for a in AGENTS
            ),
            timeout_s=180,
            what="both agents ready on Q4_K_M",
        )
    except AssertionError:
        raise AssertionError(f"agents not ready: {logs()}") from None
    q2 = ladder_subset(ladder_dir, ["Q2_K"])
    q2_sha256 = q2["models"][0]["variants"][0]["sha256"]
    assert api.post("/api/manifests", json={"name": "ladder-q2.json", "manifest": q2}).is_success
    started = api.post(
        "/api/rollouts",
        json={
            "manifest": "ladder-q2.json",
            "group": "real-rollout-*",
            "rate_per_min": 60,
            "soak_s": 2,
            "device_timeout_s": 300,
        },
    )
    assert started.status_code == 201, started.text
    rollout_id = started.json()["id"]
    assert started.json()["expect"] == {"sha256": [q2_sha256]}
    try:
        final = wait_for(
            lambda: (
                (r := api.get(f"/api/rollouts/{rollout_id}").json())["state"]
                in ("completed", "aborted")
                and r
            ),
            timeout_s=300,
            what="the rollout to finish",
        )
    except AssertionError:
        shown = api.get(f"/api/rollouts/{rollout_id}").json()
        raise AssertionError(f"{json.dumps(shown)[:3000]}\n{logs()}") from None
    assert final["state"] == "completed", final
    assert {d["state"] for d in final["devices"]} == {"done"}
    events = api.get(f"/api/rollouts/{rollout_id}/events", params={"limit": 1000}).json()["events"]
    for decision in ("switched", "healthy", "canary", "success"):
        assert sorted(e["device_id"] for e in events if e["decision"] == decision) == list(
            AGENTS
        ), decision
    # What the gate read: each agent's own meta says it serves the new variant's file.
    for device_id in AGENTS:
        meta = fleet.controller.registry.devices[device_id].meta
        assert meta["selection"]["sha256"] == q2_sha256

    back = api.post(f"/api/rollouts/{rollout_id}/rollback").json()
    assert back["state"] == "rolling_back"
    wait_for(
        lambda: api.get(f"/api/rollouts/{rollout_id}").json()["state"] == "rolled_back",
        timeout_s=300,
        what="the rollback",
    )
    wait_for(
        lambda: {devices()[a].get("quant") for a in AGENTS} == {"Q4_K_M"},
        timeout_s=60,
        what="both agents back on Q4_K_M",
    )
