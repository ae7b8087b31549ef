"""The test model ladder: real files that match their manifest, load, and generate text."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

LADDER = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]


def test_manifest_lists_the_whole_ladder_with_measured_quality(ladder_manifest: dict) -> None:
    (model,) = ladder_manifest["models"]
    variants = {v["quant"]: v for v in model["variants"]}
    assert list(variants) == LADDER
    assert variants["F16"]["quality"] == 1.0
    # Measured against the F16: every quantized variant loses something, and the
    # coarsest quant loses the most.
    assert all(0 < variants[q]["quality"] < 1.0 for q in LADDER[1:])
    assert min(variants.values(), key=lambda v: v["quality"])["quant"] == "Q2_K"


@pytest.mark.parametrize("quant", LADDER)
def test_variant_file_matches_manifest(ladder_dir: Path, ladder_manifest: dict, quant: str) -> None:
    variant = next(v for v in ladder_manifest["models"][0]["variants"] if v["quant"] == quant)
    path = ladder_dir / variant["file"]
    assert path.stat().st_size == variant["size"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == variant["sha256"]


GENERATE = """
import json, sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
out = llm("The capital of France is", max_tokens=8, temperature=0.0)
print(json.dumps({"text": out["choices"][0]["text"], "finish": out["choices"][0]["finish_reason"],
                  "tokens": out["usage"]["completion_tokens"],
                  "retokenized": len(llm.tokenize(out["choices"][0]["text"].encode(), add_bos=False))}))
"""


def generate(path: Path) -> dict:
    # A fresh process per variant: a native crash must fail this test, not the run.
    result = subprocess.run([sys.executable, "-c", GENERATE, str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def reference(ladder_model) -> dict:
    return generate(ladder_model("F16"))


@pytest.mark.parametrize("quant", LADDER)
def test_variant_loads_and_generates(ladder_model, ladder_manifest: dict, reference: dict,
                                     quant: str) -> None:
    out = generate(ladder_model(quant))
    # Tokens really came out of the model: the text is as long as the count it reports, within
    # the budget (retokenizing may merge a token or two at the seams).
    assert out["finish"] in ("length", "stop") and 1 <= out["tokens"] <= 8, out
    assert out["text"].strip() and abs(out["retokenized"] - out["tokens"]) <= 2, out
    # The oracle is the F16: a variant its measured quality puts close to it starts the same way.
    quality = next(v["quality"] for v in ladder_manifest["models"][0]["variants"] if v["quant"] == quant)
    if quality >= 0.9:
        assert out["text"].split()[0] == reference["text"].split()[0], (out, reference)


def test_llama_build_has_no_amx_path() -> None:
    """scripts/setup builds with explicit ISA flags: ggml's AMX path (which segfaults in
    llama_decode on Sapphire Rapids) must not be compiled in, whatever this CPU has."""
    info = subprocess.run(
        [sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert info.startswith("CPU :")
    assert "AMX_INT8 = 1" not in info
