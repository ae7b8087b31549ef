"""Decode speed prediction vs measurement, per ladder variant, before and after `edge-agent bench`.

1. The selector's prediction (plan_selection on this machine's probe, nothing learned): the
   measured bandwidth x the default efficiency / bytes read per token at the typical fill.
2. One `edge-agent bench --manifest M` (the real command, in a child process) on a fresh state
   directory: each measured generation teaches LearnedSpeed this build's decode rate.
3. The prediction again, from what was learned; and, per variant, the prediction it would get
   from the other variants' rates alone (the build's median), i.e. a variant that never ran.
4. The reference: each variant decoded in a fresh engine on a separate state directory, three
   runs before the calibration and three after (median of the six), on bench's prompt, which
   puts the middle of the decode near the typical context fill where the prediction is made
   (the table shows that context).

Prints a table; writes artifacts/bench_speed_prediction.json. Target: within ±20 % after
calibration. Run it on an otherwise idle machine (it measures decode speed):

    ~/.cache/edge-agent/venv/bin/python scripts/bench_speed_prediction.py
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.catalog.gguf import read_gguf_file  # noqa: E402
from agent.catalog.learned import DecodeRates, LearnedSpeed, llama_build_key  # noqa: E402
from agent.catalog.manifest import load_manifest  # noqa: E402
from agent.catalog.select import plan_selection  # noqa: E402
from agent.catalog.speed import TYPICAL_CONTEXT_TOKENS, predict_tokens_per_s  # noqa: E402
from agent.config import load_config  # noqa: E402

ARTIFACTS = REPO / "artifacts"
TARGET = 0.20
DECODE_TOKENS = 64
RUNS = 3  # per variant, median: the reference and `edge-agent bench`'s default alike
DEVICE_ID = "bench-speed"
GIB = 1024**3


def ladder_dir() -> Path:
    return Path(os.environ.get("EDGE_AGENT_LADDER", Path.home() / ".cache/edge-agent/ladder"))


def write_config(path: Path, state_dir: Path, manifest: Path) -> Path:
    path.write_text(
        f"device_id: {DEVICE_ID}\nstate_dir: {state_dir}\ncache_dir: {state_dir / 'cache'}\n"
        f"model:\n  manifest: {manifest}\nsigning:\n  allow_unsigned: true\n"
        "log:\n  level: warning\n")
    return path


def predictions(config_path: Path, device) -> dict[str, dict]:
    """quant -> the selector's candidate row (predicted and measured tok/s, n_ctx, KV)."""
    selection = plan_selection(load_config(str(config_path)), device=device, memory_bytes=64 * GIB)
    return {c.quant: {"predicted": c.predicted_tokens_per_s, "measured": c.measured_tokens_per_s,
                      "n_ctx": c.n_ctx, "kv_type": c.kv_type} for c in selection.candidates}


def run_bench_command(config_path: Path, manifest: Path) -> dict[str, float]:
    """`edge-agent bench` as an operator runs it; quant -> its decode tok/s."""
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "--manifest", str(manifest), "--config",
         str(config_path), "--json", "--max-tokens", str(DECODE_TOKENS)],
        capture_output=True, text=True, timeout=1800, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise SystemExit(f"edge-agent bench failed ({done.returncode}): {done.stderr[-2000:]}")
    return {row["quant"]: row["decode_tokens_per_s"] for row in json.loads(done.stdout)["variants"]}


def measure_at_typical_fill(manifest_path: Path, state_dir: Path) -> dict[str, dict]:
    """quant -> decode tok/s of RUNS generations in a fresh engine, and their mid context."""
    from agent.commands.bench import BENCH_PROMPT
    from agent.config import RuntimeConfig, SigningConfig
    from agent.runtime.engine import Engine
    from agent.runtime.local import manifest_selections
    from agent.runtime.request import GenerateRequest

    _, selections = manifest_selections(str(manifest_path), SigningConfig(allow_unsigned=True),
                                        n_ctx=2048)
    results = {}
    for selection in selections:
        engine = Engine(RuntimeConfig(), state_dir=state_dir, device_id="reference")
        try:
            engine.load(selection)
            list(engine.generate(GenerateRequest(id="warm", prompt="Hello", max_tokens=4)))
            # A new first token per run, so no run reuses the previous one's cached prompt.
            finals = [list(engine.generate(GenerateRequest(
                id=f"measure-{i}", prompt=f"Part {i + 1}. {BENCH_PROMPT}",
                max_tokens=DECODE_TOKENS, temperature=0.0)))[-1] for i in range(RUNS)]
        finally:
            engine.close()
        usage = finals[0]["usage"]
        results[selection.quant] = {
            "samples": [f["timings"]["decode_tokens_per_s"] for f in finals],
            "context_mid": usage["prompt_tokens"] + usage["completion_tokens"] / 2,
        }
    return results


def without(rates: DecodeRates, sha256: str) -> DecodeRates:
    return DecodeRates({key: d for key, d in rates.variants.items() if key[0] != sha256})


def error(predicted: float | None, measured: float) -> float | None:
    return None if predicted is None else round((predicted - measured) / measured, 4)


def run() -> dict:
    from agent.hardware.probe import probe

    folder = ladder_dir()
    manifest_path = folder / "manifest.json"
    manifest = load_manifest(str(manifest_path))
    variants = {v.quant: v for v in manifest.model().variants}
    device = probe(model_dir=str(folder))
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as scratch:
        scratch_dir = Path(scratch)
        config_path = write_config(scratch_dir / "agent.yaml", scratch_dir / "state", manifest_path)
        started = time.monotonic()
        before = predictions(config_path, device)
        # The reference is measured on both sides of the calibration and pooled, so a drift of
        # the shared machine's speed during the run shows as spread, not as prediction error.
        reference = measure_at_typical_fill(manifest_path, scratch_dir / "reference-state")
        bench_figures = run_bench_command(config_path, manifest_path)
        after = predictions(config_path, device)
        rates = LearnedSpeed(scratch_dir / "state").rates(DEVICE_ID, llama_build_key())
        for quant, later in measure_at_typical_fill(
                manifest_path, scratch_dir / "reference-state").items():
            reference[quant]["samples"] += later["samples"]
    rows = []
    for quant, measured in reference.items():
        variant = variants[quant]
        info = read_gguf_file(folder / variant.file)
        plan = after[quant]
        others = without(rates, variant.sha256).build_bytes_per_s(0)
        unseen = predict_tokens_per_s(info, plan["n_ctx"], plan["kv_type"], device.bandwidth_gbps,
                                      learned_bytes_per_s=others)
        tps = statistics.median(measured["samples"])
        rows.append({
            "quant": quant, "measured_tokens_per_s": tps, "context_mid": measured["context_mid"],
            "measured_samples": measured["samples"],
            "bench_tokens_per_s": bench_figures.get(quant),
            "before": before[quant]["predicted"], "before_error": error(before[quant]["predicted"], tps),
            "after": plan["predicted"], "after_error": error(plan["predicted"], tps),
            "from_other_variants": unseen, "from_other_variants_error": error(unseen, tps),
        })
    worst_after = max(abs(r["after_error"]) for r in rows if r["after_error"] is not None)
    return {
        "bandwidth_gbps": device.bandwidth_gbps, "typical_context_tokens": TYPICAL_CONTEXT_TOKENS,
        "llama_build": llama_build_key(), "decode_tokens": DECODE_TOKENS, "rows": rows,
        "max_abs_error_after": worst_after, "target": TARGET, "within_target": worst_after <= TARGET,
        "seconds": round(time.monotonic() - started, 1),
    }


def _cell(value: float | None, err: float | None) -> str:
    return f"{'-':>7} {'':>8}" if value is None else f"{value:7.1f} ({100 * err:+5.1f}%)"


def render_table(result: dict) -> str:
    lines = [
        f"Decode speed: predicted at {result['typical_context_tokens']} tokens of context vs measured "
        f"at {result['rows'][0]['context_mid']:.0f} "
        f"(bandwidth {result['bandwidth_gbps'] or 0:.1f} GB/s, llama.cpp {result['llama_build']}; "
        "before = default efficiency, after = one `edge-agent bench`)",
        f"  {'variant':8} {'measured':>8}  {'before':>17}  {'after bench':>17}  {'from other variants':>19}",
    ]
    for r in result["rows"]:
        lines.append(
            f"  {r['quant']:8} {r['measured_tokens_per_s']:8.1f}  {_cell(r['before'], r['before_error']):>17}  "
            f"{_cell(r['after'], r['after_error']):>17}  "
            f"{_cell(r['from_other_variants'], r['from_other_variants_error']):>19}")
    lines.append(f"  largest error after calibration {100 * result['max_abs_error_after']:.1f} % "
                 f"(target ±{100 * result['target']:.0f} %): "
                 f"{'within' if result['within_target'] else 'NOT within'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ARTIFACTS / "bench_speed_prediction.json")
    args = parser.parse_args()
    from agent.log import configure_logging

    configure_logging("warning")
    result = run()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(render_table(result))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
