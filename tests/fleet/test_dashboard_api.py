"""The dashboard's server side on a real controller with simulated devices: the fleet table
paged, sorted and filtered by GET /api/devices (bounded, the inventory grammar), the fleet
chart's history, and events that carry their sentence."""

from __future__ import annotations

from tests.fleet.conftest import wait_for


def test_the_fleet_table_is_paged_sorted_and_filtered_on_the_controller(api, sim):
    devices = sim(12, interval_s=0.5)
    wait_for(lambda: api.get("/api/devices").json()["total"] == 12, what="12 devices")
    pages = [
        api.get("/api/devices", params={"per_page": 5, "page": n, "sort": "id", "order": "desc"})
        .json() for n in (1, 2, 3)
    ]
    assert [p["pages"] for p in pages] == [3, 3, 3]
    seen = [row["id"] for p in pages for row in p["devices"]]
    assert seen == sorted((d.id for d in devices.devices), reverse=True)

    big = {d.id for d in devices.devices if d.board[4] >= 16}
    answer = api.get("/api/devices", params={"filter": "ram_gib>=16"}).json()
    assert {row["id"] for row in answer["devices"]} == big
    assert answer["summary"]["devices"] == 12  # the counters stay the whole fleet's

    bad = api.get("/api/devices", params={"filter": "ram_gib>=lots"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_filter"
    for params in ({"per_page": 100_000}, {"page": 0}, {"sort": "meta"}, {"colour": "red"}):
        refused = api.get("/api/devices", params=params)
        assert refused.status_code == 400, params
        assert refused.json()["error"]["code"] == "bad_request"


def test_the_fleet_chart_counts_every_device_and_sums_its_tok_s(api, sim):
    devices = sim(6, interval_s=0.5)

    def latest():
        buckets = api.get("/api/fleet/history", params={"window_s": 600}).json()["buckets"]
        complete = buckets and sum(buckets[-1]["counts"].values()) == len(devices.devices)
        return complete and buckets[-1]

    bucket = wait_for(latest, timeout_s=20, what="every device in the chart's latest bucket")
    assert bucket["counts"].get("ready") == len(devices.devices)
    assert bucket["decode_tps"] > 0
    assert api.get("/api/fleet/history", params={"window_s": "week"}).status_code == 400


def test_events_carry_their_sentence(api, sim):
    devices = sim(1, interval_s=0.5)
    device = devices.devices[0].id
    wait_for(lambda: api.get("/api/devices").json()["total"] == 1, what="the device")
    api.post(f"/api/devices/{device}/cmd", json={"op": "set_manifest",
                                                 "args": {"source": "http://127.0.0.1:9/x.json"}})
    events = wait_for(
        lambda: [e for e in api.get(f"/api/devices/{device}/events").json()["events"]
                 if e["kind"] == "download"],
        what="download events",
    )
    assert all(e["text"].startswith(("Downloading", "Downloaded", "Download")) for e in events)


def test_the_shell_client_pages_through_a_fleet_larger_than_one_page(fleet, sim, credentials):
    from agent.fleet.client import FleetClient

    devices = sim(1100, interval_s=5.0, per_connection=550, batched_telemetry=True)
    wait_for(lambda: len(fleet.controller.registry.devices) == 1100, timeout_s=60,
             what="1100 devices")
    listing = FleetClient(fleet.url, credentials.token).devices()
    assert [row["id"] for row in listing["devices"]] == [d.id for d in devices.devices]


def test_the_fleet_charts_cache_stays_bounded_whatever_windows_are_asked(api, fleet):
    from agent.fleet import web

    windows = range(60, 60 + 4 * web.HISTORY_CACHE_ENTRIES)
    for window_s in windows:
        assert api.get("/api/fleet/history", params={"window_s": window_s}).status_code == 200
    assert len(fleet.web.devices._history) <= web.HISTORY_CACHE_ENTRIES
    assert windows[-1] in fleet.web.devices._history  # the newest answer is the one kept
