"""What a device runs (agent.buildinfo) reaches its retained meta, the controller's device
page and /metrics, from a real daemon through a real broker and controller."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
import msgspec

from agent.buildinfo import BUILD_FILE, build_info, read_record
from tests.fleet.conftest import wait_for
from tests.support.daemon import DEVICE, RunningDaemon, wait_ready


def test_meta_device_page_and_metrics_show_the_build(broker, fleet, api, credentials,
                                                     ladder_dir, tmp_path: Path) -> None:
    expected = msgspec.to_builtins(build_info())  # the daemon runs from this same venv
    assert expected["agent_version"] and expected["llama_cpp_python"]
    record = read_record(Path(sys.prefix) / BUILD_FILE)  # written by scripts/setup
    if record is not None:
        assert expected["engine_key"] == record.build_key
        assert expected["cmake_args"] == record.cmake_args
    daemon = RunningDaemon(tmp_path / "agent", broker, ladder_dir, model={"pin": "Q2_K"}).start()
    try:
        wait_ready(daemon)
        device = wait_for(
            lambda: (d := api.get(f"/api/devices/{DEVICE}")).status_code == 200
            and d.json()["meta"].get("build") and d.json(), 30, "the device's meta")
        assert device["meta"]["build"] == expected

        with httpx.Client(base_url=fleet.url, timeout=30) as browser:
            login = browser.get("/login")
            token = re.search(r'name="login_token" value="([^"]+)"', login.text)[1]
            browser.post("/login", data={"secret": credentials.password, "login_token": token})
            page = browser.get(f"/devices/{DEVICE}").text
        assert f"llama-cpp-python {expected['llama_cpp_python']}" in page
        assert (expected["engine_key"] or "not recorded") in page

        metrics = api.get("/metrics").text
        line = next(m for m in metrics.splitlines() if m.startswith("edge_device_build_info{"))
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line))
        assert labels["device"] == DEVICE
        assert labels["agent_version"] == expected["agent_version"]
        assert labels["llama_cpp_python"] == expected["llama_cpp_python"]
        assert labels["engine_key"] == (expected["engine_key"] or "")
        assert line.endswith(" 1.0")
        fleet_line = next(m for m in metrics.splitlines()
                          if m.startswith("edge_fleet_devices_by_build{"))
        assert f'agent_version="{expected["agent_version"]}"' in fleet_line
        assert fleet_line.endswith(" 1.0")
    finally:
        daemon.close()
