"""Memory bandwidth, measured in about a second, for predicting decode tokens/s.

Token generation streams every weight once per token, so its speed is bounded by how fast
memory can be read. This copies a buffer several times larger than the last-level cache
with one thread per core (numpy releases the GIL for large copies) and reports the best
of a few short runs in GB/s, counting bytes read plus bytes written (STREAM "copy").

It must stay cheap: at most MAX_BUFFER_BYTES twice over, never more than an eighth of the
memory budget, and about TIME_BUDGET_S of wall time. The copy runs in a child process
(``python -m agent.hardware.bandwidth``): numpy (it comes with llama-cpp-python) and the
buffers would otherwise stay in the daemon's memory for good, about 10 MiB of its idle
footprint. Without numpy the result is None.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from agent.hardware.sysfs import read_first_line, under
from agent.log import configure_logging, get_logger

log = get_logger(__name__)

TIME_BUDGET_S = 0.9
MIN_BUFFER_BYTES = 32 * 1024 * 1024
MAX_BUFFER_BYTES = 256 * 1024 * 1024
MAX_THREADS = 8
MIN_RUNS = 3
MAX_RUNS = 50
# Starting Python and importing numpy takes well under a second; this bounds a stuck child.
CHILD_TIMEOUT_S = 30.0


def read_cache_sizes(root: str = "/") -> list[str]:
    """cpu0's raw cache "size" values ("32K", "1024K", "32768K")."""
    base = under(root, "/sys/devices/system/cpu/cpu0/cache")
    try:
        names = sorted(p.name for p in base.iterdir() if p.name.startswith("index"))
    except OSError:
        return []
    sizes = []
    for name in names:
        raw = read_first_line(root, f"/sys/devices/system/cpu/cpu0/cache/{name}/size")
        if raw is not None:
            sizes.append(raw)
    return sizes


def parse_cache_size(raw: str) -> int | None:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    raw = raw.strip().upper()
    if raw[-1:] in units and raw[:-1].isdigit():
        return int(raw[:-1]) * units[raw[-1]]
    return int(raw) if raw.isdigit() else None


def buffer_bytes(last_level_cache: int | None, budget_bytes: int) -> int:
    """Twice the LLC (source and destination together are 4x, so the copy cannot be
    served from cache), within the limits: page-faulting a bigger buffer in would eat
    the time budget on a small board."""
    wanted = max(2 * (last_level_cache or 0), MIN_BUFFER_BYTES)
    ceiling = min(MAX_BUFFER_BYTES, budget_bytes // 8) if budget_bytes else MAX_BUFFER_BYTES
    return max(min(wanted, ceiling), 1024 * 1024)


def measure_bandwidth(
    *,
    threads: int = 1,
    root: str = "/",
    budget_bytes: int = 0,
    time_budget_s: float = TIME_BUDGET_S,
) -> float | None:
    """Best copy bandwidth in GB/s (10^9 bytes), or None when it cannot be measured;
    measured in a child process, so nothing of it stays in this one."""
    command = [sys.executable, "-m", "agent.hardware.bandwidth", "--threads", str(threads),
               "--root", root, "--budget-bytes", str(budget_bytes),
               "--time-budget-s", str(time_budget_s)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True,
                              timeout=CHILD_TIMEOUT_S + time_budget_s)
        gbps = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("bandwidth_failed", error=str(exc)[:300])
        return None
    return float(gbps) if isinstance(gbps, (int, float)) and gbps > 0 else None


def _measure_here(threads: int, root: str, budget_bytes: int, time_budget_s: float) -> float | None:
    try:
        import numpy as np
    except ImportError:
        log.info("bandwidth_skipped", reason="numpy not installed")
        return None
    caches = [s for s in (parse_cache_size(r) for r in read_cache_sizes(root)) if s]
    size = buffer_bytes(max(caches) if caches else None, budget_bytes)
    threads = max(1, min(threads, MAX_THREADS))
    started = time.perf_counter()
    try:
        src = np.ones(size // 8, dtype=np.float64)  # touch every page before timing
        dst = np.empty_like(src)
    except MemoryError:
        return None
    chunks = np.array_split(np.arange(src.size), threads)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks if c.size]

    def copy(bound: tuple[int, int]) -> None:
        np.copyto(dst[bound[0] : bound[1]], src[bound[0] : bound[1]])

    best = 0.0
    runs = 0
    with ThreadPoolExecutor(max_workers=len(bounds)) as pool:
        list(pool.map(copy, bounds))  # warm-up: page in dst, start the threads
        # At least MIN_RUNS timed runs; then as many as fit in the time budget.
        while True:
            t0 = time.perf_counter()
            list(pool.map(copy, bounds))
            elapsed = time.perf_counter() - t0
            if elapsed > 0:
                best = max(best, 2 * src.nbytes / elapsed / 1e9)
            runs += 1
            spent = time.perf_counter() - started
            if runs >= MAX_RUNS or (runs >= MIN_RUNS and spent >= time_budget_s):
                break
    log.debug(
        "bandwidth_measured",
        gbps=round(best, 2),
        buffer_bytes=src.nbytes,
        threads=len(bounds),
        runs=runs,
    )
    return round(best, 2) if best else None


def main(argv: list[str] | None = None) -> int:
    """The child's side of measure_bandwidth: prints the GB/s (or null) as JSON."""
    parser = argparse.ArgumentParser(prog="python -m agent.hardware.bandwidth")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default="/")
    parser.add_argument("--budget-bytes", type=int, default=0)
    parser.add_argument("--time-budget-s", type=float, default=TIME_BUDGET_S)
    args = parser.parse_args(argv)
    configure_logging("warning", json=True)  # stderr: stdout carries the answer alone
    print(json.dumps(_measure_here(args.threads, args.root, args.budget_bytes, args.time_budget_s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
