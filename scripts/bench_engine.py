#!/usr/bin/env python3
"""Benchmark: the engine's decode speed against llama-cpp-python in-process, and its idle cost.

Per ladder variant, alternating runs in one process (ratios from this one run):
  same settings   decode tok/s through the Engine / llama-cpp-python in-process with the
                  same settings (target >= 0.97: the worker process and pipe cost nothing)
  auto vs naive   the engine with its auto-chosen settings (agent.catalog.select when it
                  exists, else physical-core threads) / the naive
                  ``Llama(model_path=..., n_ctx=2048)`` (target >= 1.0)
and the parent's idle RSS with a model loaded in the worker, measured in a fresh Python
process that imports only agent.runtime.engine (target <= 60 MiB).

Decode tok/s is measured the same way on both sides, as a consumer sees it: completion
tokens after the first, divided by the time from the first streamed chunk to the last.

    /root/.cache/edge-agent/venv/bin/python scripts/bench_engine.py [--json out.json]

A benchmark, not a test: it prints a table and never fails on a number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402

from agent.catalog.selection import Selection  # noqa: E402
from agent.config import AgentConfig, ModelConfig, RuntimeConfig, SigningConfig  # noqa: E402
from agent.log import configure_logging  # noqa: E402
from agent.runtime.engine import Engine  # noqa: E402
from agent.runtime.local import selection_for_file  # noqa: E402
from agent.runtime.request import GenerateRequest  # noqa: E402

MIB = 1024 * 1024
LADDER = Path(os.environ.get("EDGE_AGENT_LADDER", Path.home() / ".cache/edge-agent/ladder"))
VARIANTS = ("Q8_0", "Q4_K_M", "Q2_K")
# Raw text the model continues at temperature 0 without stopping: every run decodes
# exactly max_tokens tokens.
PROMPT = "Count from 1 to 1000: 1, 2, 3, 4, 5, 6,"
NAIVE_N_CTX = 2048
# OpenMP threads spin for a while after a run; a pause keeps one run from slowing the next.
SETTLE_S = 0.5

PARENT_RSS_PROBE = r"""
import json, sys, time
import msgspec, psutil
from pathlib import Path
from agent.catalog.selection import Selection
from agent.config import RuntimeConfig
from agent.runtime.engine import Engine
selection = msgspec.json.decode(sys.argv[1].encode(), type=Selection)
engine = Engine(RuntimeConfig(), state_dir=Path(sys.argv[2]), device_id="bench")
engine.load(selection)
time.sleep(1.0)
stats = engine.stats()
print(json.dumps({
    "parent_rss_bytes": psutil.Process().memory_info().rss,
    "worker_rss_bytes": stats["worker"]["rss_bytes"],
    "heavy_modules_in_parent": sorted(m for m in ("llama_cpp", "numpy") if m in sys.modules),
}))
engine.close()
"""


def _decode_rate(tokens: int, first: float | None, last: float | None) -> float:
    if not first or not last or last <= first or tokens < 2:
        return 0.0
    return (tokens - 1) / (last - first)


def engine_run(engine: Engine, max_tokens: int) -> dict[str, Any]:
    first = last = None
    final: dict[str, Any] = {}
    request = GenerateRequest(id=f"bench-{time.monotonic_ns()}", prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, seed=1)
    for record in engine.generate(request):
        now = time.perf_counter()
        if record.get("done"):
            final, last = record, now
        else:
            first = first or now
            last = now
    if "error" in final:
        raise RuntimeError(final["error"])
    tokens = final["usage"]["completion_tokens"]
    return {"text": final["text"], "tokens": tokens, "decode_tps": _decode_rate(tokens, first, last)}


def llama_run(llama: Any, max_tokens: int) -> dict[str, Any]:
    first = last = None
    parts = []
    # The engine's sampling defaults, not create_completion's (its repeat_penalty is 1.0).
    defaults = GenerateRequest(id="defaults", prompt=PROMPT)
    for chunk in llama.create_completion(
        PROMPT, max_tokens=max_tokens, temperature=0.0, seed=1, stream=True,
        top_p=defaults.top_p, top_k=defaults.top_k, min_p=defaults.min_p,
        repeat_penalty=defaults.repeat_penalty,
    ):
        now = time.perf_counter()
        first = first or now
        last = now
        parts.append(chunk["choices"][0]["text"])
    text = "".join(parts)
    # The prompt never ends at temperature 0, so every run decodes exactly max_tokens.
    return {"text": text, "tokens": max_tokens, "decode_tps": _decode_rate(max_tokens, first, last)}


def ladder_selections() -> dict[str, Selection]:
    """The ladder's variants with the runtime's own defaults (physical-core threads)."""
    manifest = json.loads((LADDER / "manifest.json").read_text())
    return {
        variant["quant"]: selection_for_file(
            LADDER / variant["file"],
            n_ctx=NAIVE_N_CTX,
            model_id=model["id"],
            quant=variant["quant"],
            sha256=variant["sha256"],
            quality=variant["quality"],
        )
        for model in manifest["models"]
        for variant in model["variants"]
    }


def auto_selection(quant: str, fallback: Selection) -> tuple[Selection, str]:
    """What the agent would choose on this machine for ``quant``."""
    try:
        from agent.catalog.select import plan_selection
    except ImportError:
        return fallback, "runtime defaults (agent.catalog.select not available)"
    # The local test ladder: nothing to verify it against, so unsigned is fine here.
    config = AgentConfig(model=ModelConfig(pin=quant), signing=SigningConfig(allow_unsigned=True))
    chosen = plan_selection(config, manifest_source=str(LADDER / "manifest.json"), state_dir=tempfile.mkdtemp())
    return msgspec.structs.replace(chosen, model_path=fallback.model_path), "agent.catalog.select.plan_selection"


def same_settings_kwargs(selection: Selection) -> dict[str, Any]:
    return {
        "model_path": selection.model_path,
        "n_ctx": selection.n_ctx,
        "n_batch": selection.n_batch,
        "n_ubatch": selection.n_ubatch,
        "n_threads": selection.n_threads,
        "n_threads_batch": selection.n_threads,
        "n_gpu_layers": selection.n_gpu_layers,
        "flash_attn": selection.flash_attn,
        "verbose": False,
    }


def parent_rss(selection: Selection) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as state:
        out = subprocess.run(
            [sys.executable, "-c", PARENT_RSS_PROBE, msgspec.json.encode(selection).decode(), state],
            cwd=REPO, capture_output=True, text=True, check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(
    variants: tuple[str, ...] = VARIANTS,
    max_tokens: int = 96,
    rounds: int = 3,
    same_threads: int | None = None,
) -> dict[str, Any]:
    """``same_threads`` fixes the thread count of the same-settings pair (default: physical
    cores). One thread isolates the engine's own overhead on a machine whose cores are
    busy with other work, where multi-threaded decode stalls on preempted threads."""
    import llama_cpp

    by_quant = ladder_selections()
    if same_threads:
        by_quant = {q: msgspec.structs.replace(s, n_threads=same_threads) for q, s in by_quant.items()}
    rows = []
    state_dir = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    for quant in variants:
        base = by_quant[quant]
        auto, auto_source = auto_selection(quant, base)
        same_engine = Engine(RuntimeConfig(), state_dir=state_dir, device_id="bench")
        same_engine.load(base)
        auto_engine = Engine(RuntimeConfig(), state_dir=state_dir, device_id="bench")
        auto_engine.load(auto)
        same_llama = llama_cpp.Llama(**same_settings_kwargs(base))
        naive_llama = llama_cpp.Llama(model_path=base.model_path, n_ctx=NAIVE_N_CTX, verbose=False)
        runs: dict[str, list[float]] = {"engine": [], "in_process": [], "auto": [], "naive": []}
        texts_match = True
        for _ in range(rounds + 1):  # the first round warms caches and is dropped
            measured = {}
            for name, measure in (
                ("engine", lambda: engine_run(same_engine, max_tokens)),
                ("in_process", lambda: llama_run(same_llama, max_tokens)),
                ("auto", lambda: engine_run(auto_engine, max_tokens)),
                ("naive", lambda: llama_run(naive_llama, max_tokens)),
            ):
                time.sleep(SETTLE_S)
                measured[name] = measure()
                print(f"bench_engine: {quant} {name} {measured[name]['decode_tps']:.2f} tok/s", file=sys.stderr, flush=True)
            texts_match &= measured["engine"]["text"] == measured["in_process"]["text"]
            for name, result in measured.items():
                runs[name].append(result["decode_tps"])
        same_llama.close()
        naive_llama.close()
        auto_threads = auto_engine.stats()["worker"]["settings"]["n_threads"]
        same_engine.close()
        auto_engine.close()
        med = {name: statistics.median(values[1:]) for name, values in runs.items()}
        rows.append(
            {
                "quant": quant,
                "engine_tps": round(med["engine"], 2),
                "in_process_tps": round(med["in_process"], 2),
                "same_settings_ratio": round(med["engine"] / med["in_process"], 3),
                "auto_tps": round(med["auto"], 2),
                "naive_tps": round(med["naive"], 2),
                "auto_vs_naive_ratio": round(med["auto"] / med["naive"], 3),
                "same_threads": base.n_threads,
                "auto_threads": auto_threads,
                "auto_n_batch": auto.n_batch,
                "auto_source": auto_source,
                "engine_text_equals_in_process": texts_match,
                "runs": {name: [round(v, 2) for v in values] for name, values in runs.items()},
            }
        )
    rss = parent_rss(by_quant[variants[0]])
    return {
        "max_tokens": max_tokens,
        "rounds": rounds,
        "cpu_count": os.cpu_count(),
        "variants": rows,
        "parent_idle_rss_mib": round(rss["parent_rss_bytes"] / MIB, 1),
        "worker_rss_mib": round(rss["worker_rss_bytes"] / MIB, 1),
        "heavy_modules_in_parent": rss["heavy_modules_in_parent"],
        "targets": {"same_settings_ratio": 0.97, "auto_vs_naive_ratio": 1.0, "parent_idle_rss_mib": 60},
    }


def format_table(result: dict[str, Any]) -> str:
    header = (
        f"{'quant':<7} {'thr':>3} {'engine t/s':>10} {'in-proc t/s':>11} {'ratio':>6} "
        f"{'auto t/s':>9} {'naive t/s':>9} {'ratio':>6} {'auto thr':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in result["variants"]:
        lines.append(
            f"{row['quant']:<7} {row['same_threads']:>3} {row['engine_tps']:>10.2f} {row['in_process_tps']:>11.2f} "
            f"{row['same_settings_ratio']:>6.3f} {row['auto_tps']:>9.2f} {row['naive_tps']:>9.2f} "
            f"{row['auto_vs_naive_ratio']:>6.3f} {row['auto_threads']:>8}"
        )
    lines.append(
        f"parent idle RSS with a model loaded in the worker: {result['parent_idle_rss_mib']} MiB "
        f"(worker {result['worker_rss_mib']} MiB; heavy modules in parent: "
        f"{result['heavy_modules_in_parent'] or 'none'})"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--same-threads", type=int, default=None, help="threads of the same-settings pair")
    args = parser.parse_args()
    configure_logging(level="warning")  # logs on stderr; the table alone on stdout
    result = run(tuple(args.variants.split(",")), args.max_tokens, args.rounds, args.same_threads)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
