"""System memory and the budget this process may really use (cgroup v1 and v2 aware).

The budget is what a model load may still add: ``min(MemAvailable, limit - usage)``, where
the limit is the tightest ``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1) on the
path from this process's cgroup up to the root — a systemd ``MemoryMax=`` on a slice
binds every service below it. Limits at or above physical RAM count as no limit.
``read_*`` return raw text or None; ``parse_*`` are pure. Nothing here allocates memory.
"""

from __future__ import annotations

import posixpath

import msgspec

from agent.hardware.device import MemoryInfo
from agent.hardware.sysfs import read_first_line, read_text


class CgroupPaths(msgspec.Struct, kw_only=True, frozen=True):
    v2: str | None = None  # the unified hierarchy path ("0::<path>")
    v1_memory: str | None = None  # the v1 memory controller path ("N:memory:<path>")


class CgroupMemory(msgspec.Struct, kw_only=True):
    limit_bytes: int | None = None
    usage_bytes: int | None = None


def read_meminfo(root: str = "/") -> str | None:
    return read_text(root, "/proc/meminfo")


def read_proc_self_cgroup(root: str = "/") -> str | None:
    return read_text(root, "/proc/self/cgroup")


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo → bytes per key (the kernel writes kB, meaning KiB)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts or not parts[0].isdigit():
            continue
        scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
        values[key.strip()] = int(parts[0]) * scale
    return values


def parse_proc_self_cgroup(text: str) -> CgroupPaths:
    v2 = None
    v1_memory = None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path or "/"
        elif "memory" in controllers.split(","):
            v1_memory = path or "/"
    return CgroupPaths(v2=v2, v1_memory=v1_memory)


def parse_cgroup_value(text: str | None) -> int | None:
    """One cgroup file's number; "max" (v2's no limit) and junk are None."""
    if text is None:
        return None
    value = text.strip()
    return int(value) if value.isdigit() else None


def _ancestors(path: str) -> list[str]:
    """ "/a/b/c" → ["/a/b/c", "/a/b", "/a", "/"]."""
    path = posixpath.normpath("/" + path.strip("/"))
    chain = [path]
    while path != "/":
        path = posixpath.dirname(path)
        chain.append(path)
    return chain


_LIMIT_FILES = ("memory.max", "memory.limit_in_bytes")
_USAGE_FILES = ("memory.current", "memory.usage_in_bytes")


def _cgroup_dirs(paths: CgroupPaths) -> list[str]:
    """Directories to look in, deepest first, for both hierarchies.

    Inside a container the cgroup namespace may show a path that is not under the
    container's own /sys/fs/cgroup mount; the mount root is then the container's cgroup,
    which the walk reaches as the last (shortest) directory.
    """
    dirs: list[str] = []
    if paths.v2 is not None:
        dirs += [
            posixpath.join("/sys/fs/cgroup", cg.lstrip("/")).rstrip("/")
            for cg in _ancestors(paths.v2)
        ]
    if paths.v1_memory is not None:
        dirs += [
            posixpath.join("/sys/fs/cgroup/memory", cg.lstrip("/")).rstrip("/")
            for cg in _ancestors(paths.v1_memory)
        ]
    return dirs


def read_cgroup_memory(root: str, paths: CgroupPaths) -> dict[str, str]:
    """Raw limit and usage files, keyed by device path, for every ancestor that has them."""
    found: dict[str, str] = {}
    for directory in _cgroup_dirs(paths):
        for name in _LIMIT_FILES + _USAGE_FILES:
            raw = read_first_line(root, f"{directory}/{name}")
            if raw is not None:
                found[f"{directory}/{name}"] = raw
    return found


def parse_cgroup_memory(files: dict[str, str]) -> CgroupMemory:
    """The tightest limit on the way to the root, with the usage of that same cgroup.

    Usage must come from the cgroup that owns the limit: a parent's limit is shared by
    all its children, so the leaf's own usage would overstate what is left.
    """
    by_dir: dict[str, dict[str, int | None]] = {}
    for path, raw in files.items():
        directory, _, name = path.rpartition("/")
        by_dir.setdefault(directory, {})[name] = parse_cgroup_value(raw)
    best: tuple[int, int | None] | None = None
    for values in by_dir.values():
        limit = next((values[n] for n in _LIMIT_FILES if values.get(n) is not None), None)
        usage = next((values[n] for n in _USAGE_FILES if values.get(n) is not None), None)
        if limit is not None and (best is None or limit < best[0]):
            best = (limit, usage)
    if best is None:
        return CgroupMemory()
    return CgroupMemory(limit_bytes=best[0], usage_bytes=best[1])


def parse_memory(meminfo: dict[str, int], cgroup: CgroupMemory) -> MemoryInfo:
    total = meminfo.get("MemTotal", 0)
    # Kernels before 3.14 have no MemAvailable; free + page cache is the old estimate.
    available = meminfo.get(
        "MemAvailable",
        meminfo.get("MemFree", 0) + meminfo.get("Cached", 0) + meminfo.get("Buffers", 0),
    )
    limit = cgroup.limit_bytes
    if limit is not None and total and limit >= total:
        limit = None  # "unlimited" is written as a huge number in v1
    budget = available
    usage = cgroup.usage_bytes if limit is not None else None
    if limit is not None:
        budget = min(available, max(limit - (usage or 0), 0))
    return MemoryInfo(
        total_bytes=total,
        available_bytes=available,
        swap_total_bytes=meminfo.get("SwapTotal", 0),
        swap_free_bytes=meminfo.get("SwapFree", 0),
        cgroup_limit_bytes=limit,
        cgroup_usage_bytes=usage,
        budget_bytes=budget,
    )


def probe_memory(root: str = "/") -> MemoryInfo:
    meminfo = parse_meminfo(read_meminfo(root) or "")
    paths = parse_proc_self_cgroup(read_proc_self_cgroup(root) or "")
    cgroup = parse_cgroup_memory(read_cgroup_memory(root, paths))
    return parse_memory(meminfo, cgroup)
