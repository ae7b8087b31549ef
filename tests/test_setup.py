"""scripts/setup's hardware-aware llama.cpp build flags."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def cmake_args(env: dict[str, str]) -> list[str]:
    result = subprocess.run(
        [str(REPO / "scripts/setup"), "--print-cmake-args"],
        env={**{k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}, **env},
        capture_output=True, text=True, check=True, timeout=30,
    )
    return result.stdout.split()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 flag detection")
def test_amx_cpu_gets_explicit_isa_flags_without_amx() -> None:
    env = {"EDGE_AGENT_CPUINFO": str(FIXTURES / "cpuinfo-sapphire-rapids.txt")}
    args = cmake_args(env)
    assert "-DGGML_NATIVE=OFF" in args  # native would switch the crashing AMX path on
    for flag in ("AVX2", "FMA", "F16C", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI"):
        assert f"-DGGML_{flag}=ON" in args
    assert not any("AMX" in a for a in args)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 flag detection")
def test_flags_follow_this_cpu(tmp_path: Path) -> None:
    older = tmp_path / "cpuinfo"
    older.write_text("flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx\n")
    args = cmake_args({"EDGE_AGENT_CPUINFO": str(older)})
    assert "-DGGML_AVX=ON" in args
    assert "-DGGML_AVX2=ON" not in args and "-DGGML_AVX512=ON" not in args


def test_operator_cmake_args_win() -> None:
    assert cmake_args({"CMAKE_ARGS": "-DGGML_VULKAN=ON"}) == ["-DGGML_VULKAN=ON"]
