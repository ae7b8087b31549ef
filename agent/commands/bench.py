"""``edge-agent bench``: prefill and decode tok/s, TTFT and peak RSS per variant.

Each variant is loaded in a fresh worker through the engine (so the numbers include
exactly what serving pays), warmed up with one short generation, then measured ``--runs``
times on a fixed prompt at temperature 0; the row is the run with the median decode speed,
so one run slowed by a neighbour on the machine does not make the figure. A table on a terminal, JSON with ``--json``. ``--manifest``
follows the daemon's signature rules, as ``prompt`` does. This module measures and prints;
the state it changes is the runtime's: remembered settings, learned memory, and the decode
rate each measured generation teaches the selector (agent.catalog.learned.LearnedSpeed,
under the config's state_dir and device_id), so ``select`` predicts this device's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.commands.prompt import add_signing_arguments, with_signing_arguments
from agent.config import load_config
from agent.errors import EdgeAgentError
from agent.log import configure_logging

HELP = "prefill/decode tok/s, TTFT and peak RSS per variant"
MIB = 1024 * 1024

# About 120 tokens of plain prose, four times: about 470 tokens (SmolLM2's tokenizer), so with
# the default 64 decoded tokens the middle of the decode sits at the context the selector
# predicts speed at (agent.catalog.speed.TYPICAL_CONTEXT_TOKENS, 512). On a small model the
# context costs more than its KV bytes suggest (attention compute), so the rate bench teaches
# is measured where the prediction is made.
_PROSE = (
    "The lighthouse stood at the end of a long stone pier, and every evening the keeper "
    "climbed its narrow stairs to light the lamp. Ships passing in the night relied on its "
    "steady beam to find their way past the rocks. Over the years the keeper had seen storms "
    "that tore the roofs from houses, winters when the sea froze near the shore, and summers "
    "so calm that the water looked like glass. He kept a journal of every ship he saw, the "
    "weather each day, and the small repairs he made to the lamp and the windows. One "
    "morning, a letter arrived that would change"
)
BENCH_PROMPT = " ".join([_PROSE] * 4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a GGUF file")
    source.add_argument("--manifest", help="a local manifest: every variant next to it")
    parser.add_argument("--config", help="agent config file (state dir, runtime settings)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to decode per run")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per variant (median)")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_signing_arguments(parser)


def bench_selection(engine, selection, max_tokens: int, runs: int = 1) -> dict[str, Any]:
    """Load ``selection``, warm up, measure ``runs`` generations. Returns one result row: the
    run with the median decode speed."""
    from agent.runtime.request import GenerateRequest

    engine.load(selection)
    list(engine.generate(GenerateRequest(id="warmup", prompt="Hello", max_tokens=4, temperature=0.0)))
    finals = []
    for run_index in range(max(runs, 1)):
        # A different first token each run: llama.cpp would reuse the cached prefix of a
        # repeated prompt and time no prefill at all.
        final = list(engine.generate(GenerateRequest(
            id=f"bench-{run_index}", prompt=f"Chapter {run_index + 1}. {BENCH_PROMPT}",
            max_tokens=max_tokens, temperature=0.0,
        )))[-1]
        if "error" in final:
            raise EdgeAgentError(f"{selection.quant}: {final['error']['message']}")
        finals.append(final)
    final = sorted(finals, key=lambda f: f["timings"]["decode_tokens_per_s"])[len(finals) // 2]
    worker = engine.stats()["worker"]
    return {
        "quant": selection.quant,
        "file": selection.file,
        "size_bytes": selection.size,
        "n_ctx": selection.n_ctx,
        "n_threads": worker["settings"]["n_threads"],
        "fallback_step": worker["fallback_step"],
        "load_ms": worker["load_ms"],
        "prompt_tokens": final["usage"]["prompt_tokens"],
        "completion_tokens": final["usage"]["completion_tokens"],
        **final["timings"],
        "peak_rss_bytes": worker["peak_rss_bytes"],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'quant':<8} {'size MiB':>9} {'prefill t/s':>12} {'decode t/s':>11} {'TTFT ms':>9} {'peak RSS MiB':>13}"
    lines = [header, "-" * len(header)]
    for row in rows:
        peak = row["peak_rss_bytes"]
        lines.append(
            f"{row['quant']:<8} {row['size_bytes'] / MIB:>9.1f} {row['prefill_tokens_per_s']:>12.1f} "
            f"{row['decode_tokens_per_s']:>11.1f} {row['ttft_ms']:>9.1f} "
            f"{(peak / MIB if peak else float('nan')):>13.1f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from agent.runtime.engine import Engine
    from agent.runtime.local import manifest_selections, selection_for_file

    configure_logging(level=os.environ.get("EDGE_AGENT_LOG__LEVEL", "warning"))
    config = with_signing_arguments(load_config(args.config), args)
    if args.model:
        selections = [selection_for_file(args.model, n_ctx=args.n_ctx, n_threads=args.threads)]
    else:
        source = args.manifest or config.model.manifest
        if not source:
            raise EdgeAgentError("give --model PATH or --manifest M (or model.manifest in the config)")
        _, selections = manifest_selections(
            source, config.signing, n_ctx=args.n_ctx, n_threads=args.threads
        )
    rows = []
    for selection in selections:
        # A fresh engine per variant: peak RSS is per worker, and no swap logic is measured.
        engine = Engine(config.runtime, state_dir=Path(config.state_dir), device_id=config.device_id)
        try:
            rows.append(bench_selection(engine, selection, args.max_tokens, args.runs))
        finally:
            engine.close()
        if not args.json:
            print(format_table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else format_table(rows), file=sys.stdout, flush=True)
    if args.json:
        print(json.dumps({"variants": rows}, indent=2))
    else:
        print(f"decode rates learned in {config.state_dir} for the selector's speed prediction")
    return 0
