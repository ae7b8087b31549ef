"""Dashboard benchmark: the fleet page of a controller holding N simulated devices (5,000 by
default), in Debian's Chromium through Playwright (never a downloaded browser). Targets (issue
14): the first render of the fleet page and a filter change each under 1 s. A benchmark, not a
test: it prints a table and writes JSON, and fails on nothing.

    ~/.cache/edge-agent/venv/bin/python scripts/bench_dashboard.py [--devices 5000]
        [--rounds 5] [--json artifacts/bench_dashboard.json]

Mosquitto, ``edge-agent fleet serve`` (SQLite) and ``scripts/simulate_fleet.py N`` (telemetry
every 5 s per device) run as processes on this machine, the browser beside them. Each figure is
a median over the rounds, measured inside the page with ``performance.now()``:

- first render: from the start of the navigation to the first page of rows applied by the page
  script from the live stream (the server-rendered rows arrive earlier: ``dom_ready_ms``);
- filter change: from the ``input`` event in the filter box to the controller's page of rows for
  it in the table (this includes the box's 150 ms debounce), for plain words, the inventory
  grammar and an id glob;
- ``api_ms``: ``GET /api/devices`` for the same filters from a plain HTTP client, the
  controller's own share.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import httpx  # noqa: E402

from agent.fleet.auth import hash_secret  # noqa: E402
from bench_fleet import free_port, start_broker, wait_listening  # noqa: E402

ARTIFACTS = Path(os.environ.get("EDGE_AGENT_ARTIFACTS", REPO / "artifacts"))
PYTHON = sys.executable
TARGET_MS = 1000.0
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
FILTERS = {
    "words": "jetson q4_k_m",
    "grammar": "ram_gib>=8 and flag:dotprod and not state=lost",
    "id glob": "id=bench-0001*",
}
# Records when the page script applies a page of rows (the table's data-rendered attribute):
# installed before any page script runs.
OBSERVER = """
window.__renders = [];
new MutationObserver((changes) => {
  for (const change of changes) {
    if (change.attributeName === "data-rendered")
      window.__renders.push([performance.now(), change.target.dataset.rendered]);
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ["data-rendered"] });
"""
FILTER_CHANGE = """
async (text) => {
  const box = document.getElementById("filter");
  const wanted = text.trim();
  const seen = window.__renders.length;
  const start = performance.now();
  box.value = text;
  box.dispatchEvent(new Event("input"));
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, 5));
    const hit = window.__renders.slice(seen)
      .find(([, query]) => (new URLSearchParams(query).get("filter") || "") === wanted);
    const rows = () => document.querySelectorAll("#devices tbody tr").length;
    if (hit) return { ms: hit[0] - start, shown: rows() };
    if (performance.now() - start > 30000) return { ms: null, shown: 0 };
  }
}
"""


def chromium() -> str:
    names = ("chromium", "chromium-browser", "google-chrome")
    found = os.environ.get("EDGE_AGENT_CHROMIUM") or next(
        (shutil.which(n) for n in names if shutil.which(n)), None)
    if not found:
        raise SystemExit("bench_dashboard: no Chromium on PATH (apt-get install chromium)")
    return found


def start_controller(workdir: Path, mqtt_port: int, password: str) -> tuple[subprocess.Popen, str]:
    http_port = free_port()
    config = workdir / "fleet.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "controller_id": "fleet-bench-dashboard",
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
        "http_port": http_port,
        "db_path": str(workdir / "fleet.db"),
        "model_dir": str(workdir / "models"),
        "signing_key_file": str(workdir / "signing.key"),
        "default_telemetry_interval_s": 5.0,
        "auth": {"admin_password_hash": hash_secret(password)},
        "log": {"level": "warning", "json": True},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    process = subprocess.Popen(
        [PYTHON, "-m", "agent.cli", "fleet", "serve", "--config", str(config)], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=open(workdir / "controller.log", "wb"))
    wait_listening(http_port)
    return process, f"http://127.0.0.1:{http_port}"


def wait_for_devices(url: str, count: int, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with urllib.request.urlopen(url + "/api/health", timeout=5) as response:
            if json.loads(response.read())["devices"] >= count:
                return time.monotonic() - started
        time.sleep(0.5)
    raise RuntimeError(f"the controller did not see {count} devices within {timeout_s:.0f} s")


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def measure(url: str, password: str, rounds: int) -> dict:
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    first: list[float] = []
    dom: list[float] = []
    changes: dict[str, list[float | None]] = {name: [] for name in FILTERS}
    shown: dict[str, int] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        context.add_init_script(OBSERVER)
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url + "/login")
        page.fill("input[name=secret]", password)
        page.click("button[type=submit]")
        page.wait_for_url(url + "/")
        for _ in range(rounds):
            page.goto(url + "/", wait_until="commit")
            page.wait_for_function("() => window.__renders && window.__renders.length > 0")
            first.append(page.evaluate("() => window.__renders[0][0]"))
            dom.append(page.evaluate(
                "() => performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd"))
            for name, text in FILTERS.items():
                result = page.evaluate(FILTER_CHANGE, text)
                changes[name].append(result["ms"])
                shown[name] = result["shown"]
                page.evaluate(FILTER_CHANGE, "")
        browser.close()
    api: dict[str, float | None] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        login = client.get("/login")  # a session as the browser's: the login form's token first
        client.post("/login", data={"secret": password, "login_token": login.cookies.get(
            "edge_fleet_login"), "next": "/"})
        for name, text in FILTERS.items():
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                answer = client.get("/api/devices", params={"filter": text, "per_page": 50})
                answer.raise_for_status()
                times.append((time.perf_counter() - started) * 1000)
            api[name] = median(times)
    return {
        "first_render_ms": median(first),
        "dom_ready_ms": median(dom),
        "filter_change_ms": {name: median(values) for name, values in changes.items()},
        "filter_rows_shown": shown,
        "api_ms": api,
    }


def run(devices: int = 5000, rounds: int = 5) -> dict:
    password = secrets.token_urlsafe(12)
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        workdir = Path(tmp)
        broker, mqtt_port = start_broker(workdir)
        controller, url = start_controller(workdir, mqtt_port, password)
        simulator = subprocess.Popen(
            [PYTHON, str(REPO / "scripts" / "simulate_fleet.py"), str(devices), "--port",
             str(mqtt_port), "--interval", "5.0", "--id-prefix", "bench", "--per-connection",
             "500", "--batched"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            joined_s = wait_for_devices(url, devices, timeout_s=300)
            time.sleep(12)  # two telemetry rounds: every row has numbers, intervals are learned
            figures = measure(url, password, rounds)
        finally:
            for process in (simulator, controller, broker):
                process.terminate()
            for process in (simulator, controller, broker):
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
    worst = max([figures["first_render_ms"] or 0.0,
                 *[v or 0.0 for v in figures["filter_change_ms"].values()]])
    return {"devices": devices, "rounds": rounds, "devices_joined_s": round(joined_s, 1),
            "target_ms": TARGET_MS, "within_target": worst < TARGET_MS, **figures}


def render_table(result: dict) -> str:
    lines = [f"Dashboard on {result['devices']} simulated devices (Chromium, medians of "
             f"{result['rounds']}; target < {result['target_ms']:.0f} ms each)",
             f"  {'what':38} {'page ms':>9} {'API ms':>8} {'rows':>6}",
             f"  {'fleet page, first render (live page)':38} {result['first_render_ms']:>9}",
             f"  {'fleet page, DOM ready (server rows)':38} {result['dom_ready_ms']:>9}"]
    for name, ms in result["filter_change_ms"].items():
        label = f"filter change: {name}"
        lines.append(f"  {label:38} {ms!s:>9} {result['api_ms'][name]!s:>8} "
                     f"{result['filter_rows_shown'][name]:>6}")
    lines.append(f"  all within target: {result['within_target']} (filter changes include the "
                 "box's 150 ms debounce)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ARTIFACTS / "bench_dashboard.json")
    args = parser.parse_args()
    result = run(args.devices, args.rounds)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(render_table(result))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
