"""The parent's handle on one worker process: spawn, frames in and out, exit, RSS.

A reader thread decodes the worker's frames (agent.runtime.protocol's typed Structs). The
running request's chunks and final go straight to the sink set with ``stream_to`` (one
hand-off per record: the sink publishes on this same thread, in order); everything else
(``loaded``, ``load_failed``, frames when no sink is set) goes to ``records``. When the worker
exits, the sink hears it first (its request gets its final), then ``records`` gets a
WorkerExit and the ``watch_exit`` callback is called. A second thread keeps the tail of
llama.cpp's output so a crash can be explained. No llama_cpp here: this runs in the daemon.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec
import psutil

from agent.log import get_logger
from agent.runtime.protocol import (
    Chunk,
    Final,
    FrameReader,
    FrameWriter,
    FromWorker,
    ProtocolError,
    Stop,
)

log = get_logger(__name__)

STDERR_TAIL_LINES = 40
# The shipped worker; tests start another entry point (tests/support/crashing_worker.py).
WORKER_ARGV = (sys.executable, "-m", "agent.runtime.worker")


class WorkerExit(msgspec.Struct, frozen=True):
    returncode: int | None


class FrameSink(Protocol):
    """Where one running request's frames go; called on the worker's frame-reader thread."""

    def on_chunk(self, chunk: Chunk) -> None: ...

    def on_final(self, final: Final) -> None: ...

    def on_exit(self, returncode: int | None) -> None: ...


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
    def __init__(self, argv: Sequence[str] = WORKER_ARGV) -> None:
        self.records: queue.Queue[Any] = queue.Queue()  # Loaded, LoadFailed, WorkerExit, …
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._on_exit: Callable[[WorkerProcess], None] | None = None
        # (request id, sink) of the running request; set under the lock so that a sink set
        # after the exit was seen is refused rather than never told.
        self._sink: tuple[str, FrameSink] | None = None
        self._sink_lock = threading.Lock()
        self._exit_seen = False
        self.exited_during_request = False  # a request's sink was set when it exited
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        self._proc = subprocess.Popen(
            [*argv, "--fds", f"{to_worker_r},{from_worker_w}"],
            pass_fds=(to_worker_r, from_worker_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C for the CLI must not kill the worker mid-frame
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self._writer = FrameWriter(to_worker_w)
        self._reader = FrameReader(from_worker_r, FromWorker)
        self.exited = threading.Event()
        self.returncode: int | None = None
        for target, role in ((self._read_frames, "frames"), (self._read_output, "output")):
            threading.Thread(target=target, name=f"worker-{self.pid}-{role}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read_frames(self) -> None:
        try:
            while True:
                frame = self._reader.receive()
                if frame is None:
                    break
                sink = self._sink
                if sink is not None and isinstance(frame, (Chunk, Final)):
                    if frame.id == sink[0]:
                        (sink[1].on_chunk if isinstance(frame, Chunk) else sink[1].on_final)(frame)
                    else:  # a request the engine has given up on; its sink is gone
                        log.debug("stale_frame_dropped", pid=self.pid, id=frame.id)
                    continue
                self.records.put(frame)
        except (OSError, ProtocolError) as exc:
            log.error("worker_protocol_error", pid=self.pid, error=str(exc))
            self._proc.kill()
        self._reader.close()
        self.returncode = self._proc.wait()
        with self._sink_lock:
            self._exit_seen = True
            sink, self._sink = self._sink, None
            self.exited_during_request = sink is not None
            on_exit = self._on_exit
        self.exited.set()
        if sink is not None:
            sink[1].on_exit(self.returncode)
        self.records.put(WorkerExit(self.returncode))
        if on_exit is not None:
            on_exit(self)

    def _read_output(self) -> None:
        """The worker's stdout and stderr, merged into one pipe (Popen stderr=STDOUT)."""
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                log.debug("worker_output", pid=self.pid, line=line)

    def watch_exit(self, on_exit: Callable[[WorkerProcess], None] | None) -> None:
        """Call ``on_exit(self)`` when the worker exits (at once if it already has)."""
        if on_exit is None:
            return
        with self._sink_lock:
            seen = self._exit_seen
            if not seen:
                self._on_exit = on_exit
        if seen:
            on_exit(self)

    def stream_to(self, request_id: str | None, sink: FrameSink | None = None) -> bool:
        """Send ``request_id``'s chunks and final to ``sink`` on the reader thread (None: stop).

        False when the worker has already exited: the sink would never hear of it.
        """
        with self._sink_lock:
            if request_id is None or sink is None:
                self._sink = None
                return True
            if self._exit_seen:
                return False
            self._sink = (request_id, sink)
            return True

    def send(self, message: Any) -> bool:
        """Send one frame (an agent.runtime.protocol Struct); False when the worker is gone."""
        try:
            self._writer.send(message)
            return True
        except OSError:
            return False

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
            self.send(Stop())
            if not self.exited.wait(timeout_s):
                self.kill()
                self.exited.wait(timeout_s)
        self._writer.close()
