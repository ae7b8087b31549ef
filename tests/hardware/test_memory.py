"""Memory and cgroup parsing on real captured files (sources in fixtures/SOURCES.md)."""

from __future__ import annotations

import pytest

from agent.hardware.memory import (
    CgroupMemory,
    CgroupPaths,
    parse_cgroup_memory,
    parse_cgroup_value,
    parse_meminfo,
    parse_memory,
    parse_proc_self_cgroup,
    probe_memory,
    read_cgroup_memory,
)
from tests.hardware.conftest import FIXTURES

GIB = 1024**3


def test_parse_meminfo_scales_kb_to_bytes():
    text = (FIXTURES / "epyc-zen4-vm/proc/meminfo").read_text()
    values = parse_meminfo(text)
    first = text.splitlines()[0].split()  # "MemTotal: 24684084 kB"
    assert values["MemTotal"] == int(first[1]) * 1024
    assert 23 * GIB < values["MemTotal"] < 25 * GIB
    assert values["MemAvailable"] <= values["MemTotal"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cgroup-v1-docker", CgroupPaths(v1_memory="/system.slice/docker-898b44c4a066d2dc6343c21d8a5b7c6a77079367d23bcde8c88be0eb204d3a1e.scope")),
        ("cgroup-v2-slurm", CgroupPaths(v2="/system.slice/slurm-worker-1_slurmstepd.scope/job_4749/step_0/user/task_0")),
        ("epyc-zen4-vm", CgroupPaths(v2="/", v1_memory="/process_api/2164d521abab45fed8d6dae70904a456")),
    ],
)  # fmt: skip
def test_parse_proc_self_cgroup(name, expected):
    assert parse_proc_self_cgroup((FIXTURES / name / "proc/self/cgroup").read_text()) == expected


@pytest.mark.parametrize(
    ("raw", "value"), [("max", None), ("4194304000\n", 4194304000), ("", None), (None, None)]
)
def test_parse_cgroup_value(raw, value):
    assert parse_cgroup_value(raw) == value


@pytest.mark.parametrize(
    ("name", "limit", "usage"),
    [
        ("cgroup-v1-docker", 4294967296, 5013504),
        # The task's own memory.max is "max"; the limit sits on its parent cgroup.
        ("cgroup-v2-slurm", 4194304000, None),
        # This machine: v1 "unlimited" is a huge number; parse keeps it, parse_memory drops it.
        ("epyc-zen4-vm", 9223372036854771712, None),
    ],
)
def test_cgroup_limit_is_the_tightest_on_the_way_to_the_root(name, limit, usage):
    root = str(FIXTURES / name)
    paths = parse_proc_self_cgroup((FIXTURES / name / "proc/self/cgroup").read_text())
    found = parse_cgroup_memory(read_cgroup_memory(root, paths))
    assert found.limit_bytes == limit
    if usage is not None:
        assert found.usage_bytes == usage


def test_budget_is_limit_minus_usage_when_tighter_than_available():
    meminfo = parse_meminfo((FIXTURES / "epyc-zen4-vm/proc/meminfo").read_text())
    memory = parse_memory(meminfo, CgroupMemory(limit_bytes=4294967296, usage_bytes=5013504))
    assert memory.cgroup_limit_bytes == 4294967296
    assert memory.budget_bytes == 4294967296 - 5013504


def test_budget_is_available_when_the_limit_is_looser():
    meminfo = parse_meminfo((FIXTURES / "epyc-zen4-vm/proc/meminfo").read_text())
    memory = parse_memory(
        meminfo, CgroupMemory(limit_bytes=9223372036854771712, usage_bytes=42557440)
    )
    assert memory.cgroup_limit_bytes is None and memory.cgroup_usage_bytes is None
    assert memory.budget_bytes == meminfo["MemAvailable"]


def test_budget_never_negative():
    memory = parse_memory(
        {"MemTotal": 8 * GIB, "MemAvailable": 6 * GIB},
        CgroupMemory(limit_bytes=GIB, usage_bytes=2 * GIB),
    )
    assert memory.budget_bytes == 0


def test_old_kernel_without_memavailable():
    memory = parse_memory(
        {"MemTotal": 1000, "MemFree": 100, "Cached": 200, "Buffers": 50}, CgroupMemory()
    )
    assert memory.available_bytes == 350


def test_probe_memory_on_a_root_without_meminfo_is_zero_not_an_error(tmp_path):
    memory = probe_memory(str(tmp_path))
    assert (memory.total_bytes, memory.budget_bytes, memory.cgroup_limit_bytes) == (0, 0, None)
