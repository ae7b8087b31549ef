"""Run every benchmark of the project in one go (through scripts/bench), print one table,
write artifacts/bench.json and a chart, artifacts/bench.png.

Each figure is a ratio or a distribution from one run on this machine, never a
pass/fail on time: the machine is shared and noisy, so read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_auth  # noqa: E402
import bench_dashboard  # noqa: E402
import bench_decode  # noqa: E402
import bench_estimator  # noqa: E402
import bench_fetch  # noqa: E402
import bench_fleet  # noqa: E402
import bench_speed_prediction  # noqa: E402
import bench_openai  # noqa: E402
import bench_rollout  # noqa: E402

from agent.log import configure_logging  # noqa: E402

ARTIFACTS = Path(os.environ.get("EDGE_AGENT_ARTIFACTS", REPO / "artifacts"))
MiB = 2**20


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{model}, {os.cpu_count()} CPUs, {total / 2**30:.0f} GiB, {platform.system()} {platform.release()}"


def render_table(result: dict) -> str:
    lines = [f"machine: {result['machine']}", ""]
    decode = result["decode"]
    lines.append(f"Serving paths ({decode['model']}, {decode['max_tokens']} tokens, "
                 f"n_ctx {decode['settings']['n_ctx']}, {decode['settings']['n_threads']} threads; "
                 "medians, ratios against llama-cpp-python in-process)")
    lines.append(f"  {'path':42} {'decode tok/s':>12} {'ratio':>7} {'TTFT ms':>9} {'TTFT - engine':>14}")
    for name, row in decode["paths"].items():
        lines.append(f"  {name:42} {row['decode_tps']:12.1f} {row['decode_ratio']:7.3f} {row['ttft_ms']:9.1f} "
                     f"{row['ttft_overhead_ms']:+14.1f}")
    cpu = decode["paths"]["edge-agent daemon over MQTT"]["cpu_us_per_token"]
    lines.append(f"  CPU per streamed token over MQTT: daemon parent {cpu['daemon_parent']:.0f} µs, "
                 f"broker {cpu['broker']:.0f} µs, mosquitto_sub {cpu['client']:.0f} µs")
    idle = decode["daemon_idle"]
    lines.append(f"  daemon idle, model loaded: parent RSS {idle['parent_rss_mib']:.1f} MiB, parent CPU "
                 f"{idle['parent_cpu_percent']:.2f} %, worker RSS {idle['worker_rss_mib']:.1f} MiB")
    lines.append("")
    estimator = result["estimator"]
    lines.append("Memory estimator vs measured peak RSS growth (MiB; tolerance max(5 %, 16 MiB))")
    by_quant: dict[str, dict[int, dict]] = {}
    for row in estimator["rows"]:
        by_quant.setdefault(row["quant"], {})[row["n_ctx"]] = row
    contexts = sorted({row["n_ctx"] for row in estimator["rows"]})
    lines.append("  " + f"{'variant':8}" + "".join(f"{f'n_ctx {c} meas/est (err)':>30}" for c in contexts))
    for quant, cells in by_quant.items():
        lines.append("  " + f"{quant:8}" + "".join(
            f"{cells[c]['measured_bytes'] / MiB:>12.1f} /{cells[c]['estimated_bytes'] / MiB:7.1f} "
            f"({cells[c]['error_bytes'] / MiB:+5.1f})" for c in contexts))
    lines.append(f"  largest error {estimator['max_abs_error_bytes'] / MiB:.1f} MiB; all within tolerance: "
                 f"{estimator['within_tolerance']}")
    lines.append("")
    fetch = result["fetch"]
    lines.append(f"Fetch {fetch['file']} from a local Range server: ours (sha256 + fsync) "
                 f"{fetch['median_mb_per_s']['ours']} MB/s, curl {fetch['median_mb_per_s']['curl']} MB/s, "
                 f"ratio {fetch['ratio']} (target {fetch['target_ratio']})")
    fleet = result["fleet"]
    at = fleet["at_max"] or {}
    lines.append(f"Fleet ingest at 1 telemetry msg/device/s, lag < 1 s: {fleet['max_devices']} devices "
                 f"(controller {at.get('controller_cpu_percent', '-')} % CPU, {at.get('controller_rss_mib', '-')} MiB RSS)")
    auth = result["auth"]
    lines.append(f"Public /api/health and /files p50 under {bench_auth.ATTACKERS} clients sending wrong tokens, "
                 f"attacked/unloaded: " + ", ".join(
                     f"{form} {max(row['ratio'].values()):.2f}" for form, row in auth["forms"].items())
                 + f" (target ≤ {auth['target_ratio']})")
    lines += ["", bench_openai.render_table(result["openai"])]
    lines += ["", bench_dashboard.render_table(result["dashboard"])]
    lines += ["", bench_rollout.render_table(result["rollout"])]
    lines += ["", bench_speed_prediction.render_table(result["speed"])]
    return "\n".join(lines)


def render_chart(result: dict, path: Path) -> None:
    """A bar chart of decode tok/s per path, drawn as SVG and rasterised by Chromium."""
    rows = list(result["decode"]["paths"].items())
    top = max(row["decode_tps"] for _, row in rows) or 1.0
    bars = []
    for i, (name, row) in enumerate(rows):
        y = 40 + i * 46
        width = 520 * row["decode_tps"] / top
        bars.append(f'<text x="10" y="{y + 22}" font-size="14">{html.escape(name)}</text>'
                    f'<rect x="290" y="{y + 6}" width="{width:.1f}" height="24" fill="#3b7dd8"/>'
                    f'<text x="{296 + width:.1f}" y="{y + 23}" font-size="13">{row["decode_tps"]:.1f} tok/s '
                    f'({row["decode_ratio"]:.2f}×)</text>')
    height = 60 + len(rows) * 46
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="980" height="{height}" font-family="sans-serif">'
           f'<rect width="100%" height="100%" fill="white"/>'
           f'<text x="10" y="24" font-size="16" font-weight="bold">Decode tok/s by serving path '
           f'({html.escape(result["decode"]["model"])})</text>{"".join(bars)}</svg>')
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 980, "height": height})
        page.set_content(svg)
        page.screenshot(path=str(path))
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and fleet steps")
    args = parser.parse_args()
    configure_logging("warning")
    started = time.monotonic()
    result: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print("bench: serving paths …", file=sys.stderr, flush=True)
    result["decode"] = bench_decode.run(rounds=3 if args.quick else 10)
    print("bench: memory estimator …", file=sys.stderr, flush=True)
    result["estimator"] = bench_estimator.run()
    print("bench: speed prediction vs measurement …", file=sys.stderr, flush=True)
    result["speed"] = bench_speed_prediction.run()
    print("bench: fetch …", file=sys.stderr, flush=True)
    result["fetch"] = bench_fetch.run(runs=3 if args.quick else 5)
    print("bench: fleet ingest …", file=sys.stderr, flush=True)
    result["fleet"] = bench_fleet.run(steps=[500, 1000, 2000] if args.quick else None)
    print("bench: auth under attack …", file=sys.stderr, flush=True)
    result["auth"] = bench_auth.run(requests=300 if args.quick else 1000)
    print("bench: OpenAI front door …", file=sys.stderr, flush=True)
    result["openai"] = bench_openai.run(rounds=2 if args.quick else 3)
    print("bench: dashboard on 5,000 devices …", file=sys.stderr, flush=True)
    result["dashboard"] = bench_dashboard.run(rounds=3 if args.quick else 5)
    print("bench: health-gated rollouts …", file=sys.stderr, flush=True)
    result["rollout"] = bench_rollout.run(devices=50 if args.quick else 200)
    result["seconds"] = round(time.monotonic() - started, 1)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "bench.json").write_text(json.dumps(result, indent=2))
    table = render_table(result)
    (ARTIFACTS / "bench.txt").write_text(table + "\n")
    render_chart(result, ARTIFACTS / "bench.png")
    print(table)
    print(f"\nwrote {ARTIFACTS / 'bench.json'}, {ARTIFACTS / 'bench.txt'}, {ARTIFACTS / 'bench.png'} "
          f"in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
