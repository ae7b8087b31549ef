"""Learned decode rates: keyed by the llama.cpp build, robust to a corrupt file, bounded, and
what the selector predicts from them."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from structlog.testing import capture_logs

from agent.catalog import learned as learned_module
from agent.catalog.learned import SPEED_FILE_NAME, LearnedSpeed, llama_build_key
from agent.catalog.select import choose
from agent.catalog.speed import decode_cost, typical_context
from agent.config import ModelConfig
from tests.catalog.conftest import GIB, make_device, make_profile

SHA = "a" * 64


def fake_build(root: Path, version: str, library_hash: str) -> importlib.metadata.Distribution:
    """An installed llama-cpp-python as its metadata: METADATA and a RECORD naming libraries."""
    info = root / f"llama_cpp_python-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {version}\n")
    (info / "RECORD").write_text(
        f"llama_cpp/__init__.py,sha256=py,10\n"
        f"llama_cpp/lib/libllama.so,sha256={library_hash},1000\n"
        f"llama_cpp/lib/libggml-cpu.so.0,sha256=cpu,2000\n"
    )
    return importlib.metadata.PathDistribution(info)


def test_the_build_key_changes_with_the_build(tmp_path: Path):
    cpu = llama_build_key(fake_build(tmp_path / "a", "0.3.36", "cpuhash"))
    assert cpu == llama_build_key(fake_build(tmp_path / "b", "0.3.36", "cpuhash"))
    assert cpu != llama_build_key(fake_build(tmp_path / "c", "0.3.36", "cudahash"))  # same version
    assert cpu != llama_build_key(fake_build(tmp_path / "d", "0.3.37", "cpuhash"))
    assert llama_build_key().startswith(importlib.metadata.version("llama_cpp_python"))


def test_a_figure_of_another_build_is_not_used(tmp_path: Path):
    speed = LearnedSpeed(tmp_path)
    speed.record("dev", "build-a", SHA, 0, tokens_per_s=50.0, bytes_per_token=1e8)
    assert LearnedSpeed(tmp_path).rates("dev", "build-a").variant(SHA, 0).tokens_per_s == 50.0
    assert LearnedSpeed(tmp_path).rates("dev", "build-b").variants == {}
    assert LearnedSpeed(tmp_path).rates("other-device", "build-a").variants == {}


def test_a_corrupt_file_means_nothing_learned(tmp_path: Path):
    path = tmp_path / SPEED_FILE_NAME
    for garbage in ("{not json", "[1, 2]", json.dumps({"format": 1, "entries": "x"}),
                    json.dumps({"format": 1, "entries": {f"dev|b|{SHA}|gpu=0": {"samples": [
                        ["fast", 1], [float("nan"), 1], [-1, 5], [1, 2, 3]]}}})):
        path.write_text(garbage)
        with capture_logs() as logs:
            assert LearnedSpeed(tmp_path).rates("dev", "b").variants == {}
        warned = [entry["event"] for entry in logs if entry["log_level"] == "warning"]
        assert warned == (["learned_speed_unreadable"] if garbage == "{not json" else [])
    speed = LearnedSpeed(tmp_path)
    speed.record("dev", "b", SHA, 0, tokens_per_s=40.0, bytes_per_token=1e8)
    assert LearnedSpeed(tmp_path).rates("dev", "b").variant(SHA, 0).samples == 1


def test_samples_and_entries_are_bounded_and_the_median_is_kept(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(learned_module, "MAX_ENTRIES", 3)
    monkeypatch.setattr(learned_module, "SPEED_WRITE_INTERVAL_S", 0.0)
    speed = LearnedSpeed(tmp_path)
    for tokens_per_s in [10.0] * 3 + [50.0] * learned_module.SPEED_SAMPLES:
        speed.record("dev", "b", SHA, 0, tokens_per_s=tokens_per_s, bytes_per_token=1e6)
    kept = LearnedSpeed(tmp_path).rates("dev", "b").variant(SHA, 0)
    assert kept.samples == learned_module.SPEED_SAMPLES and kept.tokens_per_s == 50.0
    for i in range(5):
        speed.record("dev", "b", f"sha{i}", 0, tokens_per_s=20.0, bytes_per_token=1e6)
    assert len(LearnedSpeed(tmp_path).rates("dev", "b").variants) == 3


def test_writes_are_spaced_and_flush_writes_the_rest(tmp_path: Path):
    now = [100.0]
    speed = LearnedSpeed(tmp_path)
    speed.record("dev", "b", SHA, 0, tokens_per_s=10.0, bytes_per_token=1e6, clock=lambda: now[0])
    speed.record("dev", "b", SHA, 0, tokens_per_s=30.0, bytes_per_token=1e6, clock=lambda: now[0])
    assert LearnedSpeed(tmp_path).rates("dev", "b").variant(SHA, 0).samples == 1  # on disk
    assert speed.rates("dev", "b").variant(SHA, 0).samples == 2  # this process knows both
    speed.flush()
    assert LearnedSpeed(tmp_path).rates("dev", "b").variant(SHA, 0).samples == 2


def test_the_selector_predicts_from_the_variants_own_rate_then_the_builds(
        tmp_path: Path, ladder, ladder_headers):
    variants = {v.quant: v for v in ladder.model().variants}
    q4, q8 = variants["Q4_K_M"], variants["Q8_0"]
    device = make_device(16 * GIB, bandwidth=20.0)
    plain = choose(device, make_profile(), ladder, ModelConfig(), ladder_headers)
    n_ctx = plain.n_ctx
    q4_cost = decode_cost(ladder_headers[q4.file], plain.kv_type)
    speed = LearnedSpeed(tmp_path)
    speed.record("dev", "b", q4.sha256, 0, tokens_per_s=80.0,
                 bytes_per_token=q4_cost.bytes_per_token(typical_context(n_ctx)))
    learned = choose(device, make_profile(), ladder, ModelConfig(), ladder_headers,
                     rates=speed.rates("dev", "b"))
    rows = {c.quant: c for c in learned.candidates}
    assert rows["Q4_K_M"].measured_tokens_per_s == 80.0
    assert abs(rows["Q4_K_M"].predicted_tokens_per_s - 80.0) < 1e-6
    # Q8_0 never ran: the build's rate, so it is predicted slower by its larger reads.
    q8_cost = decode_cost(ladder_headers[q8.file], plain.kv_type)
    assert rows["Q8_0"].measured_tokens_per_s is None
    ratio = q4_cost.bytes_per_token(typical_context(n_ctx)) / q8_cost.bytes_per_token(typical_context(n_ctx))
    assert abs(rows["Q8_0"].predicted_tokens_per_s - 80.0 * ratio) < 1e-6
    # Without a measured bandwidth the learned rate still predicts.
    blind = choose(make_device(16 * GIB), make_profile(), ladder, ModelConfig(), ladder_headers,
                   rates=speed.rates("dev", "b"))
    assert all(c.predicted_tokens_per_s for c in blind.candidates)
