"""Memory bandwidth: buffer sizing (pure) and one real, short measurement."""

from __future__ import annotations

import pytest

from agent.hardware.bandwidth import (
    MAX_BUFFER_BYTES,
    MIN_BUFFER_BYTES,
    buffer_bytes,
    measure_bandwidth,
    parse_cache_size,
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


def test_measure_bandwidth_is_positive():
    gbps = measure_bandwidth(threads=2, time_budget_s=0.2)
    assert gbps is not None and gbps > 0.1
