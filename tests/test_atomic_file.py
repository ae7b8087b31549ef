"""atomic_write: a process killed at any point of a replacement leaves the old file whole.

The writer is a real Python process that SIGKILLs itself at the named step (a profile hook in
the test's own child script sees the C call start), so the kill lands exactly between two
steps; the shipped function has no hook for it. A writer that stops itself (SIGSTOP) at a
step instead is a live writer caught in the middle, for the sweep of abandoned temporaries."""

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
    signal_name = sys.argv[4] if len(sys.argv) > 4 else "SIGKILL"
    seen = 0

    def profile(frame, event, arg):
        global seen
        if event == "c_call" and getattr(arg, "__name__", None) == kill_at:
            seen += 1
            if seen == nth:
                os.kill(os.getpid(), getattr(signal, signal_name))

    sys.setprofile(profile)
    atomic_write(target, b"new contents " * 1000)
    sys.setprofile(None)
""")


def run_writer(target: Path, kill_at: str, nth: int = 1) -> int:
    """atomic_write in a child that SIGKILLs itself as its ``nth`` call of ``kill_at`` starts."""
    command = [sys.executable, "-c", WRITER, str(target), kill_at, str(nth)]
    return subprocess.run(command, check=False, timeout=60).returncode


def start_writer(target: Path, stop_at: str, signal_name: str) -> subprocess.Popen:
    """atomic_write in a child that sends itself ``signal_name`` as its first ``stop_at`` starts;
    for SIGSTOP, returns once the child has stopped there."""
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(target), stop_at, "1", signal_name])
    if signal_name == "SIGSTOP":
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
    return child


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


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


@pytest.mark.parametrize("kill_at", ["write", "fsync", "replace"])
def test_the_next_write_removes_the_temporary_a_killed_writer_left(tmp_path, kill_at):
    target = tmp_path / "mqtt-session"
    target.write_bytes(b"41")
    child = start_writer(target, kill_at, "SIGKILL")
    assert child.wait(timeout=60) == -signal.SIGKILL
    # The leftover says whose it was.
    [leftover] = temporaries(tmp_path)
    assert leftover.startswith(f".mqtt-session.{child.pid}.")

    atomic_write(target, b"42")

    assert target.read_bytes() == b"42"
    assert temporaries(tmp_path) == []


def test_a_write_leaves_the_temporaries_of_other_files_alone(tmp_path):
    target = tmp_path / "overrides.json"
    other = tmp_path / "overrides.json.bak"
    child = start_writer(other, "fsync", "SIGKILL")
    assert child.wait(timeout=60) == -signal.SIGKILL
    [leftover] = temporaries(tmp_path)

    atomic_write(target, b"{}")

    assert temporaries(tmp_path) == [leftover]


@pytest.mark.parametrize("stop_at", ["write", "replace"])
def test_a_live_writers_temporary_is_left_alone(tmp_path, stop_at):
    target = tmp_path / "selection.json"
    child = start_writer(target, stop_at, "SIGSTOP")  # stopped with its temporary open
    try:
        [in_progress] = temporaries(tmp_path)

        atomic_write(target, b"from the parent")

        assert temporaries(tmp_path) == [in_progress]
    finally:
        os.kill(child.pid, signal.SIGCONT)
    assert child.wait(timeout=60) == 0
    assert target.read_bytes() == b"new contents " * 1000
    assert temporaries(tmp_path) == []


def test_a_writer_whose_temporary_is_swept_before_it_locked_it_still_writes(tmp_path):
    # Stopped between creating its temporary and locking it: to a sweep, that temporary looks
    # abandoned. The writer must notice when it resumes and write through a new one.
    target = tmp_path / "settings.json"
    child = start_writer(target, "flock", "SIGSTOP")
    try:
        assert len(temporaries(tmp_path)) == 1

        atomic_write(target, b"from the parent")

        assert temporaries(tmp_path) == []
    finally:
        os.kill(child.pid, signal.SIGCONT)
    assert child.wait(timeout=60) == 0
    assert target.read_bytes() == b"new contents " * 1000
    assert temporaries(tmp_path) == []
