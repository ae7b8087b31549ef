"""Progress events (throttled, never fatal) and the terminal bar (TTY only)."""

from __future__ import annotations

import io
import os

import pytest
from structlog.testing import capture_logs

from agent.fetch.progress import ProgressReporter, TerminalProgressBar

MiB = 1 << 20


class FakeClock:
    """Time under the test's control, so throttling is checked without sleeping."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_downloading_events_are_throttled_and_carry_a_rate():
    clock, events = FakeClock(), []
    reporter = ProgressReporter(events.append, file="m.gguf", total=100 * MiB, clock=clock)
    reporter.mirror = "http://mirror/m.gguf"
    reporter.state("starting", 0)
    for step in range(1, 101):  # 100 chunks of 1 MiB over one second
        clock.now += 0.01
        reporter.advance(step * MiB)

    downloading = [e for e in events if e["state"] == "downloading"]
    assert len(downloading) == 4  # at most one per 0.25 s
    assert downloading[-1]["rate_bps"] == pytest.approx(100 * MiB, rel=1e-3)  # 1 MiB per 10 ms
    assert downloading[-1]["mirror"] == "http://mirror/m.gguf"
    assert set(downloading[-1]) == {"event", "file", "bytes", "total", "rate_bps", "mirror",
                                    "state"}


def test_state_changes_are_never_throttled():
    events = []
    reporter = ProgressReporter(events.append, file="m.gguf", total=10, clock=FakeClock())
    for state in ("starting", "retrying", "verifying", "complete"):
        reporter.state(state, 10)
    assert [e["state"] for e in events] == ["starting", "retrying", "verifying", "complete"]


def test_a_failing_callback_does_not_stop_the_download():
    def broken(event: dict) -> None:
        raise ConnectionError("broker gone")

    with capture_logs() as logs:
        ProgressReporter(broken, file="m.gguf", total=10).state("starting", 0)
    assert logs[0]["event"] == "fetch_progress_callback_failed"


def test_bar_draws_on_a_tty_only():
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty:
        bar = TerminalProgressBar(tty, width=10)
        bar({"file": "m.gguf", "bytes": 5 * MiB, "total": 10 * MiB, "rate_bps": 2 * MiB,
             "state": "downloading"})
        bar({"file": "m.gguf", "bytes": 10 * MiB, "total": 10 * MiB, "rate_bps": 2 * MiB,
             "state": "complete"})
    drawn = b""
    while True:  # the follower is closed: read what it wrote until the pty says EIO
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        drawn += data
    os.close(leader)
    drawn = drawn.decode()
    assert "m.gguf [#####.....]  50.0% 5.0/10.0 MiB 2.0 MiB/s downloading" in drawn
    assert "[##########] 100.0%" in drawn and drawn.endswith("\r\n")

    pipe = io.StringIO()
    TerminalProgressBar(pipe)({"file": "m.gguf", "bytes": 1, "total": 2, "state": "complete"})
    assert pipe.getvalue() == ""
