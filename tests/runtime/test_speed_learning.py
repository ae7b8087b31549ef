"""Decode speed learned from real generations: the engine records what the real model
decoded at, and the next plan (plan_selection, as `select` and the daemon run it) predicts
that variant's speed from it instead of from bandwidth x a default efficiency."""

from __future__ import annotations

import json
from pathlib import Path

from agent.catalog.gguf import read_gguf_file
from agent.catalog.learned import SPEED_FILE_NAME, llama_build_key
from agent.catalog.select import plan_selection
from agent.catalog.speed import DEFAULT_EFFICIENCY, decode_cost, typical_context
from agent.config import AgentConfig, ModelConfig, SigningConfig
from agent.hardware.device import CPUInfo, DeviceInfo, MemoryInfo
from agent.runtime.request import GenerateRequest

GIB = 1024**3
STORY = "Once upon a time, in a small village by the sea, there lived"


def device(bandwidth_gbps: float) -> DeviceInfo:
    return DeviceInfo(
        cpu=CPUInfo(arch="x86_64", physical_cores=1, logical_cores=1, flags=["avx2", "fma", "f16c"]),
        memory=MemoryInfo(total_bytes=16 * GIB, available_bytes=16 * GIB, budget_bytes=16 * GIB),
        bandwidth_gbps=bandwidth_gbps,
    )


def plan(tmp_path: Path, ladder_dir: Path, bandwidth_gbps: float):
    config = AgentConfig(
        device_id="test-device", state_dir=str(tmp_path / "state"), cache_dir=str(tmp_path / "cache"),
        model=ModelConfig(manifest=str(ladder_dir / "manifest.json"), pin="Q4_K_M"),
        signing=SigningConfig(allow_unsigned=True),
    )
    selection = plan_selection(config, device=device(bandwidth_gbps), profile="default")
    return next(c for c in selection.candidates if c.quant == "Q4_K_M"), selection


def test_a_real_generation_moves_the_prediction_to_the_measured_speed(
        tmp_path: Path, make_engine, selection_for, ladder_dir):
    selection = selection_for("Q4_K_M")
    engine = make_engine()
    engine.load(selection)
    final = list(engine.generate(GenerateRequest(
        id="story", prompt=STORY, max_tokens=32, temperature=0.0)))[-1]
    assert "error" not in final, final
    engine.close()
    measured = final["timings"]["decode_tokens_per_s"]

    stored = json.loads((tmp_path / "state" / SPEED_FILE_NAME).read_text())["entries"]
    assert list(stored) == [f"test-device|{llama_build_key()}|{selection.sha256}|gpu=0"]

    # A bandwidth that makes the default prediction ten times the real speed, so the
    # direction of the correction is unambiguous.
    cost = decode_cost(read_gguf_file(selection.model_path), "f16")
    before_state = tmp_path / "before"
    candidate, _ = plan(before_state, ladder_dir, 1000.0)
    bandwidth = 10 * measured * cost.bytes_per_token(typical_context(candidate.n_ctx)) / (
        1e9 * DEFAULT_EFFICIENCY)
    unlearned, _ = plan(before_state, ladder_dir, bandwidth)
    learned, chosen = plan(tmp_path, ladder_dir, bandwidth)

    assert unlearned.measured_tokens_per_s is None
    assert learned.measured_tokens_per_s == measured
    assert abs(learned.predicted_tokens_per_s - measured) < abs(unlearned.predicted_tokens_per_s - measured)
    # The remaining difference is only the context: measured at the story's length,
    # predicted at the typical fill.
    context = final["usage"]["prompt_tokens"] + final["usage"]["completion_tokens"] / 2
    expected = measured * cost.bytes_per_token(context) / cost.bytes_per_token(
        typical_context(learned.n_ctx))
    assert abs(learned.predicted_tokens_per_s - expected) <= 1e-6 * expected
    assert chosen.predicted_tokens_per_s == learned.predicted_tokens_per_s


def test_short_generations_teach_nothing(tmp_path: Path, make_engine, selection_for):
    engine = make_engine()
    engine.load(selection_for("Q4_K_M"))
    final = list(engine.generate(GenerateRequest(id="short", prompt=STORY, max_tokens=2)))[-1]
    assert "error" not in final, final
    engine.close()
    assert not (tmp_path / "state" / SPEED_FILE_NAME).exists()
