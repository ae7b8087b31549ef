"""The memory estimator: pure arithmetic checks, and calibration against real loads."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from agent.catalog.estimate import estimate_memory, kv_cache_bytes, repack_rules
from agent.catalog.gguf import read_gguf_file
from agent.catalog.select import choose
from agent.config import ModelConfig
from tests.catalog.conftest import make_device, make_profile
from tests.catalog.rss_measure import measure_peak_rss

MiB = 1024 * 1024
LADDER = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]


def _this_cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return line.split(":", 1)[1].split()
    return []


def test_kv_cache_matches_llama_cpp_for_each_type(ladder_model):
    info = read_gguf_file(ladder_model("Q8_0"))
    # llama.cpp reports "CPU KV buffer size = 11.25 MiB" at n_ctx 512 and 180.00 MiB at 8192.
    assert kv_cache_bytes(info, 512, "f16") == int(11.25 * MiB)
    assert kv_cache_bytes(info, 8192, "f16") == 180 * MiB
    assert kv_cache_bytes(info, 8192, "q8_0") == 180 * MiB * 34 // 64
    assert kv_cache_bytes(info, 8192, "q4_0") == 180 * MiB * 18 // 64
    assert kv_cache_bytes(info, 300, "f16") == kv_cache_bytes(info, 512, "f16")  # padded to 256


def test_repacked_tensors_cost_extra_on_avx2_only(ladder_model):
    info = read_gguf_file(ladder_model("Q2_K"))
    size = ladder_model("Q2_K").stat().st_size
    plain = estimate_memory(info, size, n_ctx=512, repack={})
    avx2 = estimate_memory(info, size, n_ctx=512, repack=repack_rules("x86_64", ["avx2"]))
    # llama.cpp: "CPU_REPACK model buffer size = 42.71 MiB" for this file (Q4_0 tensors).
    assert abs((avx2.weights_bytes - plain.weights_bytes) - 42.71 * MiB) < 0.05 * MiB
    assert repack_rules("aarch64", ["neon"]) == {}


def test_more_context_or_no_flash_attention_costs_more(ladder_model):
    info = read_gguf_file(ladder_model("Q4_K_M"))
    size = ladder_model("Q4_K_M").stat().st_size
    small = estimate_memory(info, size, n_ctx=512)
    large = estimate_memory(info, size, n_ctx=8192)
    no_fa = estimate_memory(info, size, n_ctx=8192, flash_attn=False)
    q8 = estimate_memory(info, size, n_ctx=8192, kv_type="q8_0")
    assert small.ram_bytes < q8.ram_bytes < large.ram_bytes < no_fa.ram_bytes
    gpu = estimate_memory(info, size, n_ctx=8192, n_gpu_layers=31)
    assert gpu.vram_bytes > 0 and gpu.ram_bytes < large.ram_bytes


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="calibrated on this x86_64 build")
@pytest.mark.parametrize("n_ctx", [512, 2048, 8192])
@pytest.mark.parametrize("quant", LADDER)
def test_estimate_is_within_tolerance_of_a_real_load(ladder_model, quant: str, n_ctx: int):
    path = ladder_model(quant)
    measured = measure_peak_rss(str(path), n_ctx)["growth"]
    estimate = estimate_memory(read_gguf_file(path), path.stat().st_size, n_ctx=n_ctx,
                               repack=repack_rules(platform.machine(), _this_cpu_flags()))
    estimated = estimate.ram_bytes - estimate.process_bytes
    tolerance = max(0.05 * measured, 16 * MiB)
    assert abs(estimated - measured) <= tolerance, (quant, n_ctx, estimated / MiB, measured / MiB)


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="calibrated on this x86_64 build")
@pytest.mark.parametrize("budget_mib", [560, 400, 260])
def test_the_pick_really_loads_within_the_budget_and_the_next_better_does_not(
    ladder, ladder_headers, ladder_dir: Path, budget_mib: int
):
    budget = budget_mib * MiB
    device = make_device(flags=tuple(_this_cpu_flags()))
    profile = make_profile(target=2048, floor=512)
    selection = choose(device, profile, ladder, ModelConfig(), ladder_headers, memory_bytes=budget)
    chosen = measure_peak_rss(str(ladder_dir / selection.file), selection.n_ctx, kv_type=selection.kv_type)
    assert chosen["peak_rss"] <= budget  # the whole worker process, baseline included
    variants = sorted(ladder.model().variants, key=lambda v: v.quality)
    better = [v for v in variants if v.quality > selection.quality]
    if better:
        # The next better variant, even at the floor context, would not have stayed within X.
        nxt = better[0]
        measured = measure_peak_rss(str(ladder_dir / nxt.file), 512, kv_type="q8_0")
        assert measured["peak_rss"] > budget, (selection.quant, nxt.quant, measured["peak_rss"] / MiB)
