"""Auth under attack: p50 latency of the controller's public /api/health and /files while four
clients send wrong bearer tokens, against the same requests unloaded (target: ≤ 2×).

    ~/.cache/edge-agent/venv/bin/python scripts/bench_auth.py [--json out.json] [--requests 1000]

Starts mosquitto and a real controller (``edge-agent fleet serve``, its own process) once per
token-hash form: ``sha256`` (what `edge-agent fleet hash-secret --method sha256` makes) and
``legacy_pbkdf2`` (a token hash written before tokens had their own form, checked off the
loop). The four attackers are separate processes, each from its own loopback address
(127.0.0.11-14), so the controller's per-address limit sees four peers; they send wrong tokens
to /api/devices as fast as the answers come. The probe measures from 127.0.0.20, one request
at a time. Writes JSON to --json, else to $EDGE_AGENT_ARTIFACTS (default artifacts/)
/bench_auth.json. ``run() -> dict``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import multiprocessing
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fleet import free_port, wait_listening  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("EDGE_AGENT_ARTIFACTS", REPO / "artifacts"))
TARGET_RATIO = 2.0
ATTACKERS = 4
PATHS = ("/api/health", "/files/small.bin")


def token_hash(token: str, form: str) -> str:
    if form == "sha256":
        return "sha256$" + base64.b64encode(hashlib.sha256(token.encode()).digest()).decode()
    salt = secrets.token_bytes(16)  # what `hash-secret --method pbkdf2_sha256` wrote
    digest = hashlib.pbkdf2_hmac("sha256", token.encode(), salt, 600_000)
    b64 = base64.b64encode
    return f"pbkdf2_sha256$600000${b64(salt).decode()}${b64(digest).decode()}"


class Stack:
    """mosquitto + one controller process with the given token hash; ``url``; ``close()``."""

    def __init__(self, workdir: Path, token_hash_value: str) -> None:
        mqtt_port, http_port = free_port(), free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.processes = [
            subprocess.Popen(
                [mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        ]
        wait_listening(mqtt_port)
        models = workdir / "models"
        models.mkdir()
        (models / "small.bin").write_bytes(os.urandom(4096))
        config = workdir / "fleet.yaml"
        config.write_text(
            json.dumps(
                {  # JSON is YAML
                    "controller_id": "fleet-bench-auth",
                    "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
                    "http_port": http_port,
                    "db_path": str(workdir / "fleet.db"),
                    "model_dir": str(models),
                    "auth": {"api_token_hashes": [token_hash_value]},
                    "log": {"level": "warning", "json": True},
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        self.processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "fleet", "serve", "--config", str(config)],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(workdir / "controller.log", "wb"),
            )
        )
        wait_listening(http_port)
        self.url = f"http://127.0.0.1:{http_port}"

    def close(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def attacker(url: str, address: str, stop, counts) -> None:
    """Wrong tokens, one request after another, until ``stop`` is set."""
    with httpx.Client(
        base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=60
    ) as client:
        while not stop.is_set():
            status = client.get(
                "/api/devices", headers={"Authorization": f"Bearer {secrets.token_urlsafe(24)}"}
            ).status_code
            with counts.get_lock():
                counts[0] += 1
                counts[1 if status == 401 else 2 if status == 429 else 3] += 1


def probe(url: str, requests: int) -> dict[str, float]:
    """p50 latency in ms of each public path, requests interleaved."""
    samples: dict[str, list[float]] = {path: [] for path in PATHS}
    with httpx.Client(
        base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.20"), timeout=60
    ) as client:
        for path in PATHS:
            client.get(path).raise_for_status()  # warm-up: connection, first-use imports
        for _ in range(requests):
            for path in PATHS:
                began = time.perf_counter()
                client.get(path).raise_for_status()
                samples[path].append((time.perf_counter() - began) * 1000)
    return {path: round(statistics.median(values), 2) for path, values in samples.items()}


def measure(form: str, requests: int) -> dict:
    token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        stack = Stack(Path(tmp), token_hash(token, form))
        try:
            unloaded = probe(stack.url, requests)
            context = multiprocessing.get_context("spawn")  # no inherited threads or sockets
            stop = context.Event()
            counts = context.Array("q", 4)  # requests, 401, 429, other
            attackers = [
                context.Process(
                    target=attacker, args=(stack.url, f"127.0.0.{11 + i}", stop, counts)
                )
                for i in range(ATTACKERS)
            ]
            for process in attackers:
                process.start()
            time.sleep(2.0)  # every attacker is up and sending
            began = time.monotonic()
            loaded = probe(stack.url, requests)
            seconds = time.monotonic() - began
            with counts.get_lock():
                during = list(counts)
            stop.set()
            for process in attackers:
                process.join(30)
            authorised = httpx.get(
                stack.url + "/api/devices", headers={"Authorization": f"Bearer {token}"}
            ).status_code
        finally:
            stack.close()
    return {
        "unloaded_p50_ms": unloaded,
        "loaded_p50_ms": loaded,
        "ratio": {path: round(loaded[path] / unloaded[path], 2) for path in PATHS},
        "attack": {
            "clients": ATTACKERS,
            "requests": during[0],  # from the attackers' start to the probe's end
            "answered_401": during[1],
            "answered_429": during[2],
            "answered_other": during[3],
            "probe_seconds": round(seconds, 1),
        },
        "right_token_after_attack_status": authorised,  # from 127.0.0.1: not a limited address
    }


def run(requests: int = 1000) -> dict:
    forms = {form: measure(form, requests) for form in ("sha256", "legacy_pbkdf2")}
    worst = max(ratio for result in forms.values() for ratio in result["ratio"].values())
    return {
        "target_ratio": TARGET_RATIO,
        "worst_ratio": worst,
        "requests_per_path": requests,
        "forms": forms,
    }


def render(result: dict) -> str:
    lines = [
        f"{'token hash':14} {'path':18} {'p50 unloaded ms':>16} {'p50 attacked ms':>16} "
        f"{'ratio':>6}  attack (requests: 401 / 429)"
    ]
    for form, row in result["forms"].items():
        attack = row["attack"]
        for path in PATHS:
            lines.append(
                f"{form:14} {path:18} {row['unloaded_p50_ms'][path]:>16.2f} "
                f"{row['loaded_p50_ms'][path]:>16.2f} {row['ratio'][path]:>6.2f}  "
                f"{attack['requests']}: {attack['answered_401']} / {attack['answered_429']}"
            )
    lines.append(f"worst ratio {result['worst_ratio']} (target ≤ {result['target_ratio']})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--requests", type=int, default=1000, help="probes per path and phase")
    args = parser.parse_args()
    result = run(args.requests)
    print(render(result))
    path = args.json or ARTIFACTS / "bench_auth.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
