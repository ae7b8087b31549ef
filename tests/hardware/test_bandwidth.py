"""Memory bandwidth: buffer sizing (pure) and one real, short measurement."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from agent.hardware.bandwidth import (
    MAX_BUFFER_BYTES,
    MIN_BUFFER_BYTES,
    buffer_bytes,
    measure_bandwidth,
    parse_cache_size,
    read_cache_sizes,
)

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("raw", "size"),
    [("32K", 32 * 1024), ("32768K", 32 * MIB), ("2M", 2 * MIB), ("512", 512), ("x", None)],
)
def test_parse_cache_size(raw, size):
    assert parse_cache_size(raw) == size


def test_buffer_exceeds_the_last_level_cache_within_limits():
    assert buffer_bytes(32 * MIB, 0) == 64 * MIB
    assert buffer_bytes(None, 0) == MIN_BUFFER_BYTES
    assert buffer_bytes(512 * MIB, 0) == MAX_BUFFER_BYTES
    assert buffer_bytes(32 * MIB, 256 * MIB) == 32 * MIB  # an eighth of a small budget


def memcpy_gbps(size: int, runs: int = 5) -> float:
    """Copy bandwidth by another route than the probe's numpy copy: CPython's memcpy behind a
    bytearray slice assignment, read and write both counted, best of a few runs."""
    src = bytearray(b"\x01") * size
    dst = bytearray(size)
    dst[:] = src  # page in
    best = 0.0
    for _ in range(runs):
        started = time.perf_counter()
        dst[:] = src
        best = max(best, 2 * size / (time.perf_counter() - started) / 1e9)
    return best


def test_measured_bandwidth_agrees_with_an_independent_copy():
    caches = [c for c in (parse_cache_size(raw) for raw in read_cache_sizes("/")) if c]
    size = buffer_bytes(max(caches) if caches else None, 0)  # the probe's buffer: past the caches
    measured = measure_bandwidth(threads=1, time_budget_s=0.3)
    reference = memcpy_gbps(size)
    assert measured is not None
    # Same machine, same kind of copy, one thread each: within a factor of 3 even when shared.
    assert reference / 3 <= measured <= reference * 3, (measured, reference)


def test_the_measurement_leaves_nothing_in_the_measuring_process():
    """The daemon probes at start: numpy and the copy buffers stay in a child process."""
    script = ("import sys; from agent.hardware.bandwidth import measure_bandwidth; "
              "gbps = measure_bandwidth(threads=1, time_budget_s=0.2); "
              "print(gbps is not None and gbps > 0, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == ["True", "False"], out
