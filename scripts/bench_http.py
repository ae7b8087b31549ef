"""Baseline: llama-cpp-python's own OpenAI-compatible server (llama_cpp.server) over HTTP.

Starts ``python -m llama_cpp.server`` on a free loopback port with the given model and
settings, streams completions and measures time to first token and decode tok/s as a
client sees them. Used by scripts/bench; runnable alone:

    ~/.cache/edge-agent/venv/bin/python scripts/bench_http.py --model M.gguf [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, model: Path, *, n_ctx: int, n_threads: int, n_batch: int = 512) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads),
             "--n_batch", str(n_batch)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("llama_cpp.server exited; is the 'bench' extra installed?")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("llama_cpp.server did not come up within 120 s")

    def stream(self, prompt: str, max_tokens: int, sampling: dict | None = None) -> dict:
        """One streamed completion: TTFT and decode tok/s as the HTTP client sees them.
        ``sampling``: request fields beside the greedy default (the server's repeat_penalty
        is 1.1 unless told)."""
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": 1,
                "stream": True, **(sampling or {})}
        arrivals: list[float] = []
        started = time.perf_counter()
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=300) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    if json.loads(line[6:])["choices"][0].get("text"):
                        arrivals.append(time.perf_counter())
        if not arrivals:
            raise RuntimeError("llama_cpp.server streamed no text for the benchmark prompt")
        ttft = arrivals[0] - started
        decode = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
        return {"ttft_ms": ttft * 1000, "decode_tokens_per_s": decode, "tokens": len(arrivals)}

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run(model: Path, *, n_ctx: int = 2048, n_threads: int = 2, max_tokens: int = 64,
        repeats: int = 3, prompt: str = PROMPT) -> dict:
    server = LlamaServer(model, n_ctx=n_ctx, n_threads=n_threads)
    try:
        server.stream(prompt, 4)  # warm-up: first-use allocations are not what users see
        runs = [server.stream(prompt, max_tokens) for _ in range(repeats)]
    finally:
        server.close()
    return {
        "model": model.name,
        "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.model, max_tokens=args.max_tokens)
    print(f"{'baseline':28} {'TTFT ms':>9} {'decode tok/s':>13}")
    print(f"{'llama_cpp.server (HTTP)':28} {result['ttft_ms']:9.1f} {result['decode_tokens_per_s']:13.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
