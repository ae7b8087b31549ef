"""The daemon as users run it: `edge-agent run --config F` as a real subprocess, with its
config, log and an sd_notify socket read the way systemd reads it; and reply helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from tests.support.broker import Broker
from tests.support.observer import Observer
from tests.support.signing import TEST_PUBLIC_KEY

DEVICE = "dev-test"
BASE = f"edge/v1/{DEVICE}"
EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))


class RunningDaemon:
    """One `edge-agent run` process with its config, log and sd_notify socket."""

    def __init__(self, workdir: Path, broker: Broker, ladder_dir: Path, **overrides) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "device_id": DEVICE,
            "state_dir": str(workdir / "state"),
            "cache_dir": str(workdir / "models"),
            "mqtt": {"host": broker.host, "port": broker.port, "will_delay_s": 2,
                     "reconnect_min_s": 1, "reconnect_max_s": 2, "max_payload_bytes": 4096},
            "model": {"manifest": str(ladder_dir / "manifest.json"), "pin": "Q4_K_M"},
            "runtime": {"default_max_tokens": 16, "queue_size": 64},
            "telemetry": {"interval_s": 1.0},
            "log": {"json": True, "level": "info"},
            # The ladder's manifest is signed with the test key (tests/conftest.py ladder_dir).
            "signing": {"public_key": TEST_PUBLIC_KEY},
        }
        for section, values in overrides.items():
            config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
        self.config_path = workdir / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.notify_path = workdir / "notify.sock"
        self.notify_path.unlink(missing_ok=True)  # left by an earlier run on the same workdir
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.2)
        self.notifications: list[str] = []
        # Read all the time, as systemd does: the daemon must see a reader, never a full queue.
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._reader.start()
        self.log_path = workdir / "daemon.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RunningDaemon":
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), "WATCHDOG_USEC": "2000000",
               "PYTHONUNBUFFERED": "1"}
        env.pop("WATCHDOG_PID", None)
        self.process = subprocess.Popen([EDGE_AGENT, "run", "--config", str(self.config_path)],
                                        stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=env)
        return self

    def _read_notify(self) -> None:
        while True:
            try:
                self.notifications.append(self.notify.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def read_notifications(self, until: str | None = None, timeout: float = 90) -> list[str]:
        """What the daemon sent so far; with ``until``, wait for a notification containing it."""
        deadline = time.monotonic() + timeout
        while until is not None and not any(until in n for n in list(self.notifications)):
            if self.process and self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}: {self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {until!r} within {timeout}s; log: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        return list(self.notifications)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.notify.close()


def wait_ready(daemon: RunningDaemon) -> None:
    daemon.read_notifications(until="READY=1")


def finals(observer: Observer, topic: str) -> list[dict]:
    return [json.loads(m.payload) for m in observer.on(topic) if json.loads(m.payload).get("done")]


def wait_final(observer: Observer, topic: str, timeout: float = 60) -> dict:
    message = observer.wait_for(lambda m: m.topic == topic and json.loads(m.payload).get("done"), timeout)
    return json.loads(message.payload)


def mosquitto_pub(broker: Broker, topic: str, payload: str, *extra: str) -> None:
    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
                    "-t", topic, "-m", payload, *extra], check=True, timeout=10)
