"""parse_cpuinfo / parse_sysctl_cpu on real captured text (sources in fixtures/SOURCES.md)."""

from __future__ import annotations

import pytest

from agent.hardware.cpu import normalise_flags, parse_cpuinfo, parse_sysctl_cpu
from agent.hardware.sysctl import parse_sysctl
from tests.hardware.conftest import FIXTURES

CASES = [
    # fixture, vendor, model, arch, physical, logical, flags present, flags absent
    ("raspberry-pi-5", "ARM", "Cortex-A76", "aarch64", 4, 4, {"neon", "fp16", "dotprod"}, {"i8mm", "sve", "avx2"}),
    ("raspberry-pi-4", "ARM", "Cortex-A72", "aarch64", 4, 4, {"neon"}, {"dotprod", "fp16"}),
    ("jetson-orin-nano", "ARM", "Cortex-A78AE", "aarch64", 6, 6, {"neon", "fp16", "dotprod"}, {"i8mm", "sve"}),
    (
        "x86-avx2-desktop", "Intel", "Intel(R) Core(TM) Ultra 9 285", "x86_64", 24, 24,
        {"sse3", "ssse3", "avx", "avx2", "fma", "f16c", "avx_vnni"}, {"avx512f", "amx_int8", "neon"},
    ),
    (
        "x86-amx-server", "Intel", "Intel(R) Xeon(R) 6972P", "x86_64", 96, 96,
        {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
         "amx_int8", "amx_bf16", "amx_tile"}, {"neon"},
    ),
    (
        "epyc-zen4-vm", "AMD", "AMD EPYC", "x86_64", 2, 2,
        {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}, {"amx_int8", "avx_vnni"},
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "vendor", "model", "arch", "physical", "logical", "present", "absent"), CASES
)
def test_parse_cpuinfo(name, vendor, model, arch, physical, logical, present, absent):
    cpu = parse_cpuinfo((FIXTURES / name / "proc/cpuinfo").read_text())
    assert (cpu.vendor, cpu.model, cpu.arch) == (vendor, model, arch)
    assert (cpu.physical_cores, cpu.logical_cores) == (physical, logical)
    assert present <= set(cpu.flags)
    assert not absent & set(cpu.flags)


def test_machine_overrides_what_cpuinfo_implies():
    text = (FIXTURES / "raspberry-pi-4/proc/cpuinfo").read_text()
    assert parse_cpuinfo(text, machine="armv7l").arch == "armv7l"
    assert parse_cpuinfo(text, machine="arm64").arch == "aarch64"


def test_big_little_clusters_from_cpufreq_fastest_first():
    # Pi 5 cores with a made-up frequency split, to exercise the grouping only.
    text = (FIXTURES / "raspberry-pi-5/proc/cpuinfo").read_text()
    cpu = parse_cpuinfo(
        text, max_freqs_khz={0: "1800000", 1: "1800000", 2: "2400000", 3: "2400000"}
    )
    assert [(c.cpus, c.max_mhz, c.count) for c in cpu.clusters] == [
        ([2, 3], 2400.0, 2),
        ([0, 1], 1800.0, 2),
    ]
    assert cpu.performance_cores == 2


def test_single_cluster_uses_all_physical_cores():
    cpu = parse_cpuinfo((FIXTURES / "raspberry-pi-5/proc/cpuinfo").read_text())
    assert [c.part for c in cpu.clusters] == ["Cortex-A76"]
    assert cpu.performance_cores == 4


def test_x86_has_no_clusters_without_cpufreq():
    assert parse_cpuinfo((FIXTURES / "x86-amx-server/proc/cpuinfo").read_text()).clusters == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (["pni", "ssse3", "lm"], ["sse3", "ssse3"]),
        (
            ["asimd", "asimdhp", "asimddp", "i8mm", "sve", "sve2"],
            ["dotprod", "fp16", "i8mm", "neon", "sve", "sve2"],
        ),
        (["half", "thumb", "vfp", "neon", "vfpv4"], ["neon"]),  # armv7 Features
        ([], []),
    ],
)
def test_normalise_flags(raw, expected):
    assert normalise_flags(raw) == expected


def test_apple_sysctl():
    cpu = parse_sysctl_cpu(
        parse_sysctl((FIXTURES / "apple-m3-max/.captured/sysctl.txt").read_text())
    )
    assert (cpu.vendor, cpu.model, cpu.arch) == ("Apple", "Apple M3 Max", "aarch64")
    assert (cpu.physical_cores, cpu.logical_cores) == (14, 14)
    assert set(cpu.flags) == {"neon", "fp16", "dotprod", "i8mm", "bf16"}  # FEAT_SME is 0
    assert [(c.name, c.count) for c in cpu.clusters] == [("Performance", 10), ("Efficiency", 4)]
    assert cpu.performance_cores == 10


def test_empty_cpuinfo_is_unknown_not_an_error():
    cpu = parse_cpuinfo("")
    assert cpu.model is None and cpu.flags == [] and cpu.logical_cores == 1
