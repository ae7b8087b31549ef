"""The fleet's OpenAI front door against the engine in-process and against llama_cpp.server.

Same model, same chat prompt, same llama.cpp settings (those the selector picks for this
machine, pinned to one variant), a streamed chat completion measured as its client sees it:

- edge-agent's engine in-process (parent process, worker child): the baseline
- the fleet: ``/v1/chat/completions`` on ``edge-agent fleet serve`` (a subprocess), through a
  real mosquitto on loopback to ``edge-agent run`` (a subprocess), SSE back
- ``llama_cpp.server`` (``python -m llama_cpp.server``) serving the same GGUF with the same
  n_ctx, n_threads and n_batch, ``/v1/chat/completions`` over HTTP

The paths take turns round by round, so machine noise hits them alike; figures are medians.
Ratios (targets from issue 13): fleet decode tok/s / engine >= 0.9; fleet / llama_cpp.server
>= 1.0; added time to first token, fleet - engine, p50 <= 10 ms on loopback.

    ~/.cache/edge-agent/venv/bin/python scripts/bench_openai.py [--rounds 3] [--asks 3]
        [--max-tokens 64] [--threads N] [--json artifacts/bench_openai.json]

All of it runs on one machine here, but in a fleet the broker, the controller and the
client run elsewhere: so by default the model (all three paths alike) gets every core but
one, and that one is left to them. ``--threads N`` sets model.n_threads for all three paths.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import httpx  # noqa: E402
import msgspec  # noqa: E402
import yaml  # noqa: E402

from agent.catalog.select import plan_selection  # noqa: E402
from agent.config import AgentConfig, ModelConfig, RuntimeConfig, SigningConfig  # noqa: E402
from agent.fleet.auth import hash_secret  # noqa: E402
from agent.log import configure_logging  # noqa: E402
from agent.runtime.engine import Engine  # noqa: E402
from agent.runtime.request import GenerateRequest  # noqa: E402
from bench_decode import Timing, ladder_dir  # noqa: E402
from bench_http import LlamaServer  # noqa: E402
from tests.support.broker import Broker, free_port  # noqa: E402

ARTIFACTS = Path(os.environ.get("EDGE_AGENT_ARTIFACTS", REPO / "artifacts"))
DEVICE = "bench-openai"
MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
TARGET_ENGINE_RATIO = 0.9
TARGET_SERVER_RATIO = 1.0
TARGET_ADDED_TTFT_P50_MS = 10.0
EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))


def _wait(predicate, what: str, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)


# Nagle off on the benchmark's HTTP client, for both servers: httpx writes a request's headers
# and body separately, and with Nagle on the body waits for the server's delayed ACK (~40 ms),
# a cost of how this client is configured, not of the server being measured.
CLIENT = httpx.Client(timeout=300, transport=httpx.HTTPTransport(
    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]))


def stream_chat(url: str, headers: dict[str, str], body: dict) -> dict:
    """One streamed /v1/chat/completions: TTFT and decode tok/s over the content chunks."""
    timing = Timing()
    with CLIENT.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                       headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    timing.piece()
    return timing.result()


class ThroughEngine:
    def __init__(self, selection, work: Path) -> None:
        self.engine = Engine(RuntimeConfig(flash_attn=selection.flash_attn),
                             state_dir=work / "engine-state", device_id=DEVICE)
        self.engine.load(selection)
        self.count = 0

    def ask(self, max_tokens: int) -> dict:
        self.count += 1
        timing = Timing()
        request = msgspec.convert({"id": f"e{self.count}", "messages": MESSAGES,
                                   "max_tokens": max_tokens, "temperature": 0.0, "seed": 1},
                                  GenerateRequest)
        for record in self.engine.generate(request):
            if record.get("delta"):
                timing.piece()
        return timing.result()

    def close(self) -> None:
        self.engine.close()


class ThroughFleet:
    """mosquitto, `edge-agent run` and `edge-agent fleet serve`, each its own process."""

    def __init__(self, quant: str, threads: int | None, work: Path) -> None:
        self.broker = Broker(work / "broker").start()
        mqtt = {"host": self.broker.host, "port": self.broker.port}
        agent = {"device_id": DEVICE, "state_dir": str(work / "daemon-state"),
                 "cache_dir": str(work / "models"), "mqtt": mqtt,
                 "model": {"manifest": str(ladder_dir() / "manifest.json"), "pin": quant,
                           "n_threads": threads},
                 "telemetry": {"interval_s": 30.0}, "signing": {"allow_unsigned": True},
                 "log": {"json": True, "level": "warning"}}
        (work / "agent.yaml").write_text(yaml.safe_dump(agent))
        token = secrets.token_urlsafe(24)
        self.headers = {"Authorization": f"Bearer {token}"}
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        fleet = {"controller_id": "bench-controller", "mqtt": mqtt, "http_port": port,
                 "db_path": str(work / "fleet.db"), "model_dir": str(work / "fleet-models"),
                 "default_telemetry_interval_s": 30.0,
                 "auth": {"api_token_hashes": [hash_secret(token, method="sha256")]},
                 "log": {"json": True, "level": "warning"}}
        (work / "fleet.yaml").write_text(yaml.safe_dump(fleet))
        self.processes = []
        for name, argv in (("daemon", [EDGE_AGENT, "run", "--config", str(work / "agent.yaml")]),
                           ("fleet", [EDGE_AGENT, "fleet", "serve", "--config",
                                      str(work / "fleet.yaml")])):
            log = work / f"{name}.log"
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
            self.processes.append(process)
        _wait(self._servable, "the fleet did not list the model", self.processes[1],
              work / "fleet.log")

    def _servable(self) -> bool:
        try:
            listed = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        return any(entry["id"] == MODEL for entry in listed.get("data", []))

    def ask(self, max_tokens: int) -> dict:
        return stream_chat(self.url, self.headers, {"model": MODEL, "messages": MESSAGES,
                                                    "max_tokens": max_tokens, "temperature": 0.0,
                                                    "seed": 1})

    def close(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        self.broker.stop()


class ThroughLlamaServer:
    def __init__(self, model: Path, selection) -> None:
        self.server = LlamaServer(model, n_ctx=selection.n_ctx, n_threads=selection.n_threads,
                                  n_batch=selection.n_batch)

    def ask(self, max_tokens: int) -> dict:
        return stream_chat(self.server.url, {}, {"messages": MESSAGES, "max_tokens": max_tokens,
                                                 "temperature": 0.0, "seed": 1})

    def close(self) -> None:
        self.server.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run(quant: str = "Q4_K_M", rounds: int = 3, asks: int = 3, max_tokens: int = 64,
        threads: int | None = None) -> dict:
    threads = threads or max(1, (os.cpu_count() or 2) - 1)
    with tempfile.TemporaryDirectory(prefix="bench-openai-") as tmp:
        work = Path(tmp)
        # The local test ladder: nothing to verify it against, so unsigned is fine here.
        config = AgentConfig(device_id=DEVICE, state_dir=str(work / "plan-state"),
                             model=ModelConfig(manifest=str(ladder_dir() / "manifest.json"),
                                               pin=quant, n_threads=threads),
                             signing=SigningConfig(allow_unsigned=True))
        selection = plan_selection(config, manifest_source=config.model.manifest,
                                   state_dir=config.state_dir)
        selection = msgspec.structs.replace(selection, model_path=str(ladder_dir() / selection.file))
        paths = {
            "engine in-process": lambda: ThroughEngine(selection, work),
            "fleet /v1 (controller+broker+device)": lambda: ThroughFleet(quant, threads, work),
            "llama_cpp.server /v1": lambda: ThroughLlamaServer(ladder_dir() / selection.file,
                                                               selection),
        }
        runners = {}
        results: dict[str, list[dict]] = {name: [] for name in paths}
        try:
            for name, make in paths.items():
                runners[name] = make()
                runners[name].ask(4)  # warm-up: first-use allocations are not what users see
            for _ in range(rounds):
                for name, runner in runners.items():
                    results[name] += [runner.ask(max_tokens) for _ in range(asks)]
        finally:
            for runner in runners.values():
                runner.close()
    table = {name: {"decode_tps": statistics.median(r["decode_tps"] for r in rows),
                    "ttft_ms": statistics.median(r["ttft_ms"] for r in rows),
                    "ttft_ms_p99": _percentile([r["ttft_ms"] for r in rows], 99)}
             for name, rows in results.items()}
    engine, fleet, server = (table[name] for name in paths)
    engine_ratio = fleet["decode_tps"] / engine["decode_tps"]
    server_ratio = fleet["decode_tps"] / server["decode_tps"]
    added_ttft = fleet["ttft_ms"] - engine["ttft_ms"]
    return {
        "model": selection.file,
        "settings": {"n_ctx": selection.n_ctx, "n_threads": selection.n_threads,
                     "n_batch": selection.n_batch, "flash_attn": selection.flash_attn},
        "rounds": rounds, "asks_per_round": asks, "max_tokens": max_tokens, "paths": table,
        "fleet_vs_engine_decode_ratio": round(engine_ratio, 4),
        "fleet_vs_engine_target": TARGET_ENGINE_RATIO,
        "fleet_vs_llama_cpp_server_decode_ratio": round(server_ratio, 4),
        "fleet_vs_llama_cpp_server_target": TARGET_SERVER_RATIO,
        "added_ttft_ms_p50": round(added_ttft, 3),
        "added_ttft_p50_target_ms": TARGET_ADDED_TTFT_P50_MS,
        "meets_targets": engine_ratio >= TARGET_ENGINE_RATIO
        and server_ratio >= TARGET_SERVER_RATIO and added_ttft <= TARGET_ADDED_TTFT_P50_MS,
        "load_average": os.getloadavg(),
    }


def render_table(result: dict) -> str:
    title = (f"OpenAI front door ({result['model']}, streamed chat, {result['max_tokens']} "
             f"tokens, {result['settings']}; medians)")
    lines = [title, f"  {'path':38} {'decode tok/s':>12} {'TTFT ms':>9} {'TTFT p99':>9}"]
    for name, row in result["paths"].items():
        lines.append(f"  {name:38} {row['decode_tps']:12.1f} {row['ttft_ms']:9.1f} "
                     f"{row['ttft_ms_p99']:9.1f}")
    lines.append(f"  fleet / engine decode {result['fleet_vs_engine_decode_ratio']:.3f} "
                 f"(target >= {TARGET_ENGINE_RATIO}); fleet / llama_cpp.server "
                 f"{result['fleet_vs_llama_cpp_server_decode_ratio']:.3f} "
                 f"(target >= {TARGET_SERVER_RATIO}); added TTFT p50 "
                 f"{result['added_ttft_ms_p50']:+.1f} ms (target <= {TARGET_ADDED_TTFT_P50_MS})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--asks", type=int, default=3, help="prompts per path per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="model.n_threads for every path (default: all cores but one)")
    parser.add_argument("--json", type=Path, default=ARTIFACTS / "bench_openai.json")
    args = parser.parse_args()
    configure_logging("warning")
    result = run(args.quant, args.rounds, args.asks, args.max_tokens, args.threads)
    print(render_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
