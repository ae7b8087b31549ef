"""What the probe reports about a device: plain typed data, no I/O.

Produced by agent.hardware.probe, consumed by profile matching, the selector, the
daemon's ``meta`` message and the fleet dashboard. Sizes are bytes; absent facts are
None (or empty lists), never guessed.
"""

from __future__ import annotations

import msgspec


class CPUCluster(msgspec.Struct, kw_only=True):
    """One performance cluster (big.LITTLE): the logical CPUs sharing a max frequency."""

    cpus: list[int]  # empty where the OS does not say which ids (macOS perflevels)
    max_mhz: float | None = None
    part: str | None = None  # e.g. "Cortex-A76"
    count: int = 0  # logical CPUs in the cluster (len(cpus) where ids are known)
    name: str | None = None  # macOS perflevel name: "Performance", "Efficiency"


class CPUInfo(msgspec.Struct, kw_only=True):
    vendor: str | None = None
    model: str | None = None
    arch: str = "unknown"  # platform.machine() normalised: x86_64, aarch64, armv7l, arm64->aarch64
    physical_cores: int = 1
    logical_cores: int = 1
    flags: list[str] = []  # normalised ISA names: avx2, avx512f, amx_int8, neon, dotprod, i8mm, sve …
    clusters: list[CPUCluster] = []

    @property
    def performance_cores(self) -> int:
        """Cores worth a decode thread: the fastest cluster when clusters differ, else all
        physical cores (a LITTLE core slows a thread team down to its pace)."""
        if len(self.clusters) > 1 and self.clusters[0].count:
            return self.clusters[0].count
        return self.physical_cores


class MemoryInfo(msgspec.Struct, kw_only=True):
    total_bytes: int
    available_bytes: int
    swap_total_bytes: int = 0
    swap_free_bytes: int = 0
    cgroup_limit_bytes: int | None = None  # memory.max / memory.limit_in_bytes when lower than RAM
    cgroup_usage_bytes: int | None = None
    budget_bytes: int = 0  # what this process may still use: min(available, limit - usage)


class GPUInfo(msgspec.Struct, kw_only=True):
    vendor: str  # nvidia | amd | apple | jetson
    name: str
    vram_total_bytes: int | None = None
    vram_free_bytes: int | None = None
    unified_memory: bool = False  # Apple Silicon, Jetson: VRAM is the system RAM
    driver: str | None = None
    compute_capability: str | None = None
    index: int = 0


class PowerInfo(msgspec.Struct, kw_only=True):
    battery_percent: float | None = None
    on_ac_power: bool | None = None


class LlamaBuildInfo(msgspec.Struct, kw_only=True):
    version: str
    gpu_offload: bool
    system_info: str  # llama_print_system_info(), e.g. "CPU : SSE3 = 1 | AVX2 = 1 | …"
    features: list[str] = []  # the features that system_info reports as on, lower case


class DeviceInfo(msgspec.Struct, kw_only=True):
    cpu: CPUInfo
    memory: MemoryInfo
    gpus: list[GPUInfo] = []
    board: str | None = None  # device-tree model or DMI product name
    os: str | None = None  # PRETTY_NAME of os-release, or "macOS 14.4"
    kernel: str | None = None
    disk_free_bytes: int | None = None  # at the model store
    temperatures_c: dict[str, float] = {}
    power: PowerInfo | None = None
    llama: LlamaBuildInfo | None = None
    bandwidth_gbps: float | None = None  # measured memory read bandwidth, GB/s
    probe_ms: float | None = None

    @property
    def vram_total_bytes(self) -> int:
        """Dedicated VRAM summed over GPUs; unified-memory GPUs count as none (it is RAM)."""
        return sum(g.vram_total_bytes or 0 for g in self.gpus if not g.unified_memory)

    @property
    def vram_free_bytes(self) -> int:
        return sum(
            (g.vram_free_bytes if g.vram_free_bytes is not None else g.vram_total_bytes or 0)
            for g in self.gpus
            if not g.unified_memory
        )
