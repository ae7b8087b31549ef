"""The dashboard in a real browser (Debian's chromium through Playwright), against a real
controller on a real mosquitto: first with simulated devices (login, CSRF, table, commands,
lost), then with a real `edge-agent run` on the SmolLM2 ladder (online with its model, a
prompt typed in the page streams a reply, a rollout to Q2_K switches it, a kill turns it lost).

Screenshots go to $EDGE_AGENT_ARTIFACTS or <repo>/artifacts (gitignored). Playwright never
downloads a browser here: it is pointed at the Chromium on PATH (chromium, chromium-browser or
google-chrome; $EDGE_AGENT_CHROMIUM names another).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fleet.conftest import REPO, wait_for

pytestmark = pytest.mark.slow

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))
TIMEOUT_MS = 20_000


def artifacts_dir() -> Path:
    path = Path(os.environ.get("EDGE_AGENT_ARTIFACTS") or REPO / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium() -> str:
    if os.environ.get("EDGE_AGENT_CHROMIUM"):
        return os.environ["EDGE_AGENT_CHROMIUM"]
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return found
    pytest.fail(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}): install it, e.g. "
                "`sudo apt-get install chromium` (scripts/test does as root), `sudo dnf install "
                "chromium`, or set EDGE_AGENT_CHROMIUM to the browser's path")


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        yield instance
        instance.close()


@pytest.fixture
def page(browser, fleet, credentials):
    """A logged-in page: the login form is filled like a user would."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    tab.goto(fleet.url + "/")
    assert "/login" in tab.url
    tab.fill("input[name=secret]", credentials.password)
    tab.click("button[type=submit]")
    tab.wait_for_url(fleet.url + "/")
    yield tab
    context.close()


def row_state(tab, device_id: str) -> str:
    return tab.locator(f'tr[data-id="{device_id}"] td[data-key="state"]').inner_text().strip()


def filter_to(tab, text: str) -> None:
    """Type a filter and wait for the controller's page of rows for it."""
    tab.fill("#filter", text)
    tab.wait_for_function(
        "text => new URLSearchParams(document.querySelector('#devices').dataset.rendered || '')"
        ".get('filter') === (text.trim() || null)",
        arg=text,
    )


def test_login_is_required_and_a_wrong_password_is_refused(browser, fleet):
    context = browser.new_context()
    tab = context.new_page()
    tab.goto(fleet.url + "/models")
    assert "/login" in tab.url
    tab.fill("input[name=secret]", "not the password")
    tab.click("button[type=submit]")
    assert tab.locator(".error").inner_text() == "wrong password or token"
    context.close()


def test_fleet_page_with_simulated_devices(page, fleet, sim):
    devices = sim(6, own_connection=1, interval_s=0.5)
    first, victim = devices.devices[1].id, devices.devices[0].id
    page.wait_for_selector(f'tr[data-id="{first}"]')  # arrives over SSE, no reload
    wait_for(
        lambda: page.locator('[data-count="ready"]').inner_text() == "6",
        what="6 ready in the counters",
    )
    assert (
        page.locator(f'tr[data-id="{first}"] td[data-key="quant"]').inner_text()
        == devices.devices[1].quant
    )

    filter_to(page, "Jetson")  # plain words, filtered on the controller
    visible = page.locator("#devices tbody tr:visible")
    assert visible.count() == sum(1 for d in devices.devices if "Jetson" in d.board[0])
    filter_to(page, "ram_gib>=16")  # the inventory grammar, as rollouts target
    assert visible.count() == sum(1 for d in devices.devices if d.board[4] >= 16)
    filter_to(page, "ram_gib>>")  # grammar that does not parse says where
    assert "at 8" in page.locator("#filter-problem").inner_text()
    filter_to(page, "")
    page.click('th[data-key="decode_tps"]')
    assert page.locator('th[data-key="decode_tps"]').get_attribute("aria-sort") == "ascending"

    # a POST without the page's CSRF token is refused even with the session cookie
    status = page.evaluate(
        """async (id) => (await fetch(`/api/devices/${id}/cmd`, {method: "POST", body: JSON.stringify({op: "drain"}),
              headers: {"Content-Type": "application/json"}})).status""",
        first,
    )
    assert status == 403

    devices.kill(victim)
    page.wait_for_function(
        "id => document.querySelector(`tr[data-id='${id}'] td[data-key='state']`).textContent.trim() === 'lost'",
        arg=victim,
    )
    page.screenshot(path=str(artifacts_dir() / "fleet-simulated.png"), full_page=True)


def test_device_page_prompt_and_commands_with_a_simulated_device(page, fleet, sim):
    devices = sim(1, interval_s=0.5)
    device = devices.devices[0].id
    page.wait_for_selector(f'tr[data-id="{device}"] a')
    page.click(f'tr[data-id="{device}"] a')
    page.wait_for_url(f"**/devices/{device}")
    page.fill("textarea[name=prompt]", "what is the tide today")
    page.click("#prompt-form button")
    page.wait_for_function("() => document.querySelector('#reply').classList.contains('done')")
    assert "simulated reply" in page.locator("#reply").inner_text()
    page.click("button[data-op=bench]")
    page.wait_for_function("() => document.querySelector('#cmd-result').classList.contains('ok')")
    assert "decode_tps" in page.locator("#cmd-result").inner_text()
    page.wait_for_function(
        "() => document.querySelectorAll('#chart-decode_tps polyline').length === 1"
    )
    assert page.locator("table.explain").count() == 0  # not in the retained meta any more
    page.click("button[data-op=select]")  # asks the device, then shows its answer
    page.wait_for_selector("table.explain tr.verdict-chosen")
    assert (
        page.locator("table.explain tr.verdict-chosen td").first.inner_text()
        == devices.devices[0].quant
    )

    # a download's progress events are one row with one bar, worded; commands read as sentences
    page.evaluate(
        """async (id) => fetch(`/api/devices/${id}/cmd`, {method: "POST", headers: {
              "Content-Type": "application/json",
              "X-CSRF-Token": document.querySelector('meta[name=csrf]').content},
            body: JSON.stringify({op: "set_manifest", args: {source: "http://127.0.0.1:9/m.json"}})})""",
        device,
    )
    download = page.locator("#events tr.download")
    page.wait_for_function(
        "() => document.querySelector('#events tr.download td:nth-child(2)')"
        "?.textContent.trim().startsWith('Downloaded')")
    assert download.count() == 1
    assert download.locator("progress").evaluate("bar => bar.value") == 1
    assert "Downloaded smollm2-135m-instruct." in download.inner_text()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#commands td')].some("
        "td => td.textContent.startsWith('set_manifest http://127.0.0.1:9/m.json: done'))")


# --- a real agent ------------------------------------------------------------------------------


def ladder_subset(ladder_dir: Path, quants: list[str]) -> dict:
    manifest = json.loads((ladder_dir / "manifest.json").read_text())
    for model in manifest["models"]:
        model["variants"] = [v for v in model["variants"] if v["quant"] in quants]
    return manifest


@pytest.fixture
def real_agent(tmp_path, broker, fleet, ladder_dir):
    """`edge-agent run` fetching a Q4_K_M-only manifest from the controller's /files."""
    models = Path(fleet.config.model_dir)
    for quant in ("Q4_K_M", "Q2_K"):
        name = f"smollm2-135m-instruct.{quant}.gguf"
        (models / name).symlink_to(ladder_dir / name)
    (models / "ladder-q4.json").write_text(json.dumps(ladder_subset(ladder_dir, ["Q4_K_M"])))
    config = {
        "device_id": "real-agent-1",
        "state_dir": str(tmp_path / "agent-state"),
        "cache_dir": str(tmp_path / "agent-models"),
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "will_delay_s": 1,
            "reconnect_min_s": 1,
            "reconnect_max_s": 2,
        },
        "model": {"manifest": f"{fleet.url}/files/ladder-q4.json"},
        "signing": {"public_key": fleet.controller.signing_key.public_key},  # what /files signs with
        "runtime": {"default_max_tokens": 24},
        "telemetry": {"interval_s": 1.0},
        "log": {"json": True, "level": "info"},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    process = subprocess.Popen(
        [EDGE_AGENT, "run", "--config", str(path)],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    process.log_path = log
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_real_agent_end_to_end(page, fleet, real_agent, ladder_dir, credentials):
    device = "real-agent-1"

    def agent_log() -> str:
        return real_agent.log_path.read_text()[-3000:]

    try:
        page.wait_for_function(
            "id => { const tr = document.querySelector(`tr[data-id='${id}']`);"
            " return tr && tr.querySelector(\"td[data-key='state']\").textContent.trim() === 'ready'"
            " && tr.querySelector(\"td[data-key='quant']\").textContent === 'Q4_K_M'; }",
            arg=device,
            timeout=120_000,
        )
    except Exception:
        raise AssertionError(
            f"the agent did not come up ready with Q4_K_M; its log: {agent_log()}"
        ) from None
    assert (
        page.locator(f'tr[data-id="{device}"] td[data-key="model"]').inner_text()
        == "smollm2-135m-instruct"
    )
    page.screenshot(path=str(artifacts_dir() / "fleet-page.png"), full_page=True)

    # a prompt typed in the dashboard streams a reply from the real model
    page.click(f'tr[data-id="{device}"] a')
    page.wait_for_url(f"**/devices/{device}")
    page.fill("textarea[name=prompt]", "Name one colour of the sky.")
    page.fill("input[name=max_tokens]", "16")
    page.fill("input[name=temperature]", "0")
    page.click("#prompt-form button")
    page.wait_for_function(
        "() => document.querySelector('#reply-meta').textContent === 'streaming…'", timeout=60_000
    )
    page.wait_for_function(
        "() => document.querySelector('#reply').classList.contains('done')", timeout=60_000
    )
    reply = page.locator("#reply").inner_text()
    assert reply.strip(), "the reply is empty"
    assert "tokens" in page.locator("#reply-meta").inner_text()
    # the charts fill from live telemetry (decode tok/s appears once the agent has served a request)
    page.wait_for_function(
        "() => document.querySelectorAll('#chart-mem_bytes polyline').length === 1", timeout=30_000
    )
    page.wait_for_function(
        "() => { const line = document.querySelector('#chart-decode_tps polyline');"
        " return line && line.getAttribute('points').split(' ').length >= 2; }",
        timeout=30_000,
    )
    page.screenshot(path=str(artifacts_dir() / "device-page.png"), full_page=True)

    # the shell client streams a reply from the same real agent
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")},
        "EDGE_AGENT_FLEET_URL": fleet.url,
        "EDGE_AGENT_FLEET_TOKEN": credentials.token,
    }
    shell = subprocess.run(
        [
            EDGE_AGENT,
            "fleet",
            "prompt",
            device,
            "Say hello.",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.strip(), "edge-agent fleet prompt printed nothing"

    # publish a Q2_K-only manifest and roll it out from the Models page
    q2 = json.dumps(ladder_subset(ladder_dir, ["Q2_K"]))
    page.goto(fleet.url + "/models")
    page.fill("input[name=name]", "ladder-q2.json")
    page.fill("textarea[name=manifest]", q2)
    page.click("form[action='/models/publish'] button")
    page.wait_for_selector("text=published ladder-q2.json")
    page.select_option("#rollout-form select[name=manifest]", "ladder-q2.json")
    page.fill("#rollout-form input[name=group]", device)
    page.fill("#rollout-form input[name=rate_per_min]", "60")
    page.click("#rollout-form button[type=submit]")
    page.wait_for_selector("#rollout-result.ok")
    try:
        page.wait_for_selector(".rollout.state-completed", timeout=120_000)
    except Exception:
        raise AssertionError(
            f"rollout did not complete: {page.locator('#rollouts').inner_text()}\n{agent_log()}"
        ) from None
    page.screenshot(path=str(artifacts_dir() / "models-page.png"), full_page=True)
    page.goto(fleet.url + "/")
    page.wait_for_function(
        "id => document.querySelector(`tr[data-id='${id}'] td[data-key='quant']`).textContent === 'Q2_K'",
        arg=device,
        timeout=30_000,
    )
    page.screenshot(path=str(artifacts_dir() / "fleet-page-after-rollout.png"), full_page=True)

    # killing the agent turns it lost (its Will, after the Will Delay)
    real_agent.send_signal(signal.SIGKILL)
    real_agent.wait(10)
    page.wait_for_function(
        "id => document.querySelector(`tr[data-id='${id}'] td[data-key='state']`).textContent.trim() === 'lost'",
        arg=device,
        timeout=30_000,
    )
    digest = hashlib.sha256(
        (ladder_dir / "smollm2-135m-instruct.Q2_K.gguf").read_bytes()
    ).hexdigest()
    assert fleet.controller.registry.devices[device].meta["selection"]["sha256"] == digest


# --- 5,000 simulated devices ---------------------------------------------------------------------

FLEET_SIZE = 5000


def test_a_rollout_planned_started_and_followed_from_the_ui_on_5000_devices(
    page, fleet, sim, ladder_dir
):
    """The pages hold one page of rows whatever the fleet; the Models page plans a rollout to
    the devices a filter picks and starts it, and its page follows it to the end."""
    page.set_viewport_size({"width": 1200, "height": 760})  # the README's screenshots
    devices = sim(FLEET_SIZE, interval_s=10.0, per_connection=500, batched_telemetry=True)
    wait_for(lambda: len(fleet.controller.registry.devices) == FLEET_SIZE, timeout_s=180,
             what=f"{FLEET_SIZE} devices in the registry")
    page.goto(fleet.url + "/")
    page.wait_for_function(
        f"() => document.querySelector('[data-count=devices]').textContent === '{FLEET_SIZE}'")
    rows = page.locator("#devices tbody tr")
    assert rows.count() == int(page.locator("#devices").get_attribute("data-per-page"))
    page.click("#page-next")
    page.wait_for_function("() => new URLSearchParams(document.querySelector('#devices')"
                           ".dataset.rendered).get('page') === '2'")
    assert rows.first.get_attribute("data-id") == devices.devices[rows.count()].id
    target = "id=sim-0000*"  # the inventory grammar: the first 10 devices
    filter_to(page, target)
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.id)")) == [
        d.id for d in devices.devices[:10]]
    page.wait_for_selector("#chart-states rect[fill]")  # the fleet chart has buckets
    # Once each device's interval is learned (two telemetry messages), none reads stale.
    page.wait_for_function("() => document.querySelector('[data-count=stale]').textContent === '0'",
                           timeout=60_000)
    page.screenshot(path=str(artifacts_dir() / "dashboard-fleet.png"))

    q2 = json.dumps(ladder_subset(ladder_dir, ["Q2_K"]))
    name = "smollm2-135m-instruct.Q2_K.gguf"  # hosted: the plan reads its GGUF header
    (Path(fleet.config.model_dir) / name).symlink_to(ladder_dir / name)
    page.goto(fleet.url + "/models")
    page.fill("input[name=name]", "ladder-q2.json")
    page.fill("textarea[name=manifest]", q2)
    page.click("form[action='/models/publish'] button")
    page.wait_for_selector("text=published ladder-q2.json")
    form = "#rollout-form"
    page.select_option(f"{form} select[name=manifest]", "ladder-q2.json")
    page.fill(f"{form} input[name=filter]", target)
    page.fill(f"{form} input[name=rate_per_min]", "600")
    page.fill(f"{form} input[name=soak_s]", "1")
    page.click("#rollout-plan-button")
    page.wait_for_selector("#rollout-result.planned")
    planned = page.locator("#rollout-plan table.plan tbody tr td:nth-child(2)")
    assert planned.all_inner_texts() == ["Q2_K"] * 10  # the one variant, on every device
    page.locator("#rollout-plan-card").screenshot(path=str(artifacts_dir() / "dashboard-plan.png"))
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector("#rollout-result.ok a")
    page.click("#rollout-result a")  # follow it on its own page
    page.wait_for_url("**/rollouts/*")
    try:
        page.wait_for_function(
            "() => ['completed', 'aborted', 'rolled_back'].includes(document.body.dataset.state)",
            timeout=180_000)
    except Exception:
        shown = page.locator("main").inner_text()
        raise AssertionError(f"the rollout did not end: {shown}") from None
    assert page.locator("#rollout-state").inner_text() == "completed"
    assert page.locator("#rollout-finished").inner_text() == "10 of 10 finished"
    assert page.locator("#steps tbody tr").count() == 10
    assert "0 of 10 finished failed" in page.locator("#failure-text").inner_text()
    assert page.locator("#plan-card").is_visible()  # the plan seen before Start, beside the result
    assert page.locator("#steps tbody td:nth-child(4)").all_inner_texts() == ["Q2_K"] * 10
    page.screenshot(path=str(artifacts_dir() / "dashboard-rollout.png"))
    switched = {d.id: d.quant for d in devices.devices[:10]}
    assert set(switched.values()) == {"Q2_K"}
