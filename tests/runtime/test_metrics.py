"""Rolling metrics: token-weighted rates, errors by code, a one-minute window."""

from __future__ import annotations

from agent.runtime.metrics import Metrics


def ok(prompt: int, completion: int, prefill: float, decode: float, ttft: float = 100.0) -> dict:
    return {
        "id": "x", "done": True, "text": "", "finish_reason": "length",
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        "timings": {"ttft_ms": ttft, "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "total_ms": 1.0},
    }


def test_rates_are_token_weighted_and_the_window_forgets():
    now = [1000.0]
    metrics = Metrics(clock=lambda: now[0])
    metrics.record(ok(100, 11, prefill=100.0, decode=10.0))  # 1 s prefill, 1 s decode
    now[0] += 90
    metrics.record(ok(300, 31, prefill=300.0, decode=30.0, ttft=300.0))  # 1 s, 1 s
    metrics.record({"id": "y", "done": True, "error": {"code": "busy", "message": "full"}})
    summary = metrics.summary()
    assert summary["since_start"]["prefill_tokens_per_s"] == 200.0  # 400 tokens in 2 s
    assert summary["since_start"]["decode_tokens_per_s"] == 20.0  # 40 tokens in 2 s
    assert summary["since_start"]["requests_ok"] == 2
    assert summary["since_start"]["errors"] == {"busy": 1}
    assert summary["last_minute"]["requests_ok"] == 1  # the first is 90 s old
    assert summary["last_minute"]["ttft_ms"] == 300.0
    assert summary["last_request"]["completion_tokens"] == 31
    now[0] += 61
    assert summary["since_start"] == metrics.summary()["since_start"]
    assert metrics.summary()["last_minute"]["requests_ok"] == 0
