"""Rollout benchmark: how long a health-gated rollout takes at a given rate against what the
rate alone allows, with a fixed rate and with a ramp, and what an abort on evidence stops and
rolls back. A benchmark, not a test: it prints a table and writes JSON, and fails on nothing.

    ~/.cache/edge-agent/venv/bin/python scripts/bench_rollout.py [--devices 200]
        [--json artifacts/bench_rollout.json]

Mosquitto (a process), one controller (``FleetService``, SQLite, in this process) and the
simulated devices of scripts/simulate_fleet.py (in this process, telemetry every 5 s) on this
machine, on the real clock. Every device goes through the whole gate: set_manifest, ready with
the manifest's sha256, a canary prompt answered, ``soak_s`` healthy. ``ideal_s`` is what the
pacing alone needs until the last device is started, plus one device's gate (its soak);
``ratio`` = measured / ideal. The abort scenario makes a share of the devices fail their
set_manifest and reports the decision the rollout took and why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import httpx
from bench_fleet import free_port, start_broker
from simulate_fleet import SimulatedFleet

from agent.config import FleetAuthConfig, FleetConfig, MQTTConfig
from agent.fleet.auth import hash_secret
from agent.fleet.rollout import RolloutSpec, start_rate
from agent.fleet.service import FleetService
from agent.log import configure_logging

ARTIFACTS = Path(os.environ.get("EDGE_AGENT_ARTIFACTS", REPO / "artifacts"))
SOAK_S = 2.0
MANIFEST = {
    "schema": 1,
    "models": [
        {
            "id": "smollm2-135m-instruct",
            "variants": [
                {
                    "quant": "Q2_K",
                    "file": "smollm2-135m-instruct.Q2_K.gguf",
                    "size": 88 * 1024**2,
                    "sha256": "2" * 64,
                    "quality": 0.9,
                }
            ],
        }
    ],
}


def ideal_s(spec: dict, devices: int) -> float:
    """Pacing alone: the starts' intervals (the ramp applied as devices succeed at once after
    their soak), plus the last device's soak."""
    rollout = RolloutSpec(**{**spec, "manifest": "m.json"})
    elapsed, succeeded_at = 0.0, []
    for index in range(devices):
        succeeded = sum(1 for t in succeeded_at if t <= elapsed)
        if index:
            elapsed += 60.0 / start_rate(rollout, succeeded)
        succeeded_at.append(elapsed + SOAK_S)
    return elapsed + SOAK_S


def run_one(api: httpx.Client, spec: dict, timeout_s: float) -> dict:
    started = time.monotonic()
    rollout = api.post("/api/rollouts", json={**spec, "manifest": "next.json"}).json()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        found = api.get(f"/api/rollouts/{rollout['id']}").json()
        if found["state"] in ("completed", "aborted", "rolled_back"):
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    events = api.get(f"/api/rollouts/{rollout['id']}/events", params={"limit": 1000}).json()
    abort = next((e for e in events["events"] if e["decision"] == "abort"), None)
    return {
        "state": found["state"],
        "seconds": round(elapsed, 2),
        "succeeded": found["succeeded"],
        "failed": found["failed"],
        "finished": found["finished"],
        "rolled_back": found["counts"].get("rolled_back", 0),
        "skipped": found["counts"].get("skipped", 0),
        "abort_reason": abort["reason"] if abort else None,
        "rollout": rollout["id"],
    }


def run(devices: int = 200) -> dict:
    configure_logging("warning")
    workdir = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    broker, mqtt_port = start_broker(workdir)
    token = secrets.token_urlsafe(24)
    config = FleetConfig(
        controller_id="bench-rollout",
        mqtt=MQTTConfig(host="127.0.0.1", port=mqtt_port),
        http_port=free_port(),
        db_path=str(workdir / "fleet.db"),
        model_dir=str(workdir / "models"),
        telemetry_sample_s=0.0,
        auth=FleetAuthConfig(
            admin_password_hash=hash_secret("unused-password-bench"),
            api_token_hashes=[hash_secret(token, method="pbkdf2_sha256")],
        ),
    )
    service = FleetService(config).start()
    (workdir / "models" / "next.json").write_text(json.dumps(MANIFEST))
    results: dict = {"devices": devices, "soak_s": SOAK_S, "scenarios": []}
    fleets = []
    try:
        service.controller.mqtt.wait_connected(10)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=service.url, headers=headers, timeout=60) as api:
            scenarios = [
                ("fixed 600/min", {"rate_per_min": 600}, 0.0),
                (
                    "ramp 60→1200/min ×2 every 10",
                    {"base_rate": 60, "increment_factor": 2, "ramp_every": 10, "max_rate": 1200},
                    0.0,
                ),
                (
                    "abort: 10 % fail, >5 % of ≥20",
                    {"rate_per_min": 600, "abort_percent": 5, "min_devices": 20},
                    0.10,
                ),
            ]
            for index, (name, pacing, failing) in enumerate(scenarios):
                fleet = SimulatedFleet(
                    "127.0.0.1",
                    mqtt_port,
                    devices,
                    interval_s=5.0,
                    id_prefix=f"s{index}",
                    seed=index + 1,
                ).start()
                fleets.append(fleet)
                for device in random.Random(index).sample(
                    fleet.devices, math.ceil(devices * failing)
                ):
                    device.fail_commands = True
                deadline = time.monotonic() + 60
                while (
                    time.monotonic() < deadline
                    and sum(
                        d.id.startswith(f"s{index}-")
                        for d in service.controller.registry.snapshot()
                    )
                    < devices
                ):
                    time.sleep(0.1)
                spec = {"group": f"s{index}-*", "soak_s": SOAK_S, **pacing}
                measured = run_one(api, spec, timeout_s=600)
                ideal = ideal_s({k: v for k, v in spec.items() if k != "group"}, devices)
                results["scenarios"].append(
                    {
                        "name": name,
                        "spec": spec,
                        **measured,
                        "ideal_s": round(ideal, 2) if not failing else None,
                        "ratio": round(measured["seconds"] / ideal, 2) if not failing else None,
                    }
                )
                fleet.stop()
    finally:
        for fleet in fleets:
            fleet.stop()
        service.stop()
        broker.terminate()
        broker.wait(10)
    return results


def render_table(result: dict) -> str:
    lines = [
        (
            f"Rollouts: {result['devices']} simulated devices each, soak {result['soak_s']:g} s, "
            "health gate on every device"
        ),
        (
            f"{'scenario':34} {'state':10} {'s':>7} {'ideal s':>8} {'ratio':>6} "
            f"{'ok':>4} {'fail':>4} {'rolled back':>11} {'skipped':>7}"
        ),
    ]
    for s in result["scenarios"]:
        ratio = f"{s['ratio']:.2f}" if s["ratio"] is not None else "-"
        ideal = f"{s['ideal_s']:.1f}" if s["ideal_s"] is not None else "-"
        lines.append(
            f"{s['name']:34} {s['state']:10} {s['seconds']:7.1f} {ideal:>8} {ratio:>6} "
            f"{s['succeeded']:4d} {s['failed']:4d} {s['rolled_back']:11d} {s['skipped']:7d}"
        )
        if s["abort_reason"]:
            lines.append(f"  abort: {s['abort_reason']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--json", type=Path, default=ARTIFACTS / "bench_rollout.json")
    args = parser.parse_args()
    result = run(devices=args.devices)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(render_table(result))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
