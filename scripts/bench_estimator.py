"""Memory estimator vs measurement: every variant of a manifest x n_ctx (512/2048/8192).

Each cell loads the model in a fresh process (tests/catalog/rss_measure.py: n_threads 2,
n_batch/n_ubatch 512, mmap on, flash attention on, one full ubatch of prompt + 4 decode
steps) and compares the peak RSS growth over the idle worker's baseline with
estimate_memory() for the same settings on this CPU. Prints a table; --json PATH writes it.
The models are the llama ladder's by default; ``--model-dir`` names another folder with a
manifest.json, e.g. the second architecture's (gemma3, from scripts/make-test-models):

    /root/.cache/edge-agent/venv/bin/python scripts/bench_estimator.py [--json out.json]
    .../python scripts/bench_estimator.py --model-dir ~/.cache/edge-agent/gemma \
        --contexts 512,2048,8192,16384,32768
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.catalog.estimate import estimate_memory, repack_rules  # noqa: E402
from agent.catalog.gguf import read_gguf_file  # noqa: E402
from agent.catalog.manifest import load_manifest  # noqa: E402
from tests.catalog.rss_measure import measure_peak_rss  # noqa: E402

CONTEXTS = (512, 2048, 8192)
MiB = 1024 * 1024


def ladder_dir() -> Path:
    return Path(os.environ.get("EDGE_AGENT_LADDER", Path.home() / ".cache/edge-agent/ladder"))


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return line.split(":", 1)[1].split()
    return []


def run(contexts: tuple[int, ...] = CONTEXTS, model_dir: Path | None = None) -> dict:
    folder = model_dir or ladder_dir()
    manifest = load_manifest(str(folder / "manifest.json"))
    repack = repack_rules(platform.machine(), cpu_flags())
    rows = []
    for variant in manifest.model().variants:
        path = folder / variant.file
        info = read_gguf_file(path)
        for n_ctx in contexts:
            measured = measure_peak_rss(str(path), n_ctx)
            estimate = estimate_memory(info, path.stat().st_size, n_ctx=n_ctx, repack=repack)
            estimated = estimate.ram_bytes - estimate.process_bytes
            error = estimated - measured["growth"]
            rows.append({
                "quant": variant.quant, "n_ctx": n_ctx, "measured_bytes": measured["growth"],
                "estimated_bytes": estimated, "error_bytes": error,
                "error_percent": round(100 * error / measured["growth"], 2),
                "tolerance_bytes": max(int(0.05 * measured["growth"]), 16 * MiB),
                "worker_baseline_bytes": measured["before"]["VmRSS"],
            })
    return {"rows": rows, "max_abs_error_bytes": max(abs(r["error_bytes"]) for r in rows),
            "within_tolerance": all(abs(r["error_bytes"]) <= r["tolerance_bytes"] for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result as JSON to this path")
    parser.add_argument("--model-dir", type=Path, help="folder with manifest.json (default: the "
                        "ladder, $EDGE_AGENT_LADDER)")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)),
                        help="comma-separated n_ctx values")
    args = parser.parse_args()
    result = run(tuple(int(n) for n in args.contexts.split(",")), args.model_dir)
    print(f"{'variant':8} {'n_ctx':>6} {'measured':>11} {'estimate':>11} {'error':>9} {'error %':>8}")
    for r in result["rows"]:
        print(f"{r['quant']:8} {r['n_ctx']:>6} {r['measured_bytes'] / MiB:>7.1f} MiB "
              f"{r['estimated_bytes'] / MiB:>7.1f} MiB {r['error_bytes'] / MiB:>+5.1f} MiB {r['error_percent']:>+7.2f}")
    print(f"max |error| {result['max_abs_error_bytes'] / MiB:.1f} MiB; "
          f"within max(5 %, 16 MiB): {result['within_tolerance']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
