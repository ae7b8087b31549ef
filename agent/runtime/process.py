"""The parent's handle on one worker process: spawn, frames in and out, exit, RSS.

A reader thread turns the worker's frames into a queue of records (``count`` replies go
to whoever asked; the chunks of the request set with ``stream_to`` go straight to its sink,
a thread hop less per token); a second thread keeps the tail of llama.cpp's stderr so a crash can be
explained. When the worker exits, the queue gets ``{"type": "exit", "returncode": …}``.
No llama_cpp here: this runs in the daemon.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import psutil

from agent.log import get_logger
from agent.runtime.protocol import FrameReader, FrameWriter, ProtocolError

log = get_logger(__name__)

STDERR_TAIL_LINES = 40


def describe_exit(returncode: int | None) -> str:
    """A human reason for a worker exit: ``worker killed by SIGSEGV``."""
    if returncode is None:
        return "worker stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"worker killed by {name}"
    return f"worker exited with status {returncode}"


class WorkerProcess:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.records: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._counts: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._counts_lock = threading.Lock()
        self._tags = itertools.count(1)
        # (request id, sink) for the running request's chunks; swapped whole, read by the reader.
        self._chunk_sink: tuple[str, Callable[[dict[str, Any]], None]] | None = None
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.runtime.worker",
                "--fds",
                f"{to_worker_r},{from_worker_w}",
            ],
            pass_fds=(to_worker_r, from_worker_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C for the CLI must not kill the worker mid-frame
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self._writer = FrameWriter(to_worker_w)
        self._reader = FrameReader(from_worker_r)
        self.exited = threading.Event()
        self.returncode: int | None = None
        threading.Thread(target=self._read_frames, name=f"worker-{self.pid}-frames", daemon=True).start()
        threading.Thread(target=self._read_output, name=f"worker-{self.pid}-output", daemon=True).start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read_frames(self) -> None:
        try:
            while True:
                message = self._reader.receive()
                if message is None:
                    break
                if message.get("type") == "count":
                    with self._counts_lock:
                        waiter = self._counts.pop(message["tag"], None)
                    if waiter:
                        waiter[1].append(message)
                        waiter[0].set()
                    continue
                sink = self._chunk_sink
                if sink is not None and message.get("type") == "chunk" and message.get("id") == sink[0]:
                    del message["type"]
                    sink[1](message)
                    continue
                self.records.put(message)
        except (OSError, ProtocolError) as exc:
            log.error("worker_protocol_error", pid=self.pid, error=str(exc))
            self._proc.kill()
        self._reader.close()
        self.returncode = self._proc.wait()
        with self._counts_lock:
            for event, _ in self._counts.values():
                event.set()
            self._counts.clear()
        self.exited.set()
        self.records.put({"type": "exit", "returncode": self.returncode})

    def _read_output(self) -> None:
        """The worker's stdout and stderr, merged into one pipe (Popen stderr=STDOUT)."""
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                log.debug("worker_output", pid=self.pid, line=line)

    def stream_to(self, request_id: str | None, sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Deliver ``request_id``'s chunks to ``sink`` on the reader thread (None: to ``records``).

        Each token's chunk then costs the parent one thread wake-up, not two: on a small
        board the worker's compute threads hold every core, and every wake-up preempts one.
        """
        self._chunk_sink = (request_id, sink) if request_id is not None and sink is not None else None

    def send(self, message: dict[str, Any]) -> bool:
        """Send one frame; False when the worker is already gone."""
        try:
            self._writer.send(message)
            return True
        except OSError:
            return False

    def count(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Ask the worker to tokenize a prompt; None when it cannot answer in time."""
        tag = next(self._tags)
        event: threading.Event = threading.Event()
        box: list[dict[str, Any]] = []
        with self._counts_lock:
            if self.exited.is_set():
                return None
            self._counts[tag] = (event, box)
        if not self.send({**message, "op": "count", "tag": tag}):
            return None
        event.wait(timeout_s)
        with self._counts_lock:
            self._counts.pop(tag, None)
        return box[0] if box else None

    def rss_bytes(self) -> int | None:
        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return None

    def peak_rss_bytes(self) -> int | None:
        """The worker's high-water RSS (Linux VmHWM); None where /proc has no such line."""
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to exit, then kill it if it does not."""
        if not self.exited.is_set():
            self.send({"op": "stop"})
            if not self.exited.wait(timeout_s):
                self.kill()
                self.exited.wait(timeout_s)
        self._writer.close()
