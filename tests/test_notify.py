"""sd_notify as systemd reads it: a real AF_UNIX datagram socket bound by the test, and a real
process (a child interpreter, or `edge-agent run`) writing to it through ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import RunningDaemon, wait_ready
from tests.support.signing import sign_file

INJECTED = "WATCHDOG=trigger"


@pytest.fixture
def notify_socket(tmp_path: Path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield path, sock
    sock.close()


def _received(sock: socket.socket, n: int) -> list[list[str]]:
    """The next ``n`` datagrams, each split into its assignments as systemd splits them."""
    return [sock.recv(65536).decode().split("\n") for _ in range(n)]


def test_a_status_text_cannot_smuggle_notify_commands(notify_socket):
    path, sock = notify_socket
    child = (
        "import sys; from agent.notify import Notifier; n = Notifier(); text = sys.stdin.read();"
        " n.status(text); n.ready(text); n.stopping(text); n.status('x' * 100000)"
    )
    text = "degraded (bad\nWATCHDOG=trigger\rMAINPID=1\x00\u2028READY=1)"
    subprocess.run([sys.executable, "-c", child], input=text, text=True, check=True, timeout=30,
                   env={**os.environ, "NOTIFY_SOCKET": str(path)})
    status, ready, stopping, long = _received(sock, 4)
    assert len(status) == 1 and status[0].startswith("STATUS=degraded (bad WATCHDOG=trigger")
    assert ready[0] == "READY=1" and len(ready) == 2 and ready[1] == status[0]
    assert stopping[0] == "STOPPING=1" and len(stopping) == 2
    assert len(long) == 1 and len(long[0]) < 1000


def test_a_manifest_name_with_a_newline_never_reaches_the_notify_socket(tmp_path, broker, ladder_dir,
                                                                          ladder_manifest):
    """A `\\n` in a variant's file or quant once went into STATUS=fetching …/loading … and
    from there to systemd as a command line of its own."""
    real = next(v for v in ladder_manifest["models"][0]["variants"] if v["quant"] == "Q4_K_M")
    directory = tmp_path / "m"
    directory.mkdir()
    evil_file = f"x.gguf\n{INJECTED}"
    (directory / evil_file).symlink_to(ladder_dir / real["file"])
    manifest = directory / "manifest.json"
    manifest.write_text(json.dumps({"schema": 1, "models": [{"id": "m", "variants": [{
        **real, "quant": f"Q4_K_M\n{INJECTED}", "file": evil_file}]}]}))
    sign_file(manifest)
    daemon = RunningDaemon(tmp_path / "d", broker, ladder_dir, model={"manifest": str(manifest), "pin": None})
    try:
        daemon.start()
        wait_ready(daemon)
        lines = [line for note in daemon.read_notifications() for line in note.split("\n")]
        assert INJECTED not in lines
        assert any(line.startswith("STATUS=degraded (manifest_invalid") for line in lines), lines
        assert daemon.stop() == 0
    finally:
        daemon.close()
