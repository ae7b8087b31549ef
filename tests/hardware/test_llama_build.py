"""llama.cpp build info: parsing the worker's JSON, and asking the real installed build."""

from __future__ import annotations

import llama_cpp

from agent.hardware.llama_build import parse_build_info, parse_system_info, probe_llama_build

# llama_print_system_info() of this project's build (0.3.36, CPU), with AMX_INT8 = 0 added.
SYSTEM_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 0 | "
    "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"
)


def test_parse_system_info_keeps_only_what_is_on():
    features = parse_system_info(SYSTEM_INFO)
    assert {"avx2", "avx512", "avx512_vnni", "fma"} <= set(features)
    assert "amx_int8" not in features


def test_parse_build_info_skips_log_lines():
    text = (
        "ggml: some log line\n"
        '{"version": "0.3.36", "gpu_offload": false, "system_info": "CPU : NEON = 1 | DOTPROD = 1 |"}\n'
    )
    info = parse_build_info(text)
    assert info is not None and (info.version, info.gpu_offload, info.features) == (
        "0.3.36",
        False,
        ["dotprod", "neon"],
    )


def test_parse_build_info_garbage_is_none():
    assert parse_build_info("Traceback (most recent call last):\n  boom\n") is None
    assert parse_build_info('{"no": "version"}') is None


def test_probe_llama_build_reports_the_installed_version():
    info = probe_llama_build()
    assert info is not None
    assert info.version == llama_cpp.__version__
    assert "sse3" in info.features or "neon" in info.features
