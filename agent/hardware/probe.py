"""The hardware probe: one call that reads everything and returns a DeviceInfo.

Each subject has its own module (cpu, memory, gpu, board, disk, thermal, power,
bandwidth, llama_build) whose ``read_*`` functions do the I/O and whose ``parse_*``
functions are pure. This module only wires them together and times the whole.

The fake-root test hook
-----------------------
``probe(root=DIR)`` — or the environment variable ``EDGE_AGENT_PROBE_ROOT=DIR``, which
``edge-agent probe`` and ``probe()`` honour when no root is passed — reads ``/proc``,
``/sys`` and ``/etc`` under DIR instead of ``/``. With a fake root no live tool runs: no
NVML, nvidia-smi or sysctl, no llama.cpp build query, no bandwidth measurement, no
psutil sensors, and the disk is only measured when ``model_dir`` is given. Captured tool
output may be put in the fake root instead, so the GPU and Apple paths are testable end
to end:

    DIR/.captured/nvidia-smi.csv   output of ``nvidia-smi --query-gpu=index,name,
                                   memory.total,memory.free,driver_version,compute_cap
                                   --format=csv,noheader,nounits`` (a header line with
                                   other columns is accepted too)
    DIR/.captured/sysctl.txt       output of ``sysctl NAME…`` ("name: value" lines) on macOS

This module must not raise for missing facts: anything absent is None, empty or zero.
"""

from __future__ import annotations

import os
import time

from agent.config import default_cache_dir
from agent.hardware.bandwidth import measure_bandwidth
from agent.hardware.board import (
    parse_board,
    read_device_tree_model,
    read_dmi,
    read_kernel,
    read_os_name,
)
from agent.hardware.cpu import (
    parse_cpuinfo,
    parse_sysctl_cpu,
    read_cpu_max_freqs,
    read_cpuinfo,
    read_machine,
)
from agent.hardware.device import CPUInfo, DeviceInfo, MemoryInfo
from agent.hardware.disk import read_disk_free
from agent.hardware.gpu import probe_gpus
from agent.hardware.llama_build import probe_llama_build
from agent.hardware.memory import probe_memory
from agent.hardware.power import probe_power
from agent.hardware.sysctl import parse_sysctl, read_sysctl
from agent.hardware.sysfs import is_live
from agent.hardware.thermal import probe_temperatures
from agent.log import get_logger

log = get_logger(__name__)

PROBE_ROOT_ENV = "EDGE_AGENT_PROBE_ROOT"


def probe_root_from_env() -> str | None:
    return os.environ.get(PROBE_ROOT_ENV) or None


def probe(
    root: str = "/", *, model_dir: str | None = None, measure_bandwidth: bool = True
) -> DeviceInfo:
    """Probe the machine (or the fake root, see the module docstring)."""
    started = time.perf_counter()
    if root == "/" and (env_root := probe_root_from_env()):
        root = env_root
    live = is_live(root)

    sysctl = parse_sysctl(read_sysctl(root) or "")
    cpuinfo = read_cpuinfo(root)
    cpu = _probe_cpu(root, cpuinfo, sysctl)
    memory = _probe_memory(root, sysctl)
    board = parse_board(read_device_tree_model(root), read_dmi(root), cpuinfo, sysctl)
    gpus = probe_gpus(
        root,
        sysctl=sysctl,
        board=board,
        memory_total=memory.total_bytes,
        memory_available=memory.available_bytes,
    )
    if model_dir is None and live:
        model_dir = str(default_cache_dir() / "models")
    bandwidth = None
    if measure_bandwidth and live:
        bandwidth = _bandwidth(root, cpu, memory)
    info = DeviceInfo(
        cpu=cpu,
        memory=memory,
        gpus=gpus,
        board=board,
        os=read_os_name(root),
        kernel=read_kernel(root),
        disk_free_bytes=read_disk_free(model_dir) if model_dir else None,
        temperatures_c=probe_temperatures(root),
        power=probe_power(root),
        llama=probe_llama_build() if live else None,
        bandwidth_gbps=bandwidth,
    )
    info.probe_ms = round((time.perf_counter() - started) * 1000, 1)
    log.debug("probed", root=root, probe_ms=info.probe_ms)
    return info


def _probe_cpu(root: str, cpuinfo: str | None, sysctl: dict[str, str]) -> CPUInfo:
    if cpuinfo:
        return parse_cpuinfo(
            cpuinfo, machine=read_machine(root), max_freqs_khz=read_cpu_max_freqs(root)
        )
    if sysctl:
        return parse_sysctl_cpu(sysctl)
    machine = read_machine(root)
    logical = (os.cpu_count() or 1) if is_live(root) else 1
    return CPUInfo(arch=machine or "unknown", physical_cores=logical, logical_cores=logical)


def _probe_memory(root: str, sysctl: dict[str, str]) -> MemoryInfo:
    memory = probe_memory(root)
    if memory.total_bytes or not sysctl.get("hw.memsize", "").isdigit():
        return memory
    # macOS has no /proc/meminfo: total from sysctl, available from psutil when live
    # (a fake root has no running system to ask, so available stays unknown: 0).
    total = int(sysctl["hw.memsize"])
    available = 0
    if is_live(root):
        import psutil

        available = psutil.virtual_memory().available
    return MemoryInfo(total_bytes=total, available_bytes=available, budget_bytes=available)


def _bandwidth(root: str, cpu: CPUInfo, memory: MemoryInfo) -> float | None:
    try:
        return measure_bandwidth(
            threads=cpu.performance_cores, root=root, budget_bytes=memory.budget_bytes
        )
    except Exception as exc:  # noqa: BLE001 - a failed measurement must not fail the probe
        log.warning("bandwidth_failed", error=str(exc))
        return None
