"""Fleet ingest benchmark: the most simulated devices at 1 telemetry msg/s each that one
controller ingests with lag under 1 s, with mosquitto, the controller and the simulator all
on this machine.

    /root/.cache/edge-agent/venv/bin/python scripts/bench_fleet.py [--json out.json]
        [--steps 500,1000,2000,3000,4000] [--measure-s 12] [--max-seconds 300]

Each step starts ``scripts/simulate_fleet.py N`` (a separate process), lets it warm up, then
reads the controller's /metrics every 2 s: lag is ``edge_fleet_ingest_lag_max_seconds``
(device timestamp to SQLite commit of every telemetry message, the histogram
``edge_fleet_telemetry_lag_seconds``; the worst batch is reported too) and the ingest rate
comes from ``edge_fleet_ingest_messages_total``. A step passes when at least 99 % of the
messages are committed within 1 s and the controller ingests at least 95 % of the offered
rate. The controller's CPU (percent of one core) and RSS come from psutil on its process; the
simulator's and mosquitto's CPU and the load average are recorded beside them. Steps stop at the first failure or when
``--max-seconds`` is spent: the benchmark always ends by itself. ``run() -> dict``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
LAG_LIMIT_S = 1.0
MIN_RATE_FRACTION = 0.95
MIN_UNDER_LIMIT = 0.99  # "lag under 1 s" = at least 99 % of telemetry messages committed within 1 s
SCRAPE_S = 2.0  # /metrics renders every device; scrape like a (busy) Prometheus, not in a loop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout_s} s")


def read_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(edge_fleet_[a-z_]+)(\{[^}]*\})? (\S+)", line)
        if match:
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def start_stack(workdir: Path) -> tuple[list[subprocess.Popen], str, int, psutil.Process]:
    mqtt_port, http_port = free_port(), free_port()
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\n"
    )
    broker = subprocess.Popen(
        [mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_listening(mqtt_port)
    config = workdir / "fleet.yaml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "controller_id": "fleet-bench",
                "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
                "http_port": http_port,
                "db_path": str(workdir / "fleet.db"),
                "model_dir": str(workdir / "models"),
                "auth": {"metrics_public": True},
                "log": {"level": "warning", "json": True},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    controller = subprocess.Popen(
        [PYTHON, "-m", "agent.cli", "fleet", "serve", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "controller.log", "wb"),
    )
    wait_listening(http_port)
    return (
        [broker, controller],
        f"http://127.0.0.1:{http_port}",
        mqtt_port,
        psutil.Process(controller.pid),
    )


def measure_step(
    count: int,
    url: str,
    mqtt_port: int,
    process: psutil.Process,
    broker: psutil.Process,
    *,
    warmup_s: float,
    measure_s: float,
    per_connection: int,
) -> dict:
    simulator = subprocess.Popen(
        [
            PYTHON,
            str(REPO / "scripts" / "simulate_fleet.py"),
            str(count),
            "--port",
            str(mqtt_port),
            "--interval",
            "1.0",
            "--duration",
            str(warmup_s + measure_s + 30),
            "--id-prefix",
            "bench",  # the same ids every step: the registry holds N devices, not the sum of steps
            "--per-connection",
            str(per_connection),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    simulator_process = psutil.Process(simulator.pid)
    try:
        time.sleep(warmup_s)
        start = read_metrics(url)
        cpu_start, wall_start = process.cpu_times(), time.monotonic()
        others_start = [p.cpu_times() for p in (simulator_process, broker)]
        worst_lag, worst_queue, backlog_max, rss_max, flush_max = 0.0, 0.0, 0.0, 0, 0.0
        lags = []
        while time.monotonic() - wall_start < measure_s:
            time.sleep(SCRAPE_S)
            metrics = read_metrics(url)
            worst_lag = max(worst_lag, metrics.get("edge_fleet_ingest_lag_max_seconds", 0.0))
            worst_queue = max(
                worst_queue, metrics.get("edge_fleet_ingest_queue_lag_max_seconds", 0.0)
            )
            lags.append(metrics.get("edge_fleet_ingest_last_batch_lag_seconds", 0.0))
            flush_max = max(flush_max, metrics.get("edge_fleet_ingest_flush_milliseconds", 0.0))
            backlog_max = max(backlog_max, metrics.get("edge_fleet_ingest_backlog", 0.0))
            rss_max = max(rss_max, process.memory_info().rss)
        wall = time.monotonic() - wall_start
        cpu_end = process.cpu_times()
        others = [
            (p.cpu_times().user + p.cpu_times().system - t.user - t.system) / wall * 100
            for p, t in zip((simulator_process, broker), others_start, strict=True)
        ]
        end = read_metrics(url)
    finally:
        simulator.terminate()
        try:
            simulator.wait(15)
        except subprocess.TimeoutExpired:
            simulator.kill()
    rate = (
        end["edge_fleet_ingest_messages_total"] - start["edge_fleet_ingest_messages_total"]
    ) / wall
    cpu = (cpu_end.user + cpu_end.system - cpu_start.user - cpu_start.system) / wall * 100

    def delta(name: str) -> float:
        return end.get(name, 0.0) - start.get(name, 0.0)

    measured = delta("edge_fleet_telemetry_lag_seconds_count")
    under_limit = (
        delta(f'edge_fleet_telemetry_lag_seconds_bucket{{le="{LAG_LIMIT_S}"}}') / measured
        if measured
        else 0.0
    )
    mean_lag = delta("edge_fleet_telemetry_lag_seconds_sum") / measured if measured else None
    passed = under_limit >= MIN_UNDER_LIMIT and rate >= MIN_RATE_FRACTION * count
    return {
        "devices": count,
        "offered_msg_s": count,
        "ingested_msg_s": round(rate, 1),
        "mean_lag_s": round(mean_lag, 3) if mean_lag is not None else None,
        "under_1s_percent": round(under_limit * 100, 2),
        "median_batch_lag_s": round(sorted(lags)[len(lags) // 2], 3) if lags else None,
        "worst_lag_s": round(worst_lag, 3),
        "worst_queue_lag_s": round(worst_queue, 3),
        "backlog_max": int(backlog_max),
        "flush_ms_max": round(flush_max, 1),
        "controller_cpu_percent": round(cpu, 1),
        "controller_rss_mib": round(rss_max / 2**20, 1),
        # The machine is shared: a load far above the CPU count means other work competed.
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "simulator_cpu_percent": round(others[0], 1),
        "mosquitto_cpu_percent": round(others[1], 1),
        "passed": passed,
    }


def run(
    steps: list[int] | None = None,
    *,
    warmup_s: float = 8.0,
    measure_s: float = 12.0,
    max_seconds: float = 300.0,
    per_connection: int = 1000,
) -> dict:
    steps = steps or [500, 1000, 2000, 3000, 4000]
    began = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        processes, url, mqtt_port, controller = start_stack(Path(tmp))
        try:
            for count in steps:
                if time.monotonic() - began + warmup_s + measure_s > max_seconds:
                    break
                result = measure_step(
                    count,
                    url,
                    mqtt_port,
                    controller,
                    psutil.Process(processes[0].pid),
                    warmup_s=warmup_s,
                    measure_s=measure_s,
                    per_connection=per_connection,
                )
                results.append(result)
                print(
                    f"  {count:>5} devices: ingested {result['ingested_msg_s']:>7} msg/s, lag mean "
                    f"{result['mean_lag_s']} s, {result['under_1s_percent']} % < 1 s, worst {result['worst_lag_s']:.3f} s, controller {result['controller_cpu_percent']} % CPU, "
                    f"{result['controller_rss_mib']} MiB RSS (simulator {result['simulator_cpu_percent']} %, "
                    f"mosquitto {result['mosquitto_cpu_percent']} %), load {result['loadavg_1min']} -> {'ok' if result['passed'] else 'FAIL'}",
                    file=sys.stderr,
                )
                if not result["passed"]:
                    break
        finally:
            for process in reversed(processes):
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
    best = max((r for r in results if r["passed"]), key=lambda r: r["devices"], default=None)
    return {
        "benchmark": "fleet_ingest",
        "simulator_devices_per_connection": per_connection,
        "cpus": os.cpu_count(),
        "telemetry_interval_s": 1.0,
        "lag_limit_s": LAG_LIMIT_S,
        "steps": results,
        "max_devices": best["devices"] if best else 0,
        "at_max": best,
        "seconds": round(time.monotonic() - began, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result here")
    parser.add_argument(
        "--steps", default="500,1000,2000,3000,4000", help="device counts to try, in order"
    )
    parser.add_argument("--warmup-s", type=float, default=8.0)
    parser.add_argument("--measure-s", type=float, default=12.0)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument(
        "--per-connection",
        type=int,
        default=1000,
        # Fewer connections keep the simulator's own thread switching out of the lag figure.
        help="simulated device ids per MQTT connection",
    )
    args = parser.parse_args()
    result = run(
        [int(n) for n in args.steps.split(",")],
        warmup_s=args.warmup_s,
        measure_s=args.measure_s,
        max_seconds=args.max_seconds,
        per_connection=args.per_connection,
    )
    print(
        f"\n{'devices':>8} {'msg/s in':>9} {'mean lag':>9} {'% < 1 s':>8} {'worst lag':>10} {'ctl CPU %':>10} {'ctl RSS MiB':>12}  result"
    )
    for r in result["steps"]:
        print(
            f"{r['devices']:>8} {r['ingested_msg_s']:>9} {r['mean_lag_s']:>9} {r['under_1s_percent']:>8} {r['worst_lag_s']:>10.3f} {r['controller_cpu_percent']:>10} "
            f"{r['controller_rss_mib']:>12}  {'ok' if r['passed'] else 'FAIL'}"
        )
    print(
        f"\nhighest N with lag < {LAG_LIMIT_S:g} s at 1 msg/device/s: {result['max_devices']} "
        f"({result['cpus']} CPUs, mosquitto + controller + simulator on this machine)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
