"""Rollout plans (agent.fleet.plan): the controller runs the selector on what each device
reported, and real agents sent the manifest then choose what the plan said.

Devices differ the way real ones do: each agent probes its own fake root (a captured
/proc/cpuinfo of an AVX2 desktop or a Raspberry Pi 5, with /proc/meminfo giving it its memory),
so agents on this one machine have different budgets and profiles."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from agent.catalog.manifest import load_manifest
from agent.catalog.select import read_headers
from agent.errors import RequestError
from agent.fleet import schemas
from agent.fleet.plan import plan_devices
from agent.hardware.probe import probe
from tests.fleet.conftest import wait_for
from tests.support.daemon import RunningDaemon
from tests.support.range_server import link_into

FIXTURES = Path(__file__).resolve().parents[1] / "hardware" / "fixtures"
MIB = 1 << 20
# (device, captured root, MiB of memory): budgets picked so that, with the ladder, each gets
# another variant or context, and one gets nothing.
AGENTS = [
    ("plan-tight", "x86-avx2-desktop", 1180),  # under the 1 GiB headroom + the smallest need
    ("plan-small", "x86-avx2-desktop", 1250),
    ("plan-mid", "x86-avx2-desktop", 1300),
    ("plan-big", "x86-avx2-desktop", 3000),
    ("plan-pi", "raspberry-pi-5", 700),  # another profile: q8_0 KV, a 2048 target
]


def fake_root(where: Path, captured: str, mib: int) -> Path:
    """A captured device's /proc with ``mib`` of memory, all of it available."""
    root = where / f"{captured}-{mib}"
    (root / "proc").mkdir(parents=True)
    for path in (FIXTURES / captured / "proc").rglob("*"):
        if path.is_file():
            target = root / "proc" / path.relative_to(FIXTURES / captured / "proc")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    kib = mib * 1024
    (root / "proc" / "meminfo").write_text(
        f"MemTotal:       {kib} kB\nMemFree:        {kib} kB\nMemAvailable:   {kib} kB\n")
    return root


@dataclass
class Record:
    id: str
    state: str | None
    meta: dict[str, Any] = field(default_factory=dict)


def record_of(device_id: str, root: Path, **meta: Any) -> Record:
    """A device as the registry holds it: its probe in a meta that passed the schema."""
    body = {"probe": msgspec.to_builtins(probe(str(root))), **meta}
    return Record(device_id, "ready", schemas.validate("meta", body))


@pytest.fixture(scope="module")
def ladder(ladder_dir: Path):
    manifest = load_manifest(str(ladder_dir / "manifest.json"))
    return manifest, {model.id: read_headers(manifest, model) for model in manifest.models}


def test_plan_counts_variants_no_fit_and_unknown_probes(ladder, tmp_path):
    manifest, headers = ladder
    records = [record_of(name, fake_root(tmp_path, where, mib)) for name, where, mib in AGENTS]
    records.append(Record("plan-new", "starting", {}))  # no meta yet
    plan = plan_devices(manifest, headers, records)
    by_id = {device.device_id: device for device in plan.devices}
    assert [device.device_id for device in plan.devices] == [r.id for r in records]
    assert by_id["plan-tight"].verdict == "no_fit" and "budget" in by_id["plan-tight"].reason
    assert by_id["plan-new"].verdict == "unknown_probe"
    fitting = [d for d in plan.devices if d.verdict == "fits"]
    assert len(fitting) == 4
    assert all(d.ram_bytes <= d.budget_bytes for d in fitting)
    assert len({(d.quant, d.n_ctx) for d in fitting}) == 4  # the budgets were chosen for this
    assert by_id["plan-pi"].profile == "raspberry-pi-5" and by_id["plan-pi"].kv_type == "q8_0"
    assert plan.summary.devices == 6 and plan.summary.no_fit == 1
    assert plan.summary.unknown_probe == 1
    assert sum(plan.summary.by_variant.values()) == 4
    assert plan.summary.changes == 4  # none runs anything yet


def test_devices_with_the_same_inputs_get_the_same_plan(ladder, tmp_path):
    manifest, headers = ladder
    root = fake_root(tmp_path, "x86-avx2-desktop", 1300)
    running = {"selection": {"model_id": "smollm2-135m-instruct", "quant": "Q2_K", "n_ctx": 512}}
    records = [record_of("a", root), record_of("b", root, **running)]
    a, b = plan_devices(manifest, headers, records).devices
    assert (a.device_id, b.device_id) == ("a", "b")
    assert (a.quant, a.n_ctx, a.ram_bytes) == (b.quant, b.n_ctx, b.ram_bytes)
    assert b.current.quant == "Q2_K" and b.change and a.current.quant is None


def test_a_pin_plans_that_variant_or_no_fit(ladder, tmp_path):
    # The rollout's pin wins over the one the device reports; without one, the device's holds.
    manifest, headers = ladder
    small = record_of("small", fake_root(tmp_path, "x86-avx2-desktop", 1250))
    big = record_of("big", fake_root(tmp_path, "x86-avx2-desktop", 3000))
    plan = plan_devices(manifest, headers, [small, big], pin="F16")
    assert [(d.verdict, d.quant) for d in plan.devices] == [("no_fit", None), ("fits", "F16")]
    pinned_here = record_of("pinned", fake_root(tmp_path, "x86-avx2-desktop", 3001), pin="Q2_K")
    assert plan_devices(manifest, headers, [pinned_here]).devices[0].quant == "Q2_K"
    assert plan_devices(manifest, headers, [pinned_here], pin="Q8_0").devices[0].quant == "Q8_0"
    with pytest.raises(RequestError) as caught:
        plan_devices(manifest, headers, [big], pin="Q1_Z")
    assert caught.value.code == "bad_request" and "Q1_Z" in caught.value.message


def test_a_profile_this_controller_does_not_know_is_matched_from_the_probe(ladder, tmp_path):
    manifest, headers = ladder
    root = fake_root(tmp_path, "raspberry-pi-5", 700)
    known, unknown = plan_devices(manifest, headers, [
        record_of("known", root, profile={"name": "raspberry-pi-5", "reasons": []}),
        record_of("unknown", root, profile={"name": "from-a-newer-agent", "reasons": []}),
    ]).devices
    assert unknown.profile == known.profile == "raspberry-pi-5"
    assert (unknown.quant, unknown.n_ctx) == (known.quant, known.n_ctx)


# --- through the controller -----------------------------------------------------------------


@pytest.fixture
def hosted_ladder(fleet, api, ladder_dir: Path):
    """The ladder and its Q2_K alone, published by the controller (signed with its key), the
    GGUF files beside them in its model_dir. Returns the controller's public key."""
    manifest = json.loads((ladder_dir / "manifest.json").read_text())
    for variant in manifest["models"][0]["variants"]:
        link_into(Path(fleet.config.model_dir), ladder_dir / variant["file"])
    q2 = json.loads(json.dumps(manifest))
    q2["models"][0]["variants"] = [v for v in q2["models"][0]["variants"] if v["quant"] == "Q2_K"]
    for name, body in (("ladder.json", manifest), ("q2.json", q2)):
        published = api.post("/api/manifests", json={"name": name, "manifest": body})
        assert published.status_code == 201, published.text
    return httpx.get(f"{fleet.url}/api/signing-key", timeout=10).json()["public_key"]


def test_plan_matches_what_real_agents_then_choose(fleet, api, broker, ladder_dir, hosted_ladder,
                                                   tmp_path, monkeypatch):
    registry = fleet.controller.registry
    labels = {"site": "plan-test", "role": "bench"}
    daemons = []
    try:
        for name, captured, mib in AGENTS:
            monkeypatch.setenv("EDGE_AGENT_PROBE_ROOT", str(fake_root(tmp_path, captured, mib)))
            pin = "Q8_0" if name == "plan-big" else None
            daemons.append(RunningDaemon(
                tmp_path / name, broker, ladder_dir, device_id=name, labels=labels,
                model={"manifest": f"{fleet.url}/files/q2.json", "pin": pin, "n_threads": 1},
                signing={"public_key": hosted_ladder}).start())
        # Every agent has reported its probe (the tight one has no model: Q2_K does not fit;
        # nor has plan-big: its pin is not in q2.json).
        wait_for(lambda: all(registry.devices.get(name) and registry.devices[name].meta.get("probe")
                             for name, _, _ in AGENTS), 120, "every agent's meta")
        for name, _, _ in AGENTS:  # the labels in its config, as the controller stores them
            assert registry.devices[name].meta["labels"] == labels
        # plan-big's config pins a variant its first manifest lacks: its meta says so.
        assert registry.devices["plan-big"].meta["pin"] == "Q8_0"
        assert registry.devices["plan-small"].meta["pin"] is None

        answer = api.post("/api/rollouts", json={
            "manifest": "ladder.json", "filter": "label:site=plan-test", "dry_run": True})
        assert answer.status_code == 200, answer.text
        plan = answer.json()
        assert plan["dry_run"] is True and api.get("/api/rollouts").json()["rollouts"] == []
        assert plan["manifest"].endswith("/files/ladder.json")
        planned = {device["device_id"]: device for device in plan["devices"]}
        assert sorted(planned) == sorted(name for name, _, _ in AGENTS)
        assert plan["summary"]["no_fit"] == 1 and plan["summary"]["devices"] == len(AGENTS)
        assert planned["plan-big"]["quant"] == "Q8_0"  # 3 GiB would take F16 unpinned

        # Now each agent is sent the manifest, and chooses by itself.
        for name, _, _ in AGENTS:
            sent = api.post(f"/api/devices/{name}/cmd", json={
                "op": "set_manifest", "args": {"source": plan["manifest"]}, "wait_s": 240},
                timeout=300)
            assert sent.status_code == 200, sent.text
            result = sent.json()
            device = planned[name]
            if device["verdict"] == "no_fit":
                assert result["ok"] is False and result["error"]["code"] == "no_fit", result
                continue
            assert result["ok"] is True, result
            selection = wait_for(
                lambda name=name: _selection_from(registry, name, plan["manifest"]), 60,
                f"{name}'s new selection in its meta")
            chose = {key: selection[key] for key in ("quant", "n_ctx", "kv_type", "n_gpu_layers")}
            assert chose == {key: device[key] for key in chose}, (name, chose, device)
            assert selection["estimate"]["ram_bytes"] == device["ram_bytes"], name
    finally:
        for daemon in daemons:
            daemon.close()


def _selection_from(registry, device_id: str, manifest_url: str) -> dict | None:
    selection = registry.devices[device_id].meta.get("selection") or {}
    return selection if selection.get("manifest_url") == manifest_url else None


def test_dry_run_refuses_a_bad_filter_and_a_bad_flag(api, hosted_ladder):
    for body, code in (
        ({"manifest": "ladder.json", "filter": "ram_gib>=lots", "dry_run": True}, "bad_filter"),
        ({"manifest": "ladder.json", "filter": "(" * 40 + "id=a", "dry_run": True}, "bad_filter"),
        ({"manifest": "ladder.json", "filter": "id=" + "a" * 1500, "dry_run": True}, "bad_filter"),
        ({"manifest": "ladder.json", "filter": "colour=red", "dry_run": True}, "bad_filter"),
        ({"manifest": "ladder.json", "group": "*", "dry_run": "yes"}, "bad_request"),
        ({"manifest": "ladder.json", "group": "nobody-*", "dry_run": True}, "bad_request"),
    ):
        answer = api.post("/api/rollouts", json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["code"] == code, (body, answer.text)
    assert api.get("/api/rollouts").json()["rollouts"] == []


def test_rollout_plan_from_the_shell(fleet, hosted_ladder, sim, credentials, monkeypatch, capsys):
    from agent.cli import main

    devices = sim(3)
    wait_for(lambda: len(fleet.controller.registry.devices) == 3, what="3 devices")
    monkeypatch.setenv("EDGE_AGENT_FLEET_URL", fleet.url)
    monkeypatch.setenv("EDGE_AGENT_FLEET_TOKEN", credentials.token)
    capsys.readouterr()
    assert main(["fleet", "rollout", "plan", "--manifest", "ladder.json", "--group", "sim-*"]) == 0
    out = capsys.readouterr().out
    for device in devices.devices:
        assert device.id in out
    assert "\n3 devices: " in out
    assert main(["fleet", "rollout", "plan", "--manifest", "ladder.json", "--filter",
                 "id=sim-*", "--json"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[out.index("{"):])
    assert plan["summary"]["devices"] == 3
    assert sum(plan["summary"]["by_variant"].values()) + plan["summary"]["no_fit"] == 3
