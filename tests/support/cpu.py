"""CPU time spent by one call, for the bounds that hostile-input tests put on parsers."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class CpuSpent:
    seconds: float = 0.0


@contextmanager
def thread_cpu() -> Iterator[CpuSpent]:
    """CPU seconds this thread spends inside the block, with the cyclic GC paused.

    time.process_time also counts every other thread of the test process (a broker fixture, a
    server an earlier test left), and a GC pass walks the whole heap earlier tests built: either
    once pushed a 20 ms parse past a 0.5 s bound in CI. Neither is the parser's cost.
    """
    spent = CpuSpent()
    collecting = gc.isenabled()
    gc.disable()
    started = time.thread_time()
    try:
        yield spent
    finally:
        spent.seconds = time.thread_time() - started
        if collecting:
            gc.enable()
