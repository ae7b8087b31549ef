"""The JSON API, login/CSRF, /metrics and model hosting against a real controller."""

from __future__ import annotations

import hashlib
import json
import re

import httpx
import pytest

from tests.fleet.conftest import BOTH_REGISTRIES, wait_for

pytestmark = BOTH_REGISTRIES


def manifest_for(path, quant: str) -> dict:
    data = path.read_bytes()
    return {
        "schema": 1,
        "models": [
            {
                "id": "smollm2-135m-instruct",
                "family": "llama",
                "variants": [
                    {
                        "quant": quant,
                        "file": path.name,
                        "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "quality": 0.9,
                    }
                ],
            }
        ],
    }


def test_everything_needs_a_token_or_a_session(fleet):
    with httpx.Client(base_url=fleet.url) as anonymous:
        assert anonymous.get("/api/devices").status_code == 401
        assert anonymous.get("/api/devices").json()["error"]["code"] == "unauthorized"
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.post("/api/devices/x/cmd", json={"op": "drain"}).status_code == 401
        page = anonymous.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        assert anonymous.get("/api/health").json()["ok"] is True
    with httpx.Client(base_url=fleet.url, headers={"Authorization": "Bearer wrong"}) as wrong:
        assert wrong.get("/api/devices").status_code == 401


def test_login_session_and_csrf(fleet, credentials, sim):
    sim(1)
    with httpx.Client(base_url=fleet.url) as browser:
        login = browser.get("/login")
        login_token = re.search(r'name="login_token" value="([^"]+)"', login.text).group(1)
        refused = browser.post("/login", data={"secret": "nope", "login_token": login_token})
        assert refused.status_code == 401
        forged = browser.post(
            "/login", data={"secret": credentials.password, "login_token": "forged"}
        )
        assert forged.status_code == 403
        ok = browser.post(
            "/login",
            data={"secret": credentials.password, "login_token": login_token},
            follow_redirects=False,
        )
        assert ok.status_code == 303
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        page = browser.get("/")
        assert page.status_code == 200
        csrf = re.search(r'name="csrf" content="([^"]+)"', page.text).group(1)
        device = wait_for(lambda: browser.get("/api/devices").json()["devices"], what="a device")[
            0
        ]["id"]
        # a session POST without the CSRF token is refused, with it accepted
        no_csrf = browser.post(f"/api/devices/{device}/cmd", json={"op": "drain", "wait_s": 0})
        assert no_csrf.status_code == 403 and no_csrf.json()["error"]["code"] == "csrf_failed"
        with_csrf = browser.post(
            f"/api/devices/{device}/cmd",
            json={"op": "drain", "wait_s": 5},
            headers={"X-CSRF-Token": csrf},
        )
        assert with_csrf.status_code == 200 and with_csrf.json()["ok"] is True


def test_prompt_streams_ndjson_chunks_then_one_final(api, sim):
    devices = sim(1)
    device = devices.devices[0].id
    wait_for(lambda: api.get("/api/devices").json()["devices"], what="the device")
    records = []
    with api.stream(
        "POST",
        f"/api/devices/{device}/prompt",
        json={"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16},
    ) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        for line in response.iter_lines():
            records.append(json.loads(line))
    chunks, final = records[:-1], records[-1]
    assert len(chunks) >= 3 and all("delta" in c for c in chunks)
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert final["done"] is True and final["text"] == "".join(c["delta"] for c in chunks)


def test_prompt_validation_happens_before_publishing(api, sim):
    device = sim(1).devices[0].id
    wait_for(lambda: api.get("/api/devices").json()["devices"], what="the device")
    response = api.post(f"/api/devices/{device}/prompt", json={"prompt": "x", "top_p": 7})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "bad_request" and error["message"].startswith("top_p: ")
    assert api.post("/api/devices/nobody/prompt", json={"prompt": "x"}).status_code == 404


def test_commands_wait_for_cmd_result_and_bad_ops_are_refused(api, sim, fleet):
    device = sim(1).devices[0].id
    wait_for(lambda: api.get("/api/devices").json()["devices"], what="the device")
    bench = api.post(f"/api/devices/{device}/cmd", json={"op": "bench", "wait_s": 10}).json()
    assert bench["ok"] is True and bench["result"]["decode_tps"] > 0
    stored = wait_for(
        lambda: api.get(f"/api/commands/{bench['id']}").json()["ok"], what="the stored result"
    )
    assert stored is True
    unknown = api.post(f"/api/devices/{device}/cmd", json={"op": "format_disk"})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_op"
    bad_args = api.post(f"/api/devices/{device}/cmd", json={"op": "pin", "args": {"quant": 5}})
    assert bad_args.status_code == 400 and bad_args.json()["error"]["message"].startswith(
        "args.quant"
    )


def test_metrics_is_prometheus_text(api, sim):
    devices = sim(2)
    wait_for(
        lambda: api.get("/api/devices").json()["summary"]["counts"]["ready"] == 2, what="2 ready"
    )
    wait_for(
        lambda: all(d["decode_tps"] for d in api.get("/api/devices").json()["devices"]),
        what="telemetry",
    )
    text = api.get("/metrics").text
    assert "# TYPE edge_fleet_devices gauge" in text
    assert 'edge_fleet_devices{state="ready"} 2.0' in text
    first = devices.devices[0]
    assert re.search(rf'edge_device_decode_tokens_per_second{{device="{first.id}"}} \d+\.\d+', text)
    assert f'quant="{first.quant}"' in text
    buckets = [
        float(v)
        for v in re.findall(r'edge_fleet_telemetry_lag_seconds_bucket\{le="[^"]+"\} (\S+)', text)
    ]
    count = float(re.search(r"edge_fleet_telemetry_lag_seconds_count (\S+)", text).group(1))
    assert count > 0 and buckets == sorted(buckets) and buckets[-1] == count
    for line in text.splitlines():  # every sample line is `name{labels} number`
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? -?[0-9.e+-]+", line), line


def test_metrics_can_leave_out_the_per_device_series(fleet_config, credentials, sim):
    import msgspec

    from agent.fleet.service import FleetService

    config = msgspec.structs.replace(fleet_config, metrics_per_device=False)
    service = FleetService(config).start()
    try:
        sim(2)
        with httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {credentials.token}"}
        ) as client:
            wait_for(
                lambda: 'edge_fleet_devices{state="ready"} 2.0' in client.get("/metrics").text,
                what="2 ready devices in the fleet totals",
            )
            text = client.get("/metrics").text
    finally:
        service.stop()
    assert "edge_fleet_decode_tokens_per_second" in text
    assert "device=" not in text and "edge_device_" not in text


def test_files_are_served_with_range_etag_and_if_range(fleet, api, ladder_model, tmp_path):
    source = ladder_model("Q2_K")
    target = tmp_path / "models" / source.name
    target.write_bytes(source.read_bytes())
    size = target.stat().st_size
    with httpx.Client(base_url=fleet.url) as device:  # devices fetch without a token
        full = device.head(f"/files/{source.name}")
        assert full.status_code == 200 and int(full.headers["content-length"]) == size
        etag = full.headers["etag"]
        part = device.get(f"/files/{source.name}", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == source.read_bytes()[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{size}"
        resumed = device.get(
            f"/files/{source.name}", headers={"Range": "bytes=100-199", "If-Range": etag}
        )
        assert resumed.status_code == 206
        changed = device.get(
            f"/files/{source.name}", headers={"Range": "bytes=100-199", "If-Range": '"other"'}
        )
        assert changed.status_code == 200 and len(changed.content) == size
        assert device.get("/files/..%2Fetc%2Fpasswd").status_code == 404
        assert device.get("/files/.hidden").status_code == 404


def test_publish_manifest_validates(api, ladder_model):
    bad = api.post(
        "/api/manifests",
        json={"name": "x.json", "manifest": {"schema": 1, "models": [{"id": "m"}]}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    assert api.post("/api/manifests", json={"name": "../x.json", "manifest": {}}).status_code == 400
    good = api.post(
        "/api/manifests",
        json={"name": "q2.json", "manifest": manifest_for(ladder_model("Q2_K"), "Q2_K")},
    )
    assert good.status_code == 201 and good.json()["url"].endswith("/files/q2.json")
    listed = api.get("/api/manifests").json()["manifests"]
    assert [m["name"] for m in listed] == ["q2.json"]
    assert listed[0]["models"][0]["variants"][0]["quant"] == "Q2_K"


def test_rollout_switches_devices_at_a_rate_and_rolls_back(api, sim, ladder_model, fleet):
    devices = sim(3)
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 3, what="3 devices")
    original = {d.id: d.quant for d in devices.devices}
    assert "Q2_K" not in original.values()
    api.post(
        "/api/manifests",
        json={"name": "q2.json", "manifest": manifest_for(ladder_model("Q2_K"), "Q2_K")},
    )
    started = api.post(
        "/api/rollouts",
        json={
            "manifest": "q2.json",
            "group": "sim-*",
            "rate_per_min": 600,
            "abort_percent": 50,
            "soak_s": 0,
        },
    )
    assert started.status_code == 201, started.text
    rollout_id = started.json()["id"]
    done = wait_for(
        lambda: (r := api.get(f"/api/rollouts/{rollout_id}").json())["state"] == "completed" and r,
        timeout_s=20,
        what="rollout completed",
    )
    assert {d["state"] for d in done["devices"]} == {"done"}
    assert all(d["progress"] == 1.0 for d in done["devices"])
    wait_for(
        lambda: {d["quant"] for d in api.get("/api/devices").json()["devices"]} == {"Q2_K"},
        what="all Q2_K",
    )
    back = api.post(f"/api/rollouts/{rollout_id}/rollback").json()
    assert back["state"] == "rolling_back"
    back = wait_for(
        lambda: (
            (r := api.get(f"/api/rollouts/{rollout_id}").json())["state"] == "rolled_back" and r
        ),
        what="rolled back",
    )
    assert {d["state"] for d in back["devices"]} == {"rolled_back"}
    wait_for(
        lambda: (
            {d["id"]: d["quant"] for d in api.get("/api/devices").json()["devices"]} == original
        ),
        what="the quants from before the rollout",
    )


def test_rollout_aborts_past_the_failure_threshold(api, sim, ladder_model):
    devices = sim(4)
    for device in devices.devices[:2]:
        device.fail_commands = True
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 4, what="4 devices")
    api.post(
        "/api/manifests",
        json={"name": "q2.json", "manifest": manifest_for(ladder_model("Q2_K"), "Q2_K")},
    )
    rollout = api.post(
        "/api/rollouts",
        json={
            "manifest": "q2.json",
            "group": "*",
            "rate_per_min": 600,
            "abort_percent": 25,
            "min_devices": 1,  # the first failure is evidence enough here
            "soak_s": 0,
        },
    ).json()
    final = wait_for(
        lambda: (r := api.get(f"/api/rollouts/{rollout['id']}").json())["state"] == "aborted" and r,
        timeout_s=20,
        what="abort",
    )
    states = [d["state"] for d in final["devices"]]
    assert states[0] == "failed" and "skipped" in states and "done" not in states
    assert "failed" in final["reason"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"manifest": "nope.json", "group": "*"}, "manifest"),
        ({"manifest": "http://x/m.json", "group": "zzz*"}, "target"),
        ({"manifest": "http://x/m.json", "group": "*", "rate_per_min": 0}, "rate_per_min"),
    ],
)
def test_rollout_input_errors(api, sim, spec, message):
    sim(1)
    wait_for(lambda: api.get("/api/devices").json()["devices"], what="a device")
    response = api.post("/api/rollouts", json=spec)
    assert response.status_code == 400 and response.json()["error"]["message"].startswith(message)


def test_rollouts_are_restored_from_the_registry(api, sim, ladder_model, fleet):
    from agent.fleet.rollout import RolloutManager

    sim(2)
    wait_for(lambda: len(api.get("/api/devices").json()["devices"]) == 2, what="2 devices")
    api.post(
        "/api/manifests",
        json={"name": "q2.json", "manifest": manifest_for(ladder_model("Q2_K"), "Q2_K")},
    )
    rollout = api.post(
        "/api/rollouts",
        json={"manifest": "q2.json", "group": "*", "rate_per_min": 600, "soak_s": 0},
    ).json()
    wait_for(
        lambda: api.get(f"/api/rollouts/{rollout['id']}").json()["state"] == "completed",
        what="completed",
    )
    restarted = RolloutManager(
        fleet.controller
    )  # what a restarted controller builds from the same DB
    restarted.restore()
    again = restarted.get(rollout["id"])
    assert again.state == "completed" and [s.state for s in again.steps] == ["done", "done"]
    assert again.source == rollout["source"] and again.source.endswith("/files/q2.json")
    assert [s.previous for s in again.steps] == [d["previous"] for d in rollout["devices"]]


def test_prompt_as_server_sent_events_and_as_one_final_record(api, sim):
    device = sim(1).devices[0].id
    wait_for(lambda: api.get("/api/devices").json()["devices"], what="the device")
    body = {"prompt": "tell me", "max_tokens": 8}
    with api.stream(
        "POST", f"/api/devices/{device}/prompt", json=body, headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line]
    assert events[-1]["done"] is True and all("delta" in e for e in events[:-1])
    final = api.post(f"/api/devices/{device}/prompt", json={**body, "stream": False}).json()
    assert final["done"] is True and final["text"].startswith("simulated reply")
