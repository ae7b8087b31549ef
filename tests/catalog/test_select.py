"""The selector: rules, explain rows, errors, and properties over random budgets."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.catalog.estimate import estimate_memory, repack_rules
from agent.catalog.select import choose, predict_tokens_per_s
from agent.config import ModelConfig
from agent.errors import ConfigError, SelectionError
from agent.hardware.device import GPUInfo
from tests.catalog.conftest import GIB, make_device, make_profile

MiB = 1024**2
QUALITY_ORDER = ["F16", "Q8_0", "Q6_K", "Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K"]


def test_plenty_of_memory_picks_f16_at_the_target_context(ladder, ladder_headers):
    selection = choose(make_device(16 * GIB), make_profile(), ladder, ModelConfig(), ladder_headers)
    assert (selection.quant, selection.n_ctx, selection.kv_type, selection.n_gpu_layers) == ("F16", 4096, "f16", 0)
    assert selection.n_threads == 4  # physical cores when the profile does not say
    assert selection.flash_attn and selection.manifest_url == ladder.source
    assert [c.verdict for c in selection.candidates].count("chosen") == 1
    assert {c.verdict for c in selection.candidates} == {"chosen", "fits"}
    assert "no measured bandwidth" in selection.candidates[0].reason


def test_less_memory_steps_down_and_lowers_context_first(ladder, ladder_headers):
    device = make_device(16 * GIB)
    picks = []
    for budget in (600 * MiB, 420 * MiB, 300 * MiB, 240 * MiB, 200 * MiB):
        s = choose(device, make_profile(), ladder, ModelConfig(), ladder_headers, memory_bytes=budget)
        assert (s.estimate.ram_bytes) <= budget
        picks.append((s.quant, s.n_ctx))
    assert picks[0] == ("F16", 4096)
    assert picks[1][0] == "F16" and picks[1][1] < 4096  # the context gave way, not the quality
    assert [QUALITY_ORDER.index(q) for q, _ in picks] == sorted(QUALITY_ORDER.index(q) for q, _ in picks)
    assert picks[-1][0] != "F16"
    rejected = [c for c in choose(device, make_profile(), ladder, ModelConfig(), ladder_headers,
                                  memory_bytes=240 * MiB).candidates if c.verdict == "rejected"]
    assert rejected and all(c.reason.startswith("needs ") and "budget 240.0 MiB" in c.reason for c in rejected)


def test_nothing_fits_names_the_smallest_need_and_the_budget(ladder, ladder_headers):
    with pytest.raises(SelectionError) as caught:
        choose(make_device(), make_profile(headroom=100 * MiB), ladder, ModelConfig(), ladder_headers,
               memory_bytes=250 * MiB)
    message = caught.value.message
    assert caught.value.code == "no_fit"
    assert "smallest need is" in message and "n_ctx 512" in message
    assert "budget 150.0 MiB (250.0 MiB - 100.0 MiB headroom)" in message


def test_pin_is_honoured_or_is_an_error(ladder, ladder_headers):
    pinned = choose(make_device(), make_profile(), ladder, ModelConfig(pin="Q4_K_M"), ladder_headers)
    assert pinned.quant == "Q4_K_M"
    assert all(c.verdict == "rejected" for c in pinned.candidates if c.quant != "Q4_K_M")
    with pytest.raises(SelectionError, match="pinned variant F16"):
        choose(make_device(), make_profile(), ladder, ModelConfig(pin="F16"), ladder_headers,
               memory_bytes=250 * MiB)
    with pytest.raises(ConfigError, match="model.pin: 'Q9' is not a variant"):
        choose(make_device(), make_profile(), ladder, ModelConfig(pin="Q9"), ladder_headers)


def test_requires_arch_and_flags_reject_with_a_reason(ladder, ladder_headers):
    variants = ladder.model().variants
    restricted = [msgspec.structs.replace(v, requires=msgspec.structs.replace(
        v.requires, arch=["aarch64"] if v.quant == "F16" else [], cpu_flags=["avx512f"] if v.quant == "Q8_0" else []))
        for v in variants]
    manifest = msgspec.structs.replace(ladder, models=[msgspec.structs.replace(ladder.model(), variants=restricted)])
    s = choose(make_device(), make_profile(), manifest, ModelConfig(), ladder_headers)
    rows = {c.quant: c for c in s.candidates}
    assert s.quant == "Q6_K"
    assert rows["F16"].reason == "needs arch aarch64, this is x86_64"
    assert rows["Q8_0"].reason == "needs CPU flags avx512f"


def test_slow_variants_lose_when_bandwidth_is_known(ladder, ladder_headers):
    # 2 GB/s (a Pi 4): F16 streams ~260 MB per token, far below 8 tok/s.
    s = choose(make_device(bandwidth=2.0), make_profile(min_tps=8.0), ladder, ModelConfig(), ladder_headers)
    rows = {c.quant: c for c in s.candidates}
    assert rows["F16"].verdict == "rejected" and "below 8" in rows["F16"].reason
    assert s.predicted_tokens_per_s >= 8.0


def test_learned_figure_replaces_the_estimate_and_is_shown(ladder, ladder_headers):
    f16 = ladder.model().variants[0]

    def learned(sha256, key):
        return 2 * GIB if sha256 == f16.sha256 else None

    s = choose(make_device(16 * GIB), make_profile(), ladder, ModelConfig(), ladder_headers, learned,
               memory_bytes=1 * GIB)
    row = next(c for c in s.candidates if c.quant == "F16")
    assert row.verdict == "rejected" and row.estimate.learned_ram_bytes > 2 * GIB
    assert row.estimate.ram_bytes < 1 * GIB  # the raw estimate is still there
    assert s.quant == "Q8_0"


def test_gpu_offload_all_layers_when_vram_allows_else_the_most_that_fit(ladder, ladder_headers):
    # An RTX 3060 as nvidia-smi reports it (12 GiB); values from a real device report.
    gpu = GPUInfo(vendor="nvidia", name="NVIDIA GeForce RTX 3060", vram_total_bytes=12 * GIB,
                  vram_free_bytes=12 * GIB, driver="550.54.14", compute_capability="8.6")
    device = make_device(16 * GIB, gpus=[gpu])
    full = choose(device, make_profile(), ladder, ModelConfig(), ladder_headers)
    assert full.n_gpu_layers == 31 and full.estimate.vram_bytes <= full.vram_budget_bytes
    partial = choose(device, make_profile(), ladder, ModelConfig(), ladder_headers, vram_bytes=600 * MiB)
    assert 0 < partial.n_gpu_layers < 31 and partial.estimate.vram_bytes <= 600 * MiB


def _oracle_fitting(ladder, headers, device, profile, memory):
    """The variants that can run within ``memory``, decided apart from the selector: each at its
    cheapest setting (the context floor, q8_0 KV, no GPU), where memory and bytes read per
    token are smallest, so if any setting fits this one does. Uses the estimator and the speed
    model directly, never the selector's own planning or ranking."""
    policy = profile.policy
    budget = max(memory - policy.memory_headroom_bytes, 0)
    repack = repack_rules(device.cpu.arch, device.cpu.flags)
    fitting = []
    for variant in ladder.model().variants:
        info = headers[variant.file]
        target = min(policy.n_ctx_target, info.context_length or policy.n_ctx_target)
        floor = min(policy.n_ctx_floor, target)
        need = estimate_memory(info, variant.size, n_ctx=floor, n_batch=policy.n_batch,
                               n_ubatch=min(policy.n_batch, 512), kv_type="q8_0", n_gpu_layers=0,
                               flash_attn=True, use_mmap=True, repack=repack)
        speed = predict_tokens_per_s(info, floor, "q8_0", device.bandwidth_gbps)
        if need.ram_bytes <= budget and (speed is None or speed >= policy.min_tokens_per_s):
            fitting.append(variant)
    return fitting


def _with_tie(ladder, tie):
    """The ladder with variants ``tie[0]`` and ``tie[1]`` both at the top quality, so they tie
    for the pick whenever both fit (None: unchanged)."""
    if tie is None:
        return ladder
    variants = list(ladder.model().variants)
    top = max(v.quality for v in variants)
    for index in tie:
        variants[index] = msgspec.structs.replace(variants[index], quality=top)
    model = msgspec.structs.replace(ladder.model(), variants=variants)
    return msgspec.structs.replace(ladder, models=[model])


def test_ties_go_to_the_smaller_file(ladder, ladder_headers):
    variants = ladder.model().variants
    f16, q8 = variants[0], variants[1]
    assert (f16.quant, q8.quant) == ("F16", "Q8_0") and q8.size < f16.size
    tied = _with_tie(ladder, (0, 1))  # Q8_0 as good as F16: the bigger file has no reason to win
    s = choose(make_device(16 * GIB), make_profile(), tied, ModelConfig(), ladder_headers)
    assert s.quant == "Q8_0"
    f16_row = next(c for c in s.candidates if c.quant == "F16")
    assert f16_row.reason == "same quality as Q8_0, larger file"
    s = choose(make_device(16 * GIB), make_profile(), _with_tie(ladder, (1, 6)), ModelConfig(),
               ladder_headers)
    assert s.quant == "Q2_K"  # the smallest file wins a tie at the top


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.integers(min_value=100 * MiB, max_value=1200 * MiB), extra=st.integers(0, 400 * MiB),
       headroom=st.integers(0, 64 * MiB), bandwidth=st.one_of(st.none(), st.floats(1.0, 100.0)),
       tie=st.one_of(st.none(), st.lists(st.integers(0, 6), min_size=2, max_size=2, unique=True)))
def test_properties_fit_optimal_and_monotonic_quality(ladder, ladder_headers, budget, extra,
                                                       headroom, bandwidth, tie):
    manifest = _with_tie(ladder, tie)
    device = make_device(bandwidth=bandwidth)
    profile = make_profile(headroom=headroom, min_tps=5.0)

    def pick(memory):
        try:
            return choose(device, profile, manifest, ModelConfig(), ladder_headers,
                          memory_bytes=memory)
        except SelectionError as exc:
            assert exc.code == "no_fit"
            return None

    small, large = pick(budget), pick(budget + extra)
    for memory, chosen in ((budget, small), (budget + extra, large)):
        fitting = _oracle_fitting(manifest, ladder_headers, device, profile, memory)
        if chosen is None:
            assert fitting == [], f"choose found nothing, yet {[v.quant for v in fitting]} fit"
            continue
        assert chosen.quant in {v.quant for v in fitting}
        best = max(v.quality for v in fitting)
        assert chosen.quality == best  # no fitting variant is better than the pick
        # Ties go to the smaller file.
        assert chosen.size == min(v.size for v in fitting if v.quality == best)
    if small is not None:
        assert small.estimate.ram_bytes <= budget - headroom  # never exceeds the budget
        assert large is not None and large.quality >= small.quality  # more memory, never worse
        # Pinning a variant whose every setting is too big is an error, never a silent pick.
        too_big = [c for c in small.candidates if c.verdict == "rejected" and c.reason.startswith("needs")]
        for row in too_big:
            with pytest.raises(SelectionError):
                choose(device, profile, manifest, ModelConfig(pin=row.quant), ladder_headers,
                       memory_bytes=budget)
