"""Catalog fixtures: ladder headers read once, devices and profiles built as plain data."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.catalog.gguf import GGUFInfo, read_gguf_file
from agent.catalog.manifest import Manifest, load_manifest
from agent.catalog.profiles import Policy, Profile
from agent.hardware.device import CPUInfo, DeviceInfo, MemoryInfo

GIB = 1024**3


@pytest.fixture(scope="session")
def ladder(ladder_dir: Path) -> Manifest:
    return load_manifest(str(ladder_dir / "manifest.json"))


@pytest.fixture(scope="session")
def ladder_headers(ladder: Manifest, ladder_dir: Path) -> dict[str, GGUFInfo]:
    return {v.file: read_gguf_file(ladder_dir / v.file) for v in ladder.model().variants}


def make_device(memory_bytes: int = 8 * GIB, *, bandwidth: float | None = None, arch: str = "x86_64",
                flags: tuple[str, ...] = ("avx2", "fma", "f16c"), gpus: list | None = None) -> DeviceInfo:
    return DeviceInfo(
        cpu=CPUInfo(arch=arch, physical_cores=4, logical_cores=8, flags=list(flags)),
        memory=MemoryInfo(total_bytes=memory_bytes, available_bytes=memory_bytes, budget_bytes=memory_bytes),
        gpus=gpus or [],
        bandwidth_gbps=bandwidth,
    )


def make_profile(headroom: int = 0, *, target: int = 4096, floor: int = 512, min_tps: float = 0.0,
                 kv_type: str = "f16", n_threads: int | None = None) -> Profile:
    return Profile(name="test", description="test profile", policy=Policy(
        memory_headroom_bytes=headroom, n_ctx_target=target, n_ctx_floor=floor, kv_type=kv_type,
        n_threads=n_threads, min_tokens_per_s=min_tps, n_batch=512))
