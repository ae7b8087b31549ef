"""``edge-agent prompt`` and ``edge-agent bench`` as a user runs them, on a real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def edge_agent(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGE_AGENT_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_prompt_streams_and_json_gives_the_final_record(tmp_path, ladder_model):
    model = str(ladder_model("Q4_K_M"))
    streamed = edge_agent(tmp_path, "prompt", "Say hello.", "--model", model, "--max-tokens", "6", "--temperature", "0", "--n-ctx", "512")
    assert streamed.returncode == 0, streamed.stderr
    as_json = edge_agent(tmp_path, "prompt", "Say hello.", "--model", model, "--max-tokens", "6", "--temperature", "0", "--n-ctx", "512", "--json")
    assert as_json.returncode == 0, as_json.stderr
    final = json.loads(as_json.stdout)
    assert final["done"] is True and final["usage"]["completion_tokens"] <= 6
    assert streamed.stdout.strip() == final["text"].strip()
    assert (tmp_path / "state" / "runtime-settings.json").exists()


def test_prompt_rejects_a_bad_parameter_with_its_code(tmp_path, ladder_model):
    result = edge_agent(tmp_path, "prompt", "hi", "--model", str(ladder_model("Q4_K_M")), "--temperature", "9")
    assert result.returncode == 2
    assert "[bad_request]" in result.stderr and "temperature" in result.stderr


def test_bench_reports_each_variant(tmp_path, ladder_model):
    result = edge_agent(tmp_path, "bench", "--model", str(ladder_model("Q2_K")), "--max-tokens", "8", "--n-ctx", "512", "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["variants"]
    assert row["quant"] == "Q2_K"
    assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["ttft_ms"] > 0
    assert row["peak_rss_bytes"] > row["size_bytes"] / 2
