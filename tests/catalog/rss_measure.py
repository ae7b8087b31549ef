"""Measure what loading a GGUF really costs in a fresh process: the estimator's ground truth.

A child ``python -c`` imports llama_cpp, takes its RSS as the baseline, loads the model
with the settings the estimator assumes, evaluates one full ubatch of prompt (so the
compute buffers the daemon will use are touched, and the KV cache is written) and a few
decode steps, then reports its peak RSS (VmHWM) and the split into anonymous and
file-backed pages. Growth = peak - baseline: what a worker adds on top of an idle
interpreter with llama_cpp imported. With mmap, the model file's pages count once they are
mapped (llama.cpp populates the mapping on load), exactly as they do for the daemon.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys
import llama_cpp
params = json.loads(sys.argv[1])

def status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields

kv_types = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
llama_cpp.llama_backend_init()
before = status()
llm = llama_cpp.Llama(
    model_path=params["model"], n_ctx=params["n_ctx"], n_batch=params["n_batch"],
    n_ubatch=params["n_ubatch"], n_threads=params["n_threads"], use_mmap=params["use_mmap"],
    flash_attn=params["flash_attn"], type_k=kv_types[params["kv_type"]],
    type_v=kv_types[params["kv_type"]], verbose=False,
)
loaded = status()
n_prompt = params["n_ctx"] - 8 if params["fill"] else min(params["n_ubatch"], params["n_ctx"] - 8)
llm.eval([100 + (i % 1000) for i in range(n_prompt)])
for step in range(4):
    llm.eval([200 + step])
after = status()
# VmHWM, not ru_maxrss: the kernel carries ru_maxrss over exec from the parent's address
# space, so a child of a big process (a benchmark that loaded models) would report the
# parent's peak. VmHWM belongs to this process image alone.
peak = after["VmHWM"]
print(json.dumps({"before": before, "loaded": loaded, "after": after, "peak_rss": peak,
                  "n_ctx_actual": llm.n_ctx(), "n_prompt": n_prompt}))
"""


def measure_peak_rss(
    model: str,
    n_ctx: int,
    *,
    n_batch: int = 512,
    n_ubatch: int = 512,
    n_threads: int = 2,
    kv_type: str = "f16",
    flash_attn: bool = True,
    use_mmap: bool = True,
    fill: bool = False,
    python: str = sys.executable,
) -> dict:
    """Run one load + eval in a fresh process; returns the child's figures plus ``growth``.

    ``fill`` evaluates up to n_ctx instead of one ubatch (minutes at 8192 on 2 cores).
    """
    params = dict(model=str(model), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                  n_threads=n_threads, kv_type=kv_type, flash_attn=flash_attn, use_mmap=use_mmap, fill=fill)
    done = subprocess.run(
        [python, "-c", CHILD, json.dumps(params)], capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(f"measurement child failed ({done.returncode}): {done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["growth"] = figures["peak_rss"] - figures["before"]["VmRSS"]
    return figures
