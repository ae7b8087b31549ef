"""Two controllers (real `edge-agent fleet serve` processes) on one Mosquitto and one real
PostgreSQL, fed by the simulator: one fleet whichever controller is asked.

They split telemetry and events through shared subscriptions, so neither holds all of it in
memory; the registry does. The test proves: identical device lists and complete charts from
both APIs, a login made on one valid on the other, and a rollout whose driver is killed
finished by the other after the lease runs out.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml

from tests.fleet.conftest import wait_for
from tests.support.broker import free_port
from tests.support.observer import Observer
from tests.support.range_server import RangeServer

DEVICES = 4
LEASE_S = 2.0
# What the rollout sends: the simulated devices read its variant's sha256 and report it.
NEXT_MANIFEST = {
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


class Controller:
    def __init__(self, name: str, tmp_path: Path, broker, registry_url: str, credentials) -> None:
        self.name = f"ctl-{name}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp_path / f"{name}.yaml"
        shared = tmp_path / "shared"  # what a real deployment shares: served files, the key
        config.write_text(
            yaml.safe_dump(
                {
                    "controller_id": self.name,
                    "mqtt": {"host": broker.host, "port": broker.port},
                    "http_port": self.port,
                    "db_path": str(tmp_path / name / "unused.db"),
                    "registry": {"url": registry_url},
                    "model_dir": str(shared / "models"),
                    "signing_key_file": str(shared / "signing.key"),
                    "telemetry_sample_s": 0.0,
                    "ingest_flush_s": 0.1,
                    "default_telemetry_interval_s": 0.5,
                    "rollout_lease_s": LEASE_S,
                    "auth": {
                        "admin_password_hash": credentials.password_hash,
                        "api_token_hashes": [credentials.token_hash],
                    },
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        self.log = open(tmp_path / f"{name}.log", "wb")
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("edge-agent")),
                "fleet",
                "serve",
                "--config",
                str(config),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.api = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {credentials.token}"}, timeout=30
        )

    def healthy(self) -> bool:
        try:
            return bool(self.api.get("/api/health").json()["mqtt_connected"])
        except httpx.HTTPError:
            return False

    def devices(self) -> list[tuple[str, str]]:
        return sorted((d["id"], d["state"]) for d in self.api.get("/api/devices").json()["devices"])

    def chart(self, device_id: str) -> set[float]:
        points = self.api.get(f"/api/devices/{device_id}/telemetry").json()["points"]
        return {p["ts"] for p in points}

    def stop(self) -> None:
        self.api.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


@pytest.fixture
def controllers(tmp_path, broker, postgres, credentials):
    url = postgres.fresh_database()
    started = [Controller(name, tmp_path, broker, url, credentials) for name in ("a", "b")]
    try:
        for controller in started:
            wait_for(controller.healthy, timeout_s=30, what=f"{controller.name} healthy")
        yield started, url
    finally:
        for controller in started:
            controller.stop()


def test_two_controllers_serve_one_fleet(controllers, sim, broker, credentials, tmp_path, request):
    (a, b), registry_url = controllers
    observer = Observer(broker.host, broker.port)
    observer.subscribe("edge/v1/+/telemetry")  # every message, as neither controller gets them
    sim(DEVICES, interval_s=0.5)

    # Identical device lists from both APIs.
    wait_for(
        lambda: len(a.devices()) == DEVICES and a.devices() == b.devices(),
        timeout_s=20,
        what="both controllers list every device alike",
    )

    # Complete charts from both: every telemetry point any device sent, whichever controller
    # took it from the shared subscription.
    device = a.devices()[0][0]
    topic = f"edge/v1/{device}/telemetry"
    wait_for(lambda: len(observer.on(topic)) >= 6, what="a few points from one device")
    sent = {json.loads(m.payload)["ts"] for m in observer.on(topic)}
    wait_for(
        lambda: sent <= a.chart(device) and sent <= b.chart(device),
        timeout_s=20,
        what="every point sent, in both controllers' charts",
    )
    observer.close()

    # A login made on one is valid on the other.
    with httpx.Client(base_url=a.url) as on_a, httpx.Client(base_url=b.url) as on_b:
        login = on_a.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', login.text).group(1)
        done = on_a.post(
            "/login",
            data={"secret": credentials.password, "login_token": token},
            follow_redirects=False,
        )
        assert done.status_code == 303
        assert on_b.get("/api/devices").status_code == 401  # no cookie yet: refused
        on_b.cookies.set("edge_fleet_session", on_a.cookies["edge_fleet_session"])
        assert on_b.get("/api/devices").status_code == 200
        page = on_b.get("/", follow_redirects=False)
        assert page.status_code == 200 and "csrf" in page.text

    # A rollout survives the death of the controller driving it. Its manifest is on a mirror
    # (a URL): a manifest hosted by the controller that dies would die with it.
    mirror_root = tmp_path / "mirror"
    mirror_root.mkdir()
    (mirror_root / "next.json").write_text(json.dumps(NEXT_MANIFEST))
    mirror = RangeServer(mirror_root).start()
    request.addfinalizer(mirror.stop)
    rollout = a.api.post(
        "/api/rollouts",
        json={"manifest": f"{mirror.url}/next.json", "group": "*", "rate_per_min": 30,
              "soak_s": 0},
    ).json()

    def lease_owner() -> str | None:
        with psycopg.connect(registry_url) as conn:
            row = conn.execute(
                "SELECT lease_owner FROM rollouts WHERE id=%s", (rollout["id"],)
            ).fetchone()
        return row[0] if row else None

    def done_steps(controller: Controller) -> int:
        found = controller.api.get(f"/api/rollouts/{rollout['id']}")
        return found.json()["counts"].get("done", 0) if found.status_code == 200 else 0

    driver_name = wait_for(lease_owner, what="a controller to take the rollout's lease")
    driver, other = (a, b) if driver_name == a.name else (b, a)
    wait_for(lambda: done_steps(other) >= 1, timeout_s=30, what="the first device done")
    assert done_steps(other) < DEVICES  # still under way when its driver dies
    driver.process.kill()
    driver.process.wait(10)
    finished = wait_for(
        lambda: (
            (r := other.api.get(f"/api/rollouts/{rollout['id']}").json())["state"] == "completed"
            and r
        ),
        timeout_s=60,
        what="the other controller to take the rollout over and finish it",
    )
    assert [d["state"] for d in finished["devices"]] == ["done"] * DEVICES
    assert lease_owner() in (other.name, None)
    # One driver at a time: each device was started once, by whichever drove it then, and
    # passed the health gate once; the takeover is a decision of its own.
    events = other.api.get(
        f"/api/rollouts/{rollout['id']}/events", params={"limit": 1000}
    ).json()["events"]
    for decision in ("start", "healthy", "success"):
        assert sorted(e["device_id"] for e in events if e["decision"] == decision) == sorted(
            d["device_id"] for d in finished["devices"]
        ), decision
    assert f"controller {other.name} drives the rollout" in [
        e["reason"] for e in events if e["decision"] == "resume"
    ]
