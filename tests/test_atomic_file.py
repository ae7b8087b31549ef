"""atomic_write: a process killed at any point of a replacement leaves the old file whole.

The writer is a real Python process that SIGKILLs itself at the named step (a profile hook in
the test's own child script sees the C call start), so the kill lands exactly between two
steps; the shipped function has no hook for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.atomic_file import atomic_write

WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from agent.atomic_file import atomic_write

    target, kill_at, nth = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    seen = 0

    def profile(frame, event, arg):
        global seen
        if event == "c_call" and getattr(arg, "__name__", None) == kill_at:
            seen += 1
            if seen == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.setprofile(profile)
    atomic_write(target, b"new contents " * 1000)
    sys.setprofile(None)
""")


def run_writer(target: Path, kill_at: str, nth: int = 1) -> int:
    """atomic_write in a child that SIGKILLs itself as its ``nth`` call of ``kill_at`` starts."""
    command = [sys.executable, "-c", WRITER, str(target), kill_at, str(nth)]
    return subprocess.run(command, check=False, timeout=60).returncode


@pytest.mark.parametrize("kill_at", ["write", "fsync", "replace"])
def test_a_writer_killed_before_the_rename_leaves_the_old_file(tmp_path, kill_at):
    target = tmp_path / "mqtt-session"
    target.write_bytes(b"41")

    assert run_writer(target, kill_at) == -signal.SIGKILL

    assert target.read_bytes() == b"41"


def test_a_writer_killed_after_the_rename_leaves_the_new_file(tmp_path):
    target = tmp_path / "overrides.json"
    target.write_bytes(b"{}")

    # The second fsync is the directory's: the rename has happened, its fsync has not.
    assert run_writer(target, "fsync", nth=2) == -signal.SIGKILL

    assert target.read_bytes() == b"new contents " * 1000


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "selection.json"
    target.write_bytes(b"old")

    atomic_write(target, b"new", mode=0o600)

    assert target.read_bytes() == b"new"
    assert os.stat(target).st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["selection.json"]


def test_a_failed_write_removes_its_temporary_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "state"
    target.mkdir()  # a directory cannot be replaced by a file: the rename fails
    (target / "inside").write_bytes(b"kept")

    with pytest.raises(OSError):
        atomic_write(target, b"new")

    assert (target / "inside").read_bytes() == b"kept"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
