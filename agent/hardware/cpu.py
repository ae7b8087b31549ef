"""CPU facts: vendor, model, architecture, core counts, ISA flags, big.LITTLE clusters.

``read_*`` return raw text (or None when absent); ``parse_*`` are pure and turn that text
into CPUInfo. ISA flags are normalised to one vocabulary across x86, Linux/ARM and macOS
(see NORMALISED_FLAGS) so that profiles and manifests can name them once. This module
must not guess: a fact the text does not state stays at its "unknown" value.
"""

from __future__ import annotations

import platform
import re

from agent.hardware.device import CPUCluster, CPUInfo
from agent.hardware.sysfs import is_live, read_first_line, read_text, under

# The vocabulary profiles and manifests use. x86 names are the kernel's (/proc/cpuinfo
# spells AVX-512 VNNI "avx512_vnni"); "pni" is the kernel's name for SSE3.
X86_FLAGS = (
    "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512vbmi",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip
ARM_FLAGS = ("neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme")
NORMALISED_FLAGS = X86_FLAGS + ARM_FLAGS

_X86_ALIASES = {"pni": "sse3"}
# /proc/cpuinfo "Features" names on arm64 (and armv7's "neon").
_ARM_ALIASES = {
    "asimd": "neon",
    "neon": "neon",
    "fphp": "fp16",
    "asimdhp": "fp16",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
    "sme": "sme",
}
# macOS sysctl hw.optional.* names.
_SYSCTL_FLAGS = {
    "hw.optional.neon": "neon",
    "hw.optional.arm.AdvSIMD": "neon",
    "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.neon_fp16": "fp16",
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_SME": "sme",
    "hw.optional.avx1_0": "avx",
    "hw.optional.avx2_0": "avx2",
    "hw.optional.fma": "fma",
    "hw.optional.f16c": "f16c",
    "hw.optional.avx512f": "avx512f",
}

_ARM_IMPLEMENTERS = {
    "0x41": "ARM",
    "0x42": "Broadcom",
    "0x43": "Cavium",
    "0x4e": "NVIDIA",
    "0x51": "Qualcomm",
    "0x61": "Apple",
    "0xc0": "Ampere",
}
# ARM Ltd. (implementer 0x41) part numbers, from the Technical Reference Manuals.
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2",
    "0xd4d": "Cortex-A715",
    "0xd4e": "Cortex-X3",
    "0xd4f": "Neoverse-V2",
    "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
    "0xd82": "Cortex-X4",
    "0xd87": "Cortex-A725",
}
_X86_VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon"}
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "AMD64": "x86_64", "x64": "x86_64"}


def normalise_arch(machine: str) -> str:
    return _ARCH_ALIASES.get(machine, machine) or "unknown"


def read_cpuinfo(root: str = "/") -> str | None:
    return read_text(root, "/proc/cpuinfo")


def read_cpu_max_freqs(root: str = "/") -> dict[int, str]:
    """Raw ``cpuinfo_max_freq`` (kHz) per logical CPU, where cpufreq exposes it."""
    base = under(root, "/sys/devices/system/cpu")
    found: dict[int, str] = {}
    try:
        entries = list(base.iterdir())
    except OSError:
        return found
    for entry in entries:
        match = re.fullmatch(r"cpu(\d+)", entry.name)
        if not match:
            continue
        raw = read_first_line(
            root, f"/sys/devices/system/cpu/{entry.name}/cpufreq/cpuinfo_max_freq"
        )
        if raw is not None:
            found[int(match.group(1))] = raw
    return found


def read_machine(root: str = "/") -> str | None:
    """platform.machine() on the live system; a fake root has no running kernel to ask."""
    if not is_live(root):
        return None
    return platform.machine() or None


def _blocks(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per blank-line-separated block (key: value lines)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def normalise_flags(raw_flags: list[str]) -> list[str]:
    """Kernel flag names (x86 ``flags`` or ARM ``Features``) → sorted normalised names."""
    out: set[str] = set()
    for flag in raw_flags:
        name = _X86_ALIASES.get(flag, flag)
        if name in X86_FLAGS:
            out.add(name)
        elif flag in _ARM_ALIASES:
            out.add(_ARM_ALIASES[flag])
    return sorted(out)


def parse_cpuinfo(
    text: str, *, machine: str | None = None, max_freqs_khz: dict[int, str] | None = None
) -> CPUInfo:
    """Linux /proc/cpuinfo (x86 or ARM) → CPUInfo.

    ``machine`` is platform.machine() when known (it wins over what cpuinfo implies, e.g.
    a 32-bit kernel on an ARMv8 core); ``max_freqs_khz`` is cpufreq's per-CPU maximum,
    used to split big.LITTLE clusters.
    """
    blocks = _blocks(text)
    processors = [b for b in blocks if "processor" in b and b["processor"].isdigit()]
    first = processors[0] if processors else (blocks[0] if blocks else {})
    is_x86 = "flags" in first or "vendor_id" in first

    if is_x86:
        raw_flags = first.get("flags", "").split()
        vendor = _X86_VENDORS.get(first.get("vendor_id", ""), first.get("vendor_id") or None)
        model = first.get("model name") or None
        implied_arch = "x86_64" if "lm" in raw_flags else "i686"
    else:
        raw_flags = first.get("Features", "").split()
        implementer = first.get("CPU implementer", "").lower()
        vendor = _ARM_IMPLEMENTERS.get(implementer, implementer or None)
        arch_version = first.get("CPU architecture", "")
        implied_arch = "aarch64" if arch_version == "8" and "asimd" in raw_flags else "armv7l"
        model = _arm_model(processors) or first.get("model name") or None

    logical = max(len(processors), 1)
    physical = _physical_cores(processors, logical)
    return CPUInfo(
        vendor=vendor,
        model=model,
        arch=normalise_arch(machine) if machine else implied_arch,
        physical_cores=physical,
        logical_cores=max(logical, physical),
        flags=normalise_flags(raw_flags),
        clusters=_clusters(processors, max_freqs_khz or {}),
    )


def _physical_cores(processors: list[dict[str, str]], logical: int) -> int:
    cores = {(p.get("physical id"), p.get("core id")) for p in processors if "core id" in p}
    per_package = processors[0].get("cpu cores") if processors else None
    packages = {p.get("physical id") for p in processors if "physical id" in p}
    # A capture may hold only the first processor block; "cpu cores" still states the total.
    stated = (
        int(per_package) * max(len(packages), 1) if per_package and per_package.isdigit() else 0
    )
    if cores or stated:
        return max(len(cores), stated, 1)
    return logical  # ARM: one thread per core


def _part_name(processor: dict[str, str]) -> str | None:
    part = processor.get("CPU part", "").lower()
    if not part:
        return None
    if processor.get("CPU implementer", "").lower() == "0x41" and part in _ARM_PARTS:
        return _ARM_PARTS[part]
    return f"part {part}"


def _arm_model(processors: list[dict[str, str]]) -> str | None:
    names: list[str] = []
    for p in processors:
        name = _part_name(p)
        if name and name not in names:
            names.append(name)
    return " + ".join(names) or None


def _clusters(processors: list[dict[str, str]], max_freqs_khz: dict[int, str]) -> list[CPUCluster]:
    """Group logical CPUs by (core type, max frequency), fastest cluster first."""
    groups: dict[tuple[str | None, float | None], list[int]] = {}
    for p in processors:
        cpu = int(p["processor"])
        raw_freq = max_freqs_khz.get(cpu)
        mhz = int(raw_freq) / 1000 if raw_freq and raw_freq.isdigit() else None
        groups.setdefault((_part_name(p), mhz), []).append(cpu)
    if not groups or all(part is None and mhz is None for part, mhz in groups):
        return []
    clusters = [
        CPUCluster(cpus=sorted(cpus), max_mhz=mhz, part=part, count=len(cpus))
        for (part, mhz), cpus in groups.items()
    ]
    return sorted(clusters, key=lambda c: (-(c.max_mhz or 0), c.cpus[0]))


def parse_sysctl_cpu(values: dict[str, str]) -> CPUInfo:
    """macOS sysctl values → CPUInfo; perflevels become Performance/Efficiency clusters."""
    flags = sorted({flag for key, flag in _SYSCTL_FLAGS.items() if values.get(key) == "1"})
    brand = values.get("machdep.cpu.brand_string") or None
    if values.get("hw.optional.arm64") == "1":
        arch = "aarch64"
    elif brand:
        arch = "aarch64" if brand.startswith("Apple") else "x86_64"
    else:
        arch = "unknown"
    clusters: list[CPUCluster] = []
    levels = int(values.get("hw.nperflevels", "0") or 0)
    for level in range(levels):
        count = values.get(f"hw.perflevel{level}.logicalcpu")
        if count and count.isdigit():
            # macOS does not say which CPU ids belong to which level, so cpus stays empty.
            clusters.append(
                CPUCluster(cpus=[], count=int(count), name=values.get(f"hw.perflevel{level}.name"))
            )
    physical = values.get("hw.physicalcpu", "")
    logical = values.get("hw.logicalcpu", "")
    vendor = "Apple" if brand and brand.startswith("Apple") else ("Intel" if brand else None)
    return CPUInfo(
        vendor=vendor,
        model=brand,
        arch=arch,
        physical_cores=int(physical) if physical.isdigit() else 1,
        logical_cores=int(logical) if logical.isdigit() else 1,
        flags=flags,
        clusters=clusters,
    )
