"""A real Mosquitto broker for tests, on a free loopback port, restartable mid-test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        raise RuntimeError("mosquitto is not installed; scripts/test installs it (apt-get install mosquitto)")
    return found


class Broker:
    """One mosquitto process. ``persistence=True`` keeps sessions and queued QoS 1
    messages across ``restart()``, as a production broker would."""

    def __init__(self, workdir: Path, *, port: int | None = None, persistence: bool = True,
                 extra_config: str = "") -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true" if "allow_anonymous" not in extra_config else "",
            # As root, mosquitto drops to user "mosquitto", which cannot write the persistence
            # file under pytest's 0700 tmp dirs; sessions would then not survive restart().
            "user root" if os.geteuid() == 0 and "user " not in extra_config else "",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {workdir}/",
            "autosave_interval 1",
            "max_queued_messages 10000",
            # Streamed reply chunks are small packets; with Nagle on, mosquitto holds each one
            # until the subscriber's delayed ACK (up to 40 ms) of the one before.
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            extra_config,
        ]
        self.config_path.write_text("\n".join(line for line in lines if line) + "\n")
        self.log_path = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "Broker":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.config_path)], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()[-2000:]}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self, down_for_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for_s)
        self.start()
