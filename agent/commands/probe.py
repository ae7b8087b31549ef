"""``edge-agent probe``: the hardware report, as a table for people or JSON for machines.

``--json`` prints the DeviceInfo plus ``profile`` and ``profile_reasons``. A machine
with no GPU, battery or sensors is normal: those lines say "none" and the exit status
is 0. EDGE_AGENT_PROBE_ROOT points the probe at a directory of captured files (see
agent.hardware.probe). This module formats; it does no probing of its own.
"""

from __future__ import annotations

import argparse
import os
import sys

import msgspec

from agent.catalog.profiles import load_profiles, match_profile
from agent.hardware.device import (
    CPUInfo,
    DeviceInfo,
    GPUInfo,
    LlamaBuildInfo,
    MemoryInfo,
    PowerInfo,
)
from agent.hardware.probe import probe, probe_root_from_env
from agent.log import configure_logging

HELP = "hardware report: CPU and ISA flags, memory, GPU, board, llama.cpp build"
GIB = 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--no-bandwidth", action="store_true", help="skip the ~1 s memory bandwidth measurement"
    )
    parser.add_argument("--model-dir", help="where models are stored (for free disk space)")
    parser.add_argument("--profile", help="use this profile instead of matching one")


def run(args: argparse.Namespace) -> int:
    # Logs go to stderr so that --json output stays parseable.
    configure_logging(level=os.environ.get("EDGE_AGENT_LOG__LEVEL", "warning"))
    device = probe(
        probe_root_from_env() or "/",
        model_dir=args.model_dir,
        measure_bandwidth=not args.no_bandwidth,
    )
    profile, reasons = match_profile(device, load_profiles(), forced=args.profile)
    if args.json:
        report = msgspec.to_builtins(device)
        report["profile"] = profile.name
        report["profile_reasons"] = reasons
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report)).decode() + "\n")
    else:
        sys.stdout.write(format_table(device, profile.name, reasons))
    return 0


def _gib(value: int | None) -> str:
    return "unknown" if not value else f"{value / GIB:.1f} GiB"


def format_table(device: DeviceInfo, profile: str, reasons: list[str]) -> str:
    rows = [
        *_cpu_rows(device.cpu),
        *_memory_rows(device.memory),
        *_gpu_rows(device.gpus),
        *_system_rows(device),
        ("power", _power_text(device.power)),
        *_llama_rows(device.llama),
        (
            "bandwidth",
            f"{device.bandwidth_gbps:.1f} GB/s" if device.bandwidth_gbps else "not measured",
        ),
        ("profile", f"{profile} ({'; '.join(reasons)})"),
    ]
    if device.probe_ms is not None:
        rows.append(("probe time", f"{device.probe_ms:.0f} ms"))
    width = max(len(label) for label, _ in rows)
    return "".join(f"{label:<{width}}  {value}\n" for label, value in rows)


_Row = tuple[str, str]  # (label, value)


def _cpu_rows(cpu: CPUInfo) -> list[_Row]:
    name = cpu.model or "unknown"
    if cpu.vendor and not name.startswith(cpu.vendor):
        name = f"{cpu.vendor} {name}"
    rows: list[_Row] = [
        ("CPU", f"{name} ({cpu.arch})"),
        ("cores", f"{cpu.physical_cores} physical, {cpu.logical_cores} logical"),
    ]
    for cluster in cpu.clusters:
        label = cluster.name or cluster.part or "cluster"
        where = f"cpus {','.join(map(str, cluster.cpus))}" if cluster.cpus else ""
        speed = f"{cluster.max_mhz:.0f} MHz" if cluster.max_mhz else ""
        rows.append(
            ("  cluster", " ".join(x for x in (f"{cluster.count}x {label}", where, speed) if x))
        )
    rows.append(("ISA flags", " ".join(cpu.flags) or "none"))
    return rows


def _memory_rows(mem: MemoryInfo) -> list[_Row]:
    memory = f"{_gib(mem.total_bytes)} total, {_gib(mem.available_bytes)} available"
    if mem.swap_total_bytes:
        memory += f", swap {_gib(mem.swap_total_bytes)}"
    rows = [("memory", memory)]
    if mem.cgroup_limit_bytes is not None:
        used = (
            f", {_gib(mem.cgroup_usage_bytes)} used" if mem.cgroup_usage_bytes is not None else ""
        )
        rows.append(("cgroup limit", f"{_gib(mem.cgroup_limit_bytes)}{used}"))
    rows.append(("memory budget", _gib(mem.budget_bytes)))
    return rows


def _gpu_rows(gpus: list[GPUInfo]) -> list[_Row]:
    if not gpus:
        return [("GPU", "none")]
    rows = []
    for gpu in gpus:
        vram = "unified memory" if gpu.unified_memory else f"{_gib(gpu.vram_total_bytes)} VRAM"
        if gpu.vram_free_bytes is not None and not gpu.unified_memory:
            vram += f" ({_gib(gpu.vram_free_bytes)} free)"
        extra = ", ".join(
            x
            for x in (
                gpu.driver,
                f"compute {gpu.compute_capability}" if gpu.compute_capability else None,
            )
            if x
        )
        rows.append(
            (
                f"GPU {gpu.index}",
                f"[{gpu.vendor}] {gpu.name}, {vram}" + (f", {extra}" if extra else ""),
            )
        )
    return rows


def _system_rows(device: DeviceInfo) -> list[_Row]:
    return [
        ("board", device.board or "unknown"),
        ("OS", device.os or "unknown"),
        ("kernel", device.kernel or "unknown"),
        (
            "disk free",
            _gib(device.disk_free_bytes) if device.disk_free_bytes is not None else "unknown",
        ),
        (
            "temperatures",
            ", ".join(f"{k} {v:.1f}°C" for k, v in device.temperatures_c.items()) or "none",
        ),
    ]


def _power_text(power: PowerInfo | None) -> str:
    if power is None:
        return "none"
    parts = []
    if power.battery_percent is not None:
        parts.append(f"battery {power.battery_percent:.0f}%")
    if power.on_ac_power is not None:
        parts.append("on AC" if power.on_ac_power else "on battery")
    return ", ".join(parts) or "present, state unknown"


def _llama_rows(llama: LlamaBuildInfo | None) -> list[_Row]:
    if llama is None:
        return [("llama.cpp", "not available")]
    offload = "GPU offload" if llama.gpu_offload else "CPU only"
    return [
        ("llama.cpp", f"{llama.version}, {offload}"),
        ("  features", " ".join(llama.features) or "none"),
    ]
