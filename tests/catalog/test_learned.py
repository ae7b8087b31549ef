"""Learned memory corrections: persisted atomically, largest figure kept, bounded."""

from __future__ import annotations

from pathlib import Path

from agent.catalog import learned as learned_module
from agent.catalog.learned import LearnedMemory, settings_key
from agent.catalog.selection import MemoryEstimate, Selection


def selection(**overrides) -> Selection:
    fields = dict(model_id="m", quant="Q4_K_M", file="m.gguf", size=1, sha256="a" * 64, urls=[],
                  quality=0.9, n_ctx=2048, estimate=MemoryEstimate(ram_bytes=1))
    fields.update(overrides)
    return Selection(**fields)


def test_settings_key_names_every_memory_relevant_setting():
    key = settings_key(selection(n_ctx=4096, kv_type="q8_0", n_gpu_layers=3, flash_attn=True))
    assert key == "ctx=4096,batch=512,ubatch=512,kv=q8_0,gpu=3,fa=1"
    assert settings_key(selection(n_ctx=2048)) != settings_key(selection(n_ctx=4096))


def test_record_then_lookup_survives_a_new_instance(tmp_path: Path):
    LearnedMemory(tmp_path).record("dev", "a" * 64, "k", 100)
    LearnedMemory(tmp_path).record("dev", "a" * 64, "k", 80)  # a smaller figure does not lower it
    assert LearnedMemory(tmp_path).lookup("dev", "a" * 64, "k") == 100
    assert LearnedMemory(tmp_path).lookup("other", "a" * 64, "k") is None
    assert not list(tmp_path.glob(".learned-*"))  # no temp files left behind


def test_a_corrupt_file_means_nothing_learned(tmp_path: Path):
    (tmp_path / learned_module.FILE_NAME).write_text("{not json")
    memory = LearnedMemory(tmp_path)
    assert memory.lookup("dev", "s", "k") is None
    memory.record("dev", "s", "k", 5)
    assert memory.lookup("dev", "s", "k") == 5


def test_size_is_bounded(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(learned_module, "MAX_ENTRIES", 3)
    memory = LearnedMemory(tmp_path)
    for i in range(5):
        memory.record("dev", f"sha{i}", "k", 10 + i)
    assert [memory.lookup("dev", f"sha{i}", "k") for i in range(5)] == [None, None, 12, 13, 14]
