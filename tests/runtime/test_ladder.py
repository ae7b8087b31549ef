"""The fallback ladder (pure) and the remembered-settings file."""

from __future__ import annotations

import json

from agent.catalog.selection import MemoryEstimate, Selection
from agent.config import RuntimeConfig
from agent.runtime.ladder import SAFE_BATCH, rungs
from agent.runtime.settings_memory import FILE_NAME, SettingsMemory


def selection(**overrides) -> Selection:
    fields = dict(
        model_id="m", quant="Q4_K_M", file="m.gguf", size=1, sha256="a" * 64, urls=[],
        quality=1.0, n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=8, n_gpu_layers=33,
        estimate=MemoryEstimate(ram_bytes=1), model_path="/models/m.gguf",
    )
    fields.update(overrides)
    return Selection(**fields)


def test_every_step_is_safer_and_keeps_the_previous_ones():
    ladder = rungs(selection(), RuntimeConfig())
    assert [step for step, _ in ladder] == [
        "as_selected", "no_extra_bufts", "fewer_threads", "no_gpu", "smaller_batch",
    ]
    first, *_, last = [settings for _, settings in ladder]
    assert first["use_extra_bufts"] and first["n_threads"] == 8 and first["n_gpu_layers"] == 33
    assert last["use_extra_bufts"] is False
    assert last["n_threads"] == 4 and last["n_gpu_layers"] == 0
    assert last["n_batch"] == last["n_ubatch"] == SAFE_BATCH
    assert last["steps"] == ["no_extra_bufts", "fewer_threads", "no_gpu", "smaller_batch"]


def test_steps_that_change_nothing_are_skipped():
    ladder = rungs(selection(n_threads=1, n_gpu_layers=0, n_batch=32, n_ubatch=32), RuntimeConfig())
    assert [step for step, _ in ladder] == ["as_selected", "no_extra_bufts"]


def test_starting_at_a_remembered_step_applies_the_earlier_ones():
    ladder = rungs(selection(), RuntimeConfig(), "no_gpu")
    assert [step for step, _ in ladder] == ["no_gpu", "smaller_batch"]
    assert ladder[0][1]["use_extra_bufts"] is False and ladder[0][1]["n_threads"] == 4


def test_a_remembered_step_this_selection_skips_still_yields_its_safest_settings():
    ladder = rungs(selection(n_batch=32, n_ubatch=32), RuntimeConfig(), "smaller_batch")
    assert len(ladder) == 1 and ladder[0][1]["n_gpu_layers"] == 0


def test_runtime_config_overrides_mmap_mlock_and_flash_attention():
    settings = rungs(selection(flash_attn=False), RuntimeConfig(use_mmap=False, use_mlock=True, flash_attn=True))[0][1]
    assert settings["use_mmap"] is False and settings["use_mlock"] is True and settings["flash_attn"] is True


def test_settings_memory_round_trips_and_survives_a_damaged_file(tmp_path):
    memory = SettingsMemory(tmp_path)
    assert memory.lookup("dev", "sha") is None
    memory.remember("dev", "sha", "no_extra_bufts", {"n_threads": 4})
    memory.remember("other", "sha", "as_selected", {"n_threads": 8})
    assert SettingsMemory(tmp_path).lookup("dev", "sha")["step"] == "no_extra_bufts"
    assert json.loads((tmp_path / FILE_NAME).read_text())["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]  # no temp files left behind
    (tmp_path / FILE_NAME).write_text("{not json")
    assert memory.lookup("dev", "sha") is None
    memory.remember("dev", "sha", "fewer_threads", {})
    assert memory.lookup("dev", "sha")["step"] == "fewer_threads"
