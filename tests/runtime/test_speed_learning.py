"""Decode speed learned from real generations: the engine records what the real model
decoded at, and the next plan (plan_selection, as `select` and the daemon run it) predicts
that variant's speed from it instead of from bandwidth x a default efficiency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec

from agent.catalog.gguf import read_gguf_file
from agent.catalog.learned import SPEED_FILE_NAME, llama_build_key
from agent.catalog.select import plan_selection
from agent.catalog.speed import DEFAULT_EFFICIENCY, decode_cost, typical_context
from agent.config import AgentConfig, ModelConfig, SigningConfig
from agent.hardware.device import CPUInfo, DeviceInfo, MemoryInfo
from agent.runtime.request import GenerateRequest
from tests.support.split import SPLIT_PARTS, SPLIT_QUANT, split_once

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


def test_edge_agent_bench_teaches_select_the_measured_speed(tmp_path: Path, ladder_dir, ladder_manifest):
    """The operator's path: `edge-agent bench --manifest` on a one-variant manifest, then
    `select --explain` shows that variant's measured decode speed beside the prediction."""
    models = tmp_path / "models"
    models.mkdir()
    manifest = json.loads(json.dumps(ladder_manifest))
    manifest["models"][0]["variants"] = [
        v for v in manifest["models"][0]["variants"] if v["quant"] == "Q2_K"]
    (models / "manifest.json").write_text(json.dumps(manifest))
    file = manifest["models"][0]["variants"][0]["file"]
    os.link(ladder_dir / file, models / file)
    config = tmp_path / "agent.yaml"
    # No speed floor: what is tested is that the measured figure reaches select, and a busy
    # machine can measure one below the profile's floor (then select answers no_fit).
    config.write_text(f"device_id: bench-dev\nstate_dir: {tmp_path / 'state'}\n"
                      f"cache_dir: {tmp_path / 'cache'}\nsigning:\n  allow_unsigned: true\n"
                      "model:\n  min_tokens_per_s: 0\n")

    def edge_agent(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "agent.cli", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done

    explained = edge_agent("select", "--manifest", str(models / "manifest.json"), "--explain")
    assert "measured here" not in explained.stdout
    bench = edge_agent("bench", "--manifest", str(models / "manifest.json"), "--json",
                       "--runs", "1", "--max-tokens", "16")
    (row,) = json.loads(bench.stdout)["variants"]
    explained = edge_agent("select", "--manifest", str(models / "manifest.json"), "--explain")
    assert f"{row['decode_tokens_per_s']:.1f} measured here" in explained.stdout
    q2_row = next(line for line in explained.stdout.splitlines() if line.startswith("Q2_K "))
    assert f"{row['decode_tokens_per_s']:.1f}" in q2_row.split()


def test_a_split_variant_learns_from_all_its_parts(tmp_path: Path, make_engine, selection_for,
                                                   ladder_dir):
    """The bytes a token reads are every part's tensors, not the first part's alone."""
    ladder_split = split_once(ladder_dir / f"smollm2-135m-instruct.{SPLIT_QUANT}.gguf",
                              tmp_path / "splits", SPLIT_PARTS)
    from agent.catalog.gguf import read_gguf_split
    from agent.catalog.learned import LearnedSpeed
    from agent.catalog.selection import SelectionPart

    whole = selection_for(SPLIT_QUANT)
    parts = [SelectionPart(file=p.name, size=p.stat().st_size, sha256=f"{i:064x}")
             for i, p in enumerate(ladder_split)]
    split = msgspec.structs.replace(whole, file=ladder_split[0].name, parts=parts,
                                    model_path=str(ladder_split[0]))
    engine = make_engine()
    engine.load(split)
    final = list(engine.generate(GenerateRequest(
        id="story", prompt=STORY, max_tokens=32, temperature=0.0)))[-1]
    assert "error" not in final, final
    engine.close()
    learned = LearnedSpeed(tmp_path / "state").rates("test-device", llama_build_key())
    figure = learned.variant(split.sha256, 0)
    merged = decode_cost(read_gguf_split([[str(p)] for p in ladder_split]), "f16")
    assert merged.weights_bytes == decode_cost(read_gguf_file(ladder_dir / whole.file), "f16").weights_bytes
    context = final["usage"]["prompt_tokens"] + final["usage"]["completion_tokens"] / 2
    assert figure.bytes_per_s == figure.tokens_per_s * merged.bytes_per_token(context)
