"""The engine: the daemon's side of inference. Queue, deadlines, model state, crash restarts.

The model lives in a worker process (agent.runtime.worker); a native crash there costs one
request (``worker_crashed``), never the daemon. This module must stay light (no llama_cpp,
no numpy): the daemon imports it and its RSS is the agent's idle footprint.

``Engine`` is the public face; its parts share one agent.runtime.model_state.EngineState (the
model's state machine, ``ModelState`` and its ``TRANSITIONS`` table, changed only through
``EngineState.move``; the queue; what serves) under one Condition. ``drain`` is an operator's
hold beside the state machine (start nothing new), not a model state.

Threads and ownership:
- the caller's threads: submit() enqueues a request its caller validated (once, at the
  boundary: agent.mqtt.payloads.decode_prompt, the CLI's prompt command) and never waits on
  the worker: the worker tokenizes the prompt, once, and answers a prompt longer than the
  context with a ``too_long`` final. cancel(), drain(), resume(), stats() take the lock.
- load() and swap() run the ladder (agent.runtime.loader) on the caller's thread, and so does
  load()'s ``smaller`` (planning and fetching a smaller variant belongs to the caller), through
  agent.runtime.switch.ModelSwitch; a parallel swap loads the new worker while the ``engine``
  thread keeps serving on the old one.
- one ``engine`` thread (agent.runtime.runner.JobRunner) starts one generation at a time in
  arrival order, enforces deadlines, expires queued requests, and learns the decode rate. It
  never restarts a worker.
- one ``engine-supervisor`` thread (agent.runtime.restarts.RestartSupervisor) owns crash
  restarts: a worker's exit (during a request or idle) reaches it as a message; it restarts
  the same variant down the ladder and, when that fails, says so in a ``restart_failed``
  event (``smaller_wanted``: the daemon's model owner may load a smaller variant) and retries
  with a backoff.
- each WorkerProcess has two reader threads (agent.runtime.process). The frame reader hands
  every record of the running request (its chunks, then its final, or a ``worker_crashed``
  final when the worker dies) to its agent.runtime.job.Job and so to ``on_record``, on that
  one thread, in order: one hand-off from the worker to the daemon. A request that never ran
  gets its one final on the thread that expired or refused it. ``on_record`` must only hand
  the record on, never wait.
``on_event`` is called from whichever of these threads saw the event.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.catalog.selection import Selection
from agent.config import RuntimeConfig
from agent.log import get_logger
from agent.runtime.job import Job, RecordCallback, generate_frame
from agent.runtime.loader import EventCallback, WorkerLoader
from agent.runtime.metrics import Metrics
from agent.runtime.model_state import EngineState, ModelState
from agent.runtime.process import WORKER_ARGV, WorkerProcess
from agent.runtime.protocol import Cancel
from agent.runtime.request import GenerateRequest
from agent.runtime.restarts import RestartSupervisor
from agent.runtime.runner import JobRunner
from agent.runtime.switch import ModelSwitch, default_memory_budget

log = get_logger(__name__)


class Engine:
    def __init__(
        self,
        runtime: RuntimeConfig,
        *,
        state_dir: Path,
        device_id: str,
        on_event: EventCallback | None = None,
        memory_budget: Callable[[], int] = default_memory_budget,
        worker_argv: Sequence[str] = WORKER_ARGV,
    ) -> None:
        self._runtime = runtime
        self._on_event = on_event or (lambda event: None)
        self._loader = WorkerLoader(runtime, state_dir=Path(state_dir), device_id=device_id,
                                    emit=self._emit, worker_argv=worker_argv,
                                    on_exit=self._worker_exited)
        self._metrics = Metrics()
        self._state = EngineState(runtime.queue_size)
        self._started = time.monotonic()
        self._switch = ModelSwitch(self._state, self._loader, self._emit, memory_budget)
        self._runner = JobRunner(self._state, self._loader)
        self._supervisor = RestartSupervisor(self._state, self._loader, self._emit)
        self._runner.start()
        self._supervisor.start()

    # public API ------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        with self._state.cond:
            return len(self._state.queue)

    @property
    def selection(self) -> Selection | None:
        with self._state.cond:
            loaded = self._state.loaded
            return loaded.selection if loaded else None

    def load(self, selection: Selection, *,
             smaller: Callable[[Selection], Selection | None] | None = None) -> None:
        """Start a worker for ``selection`` (canary, fallback ladder, then ``smaller``
        variants, all on this thread); swap to it when a model is loaded already."""
        self._switch.load(selection, smaller)

    def submit(self, request: GenerateRequest, on_record: RecordCallback) -> None:
        """Enqueue ``request`` (validated by the caller with
        agent.runtime.request.validate_request); ``on_record`` then gets chunks and one final
        record. Raises no_model, busy, or bad_request for an id already queued or running."""
        timeout_s = (request.timeout_s if request.timeout_s is not None
                     else self._runtime.request_timeout_s)
        frame = generate_frame(request, self._runtime.default_max_tokens)
        job = Job(request, on_record, frame, time.monotonic() + timeout_s, self._metrics)
        state = self._state
        with state.cond:
            state.admit(request)
            state.queue.append(job)
            state.cond.notify_all()

    def generate(self, request: GenerateRequest) -> Iterator[dict[str, Any]]:
        """submit() as an iterator of records; raises submit()'s errors at once."""
        records: queue.Queue[dict[str, Any]] = queue.Queue()
        self.submit(request, records.put)

        def iterate() -> Iterator[dict[str, Any]]:
            while True:
                record = records.get()
                yield record
                if record.get("done"):
                    return

        return iterate()

    def cancel(self, request_id: str) -> bool:
        """Stop a queued or running request; its final record is error ``cancelled``."""
        state = self._state
        with state.cond:
            for job in state.queue:
                if job.request.id == request_id:
                    job.cancel_reason = "cancelled"
                    state.cond.notify_all()
                    return True
            job, busy = state.running_now(), state.busy
            if job is None or job.request.id != request_id or busy is None:
                return False
            if job.cancel_reason:
                return True  # already being stopped (a deadline's cancel stays a timeout)
            job.cancel_reason = "cancelled"
            job.cancel_sent = time.monotonic()
        busy.worker.send(Cancel(id=request_id, reason="cancelled"))
        return True

    def drain(self, timeout_s: float | None = None) -> bool:
        """Start nothing new (requests still queue) and wait for the running one to end."""
        state = self._state
        with state.cond:
            state.draining = True
            return state.cond.wait_for(lambda: state.running is None, timeout_s)

    def resume(self) -> None:
        with self._state.cond:
            self._state.draining = False
            self._state.cond.notify_all()

    def swap(self, selection: Selection) -> None:
        """Switch to ``selection`` without dropping requests; on failure keep/restore the old."""
        self._switch.swap(selection)

    def stats(self) -> dict[str, Any]:
        with self._state.cond:
            loaded, running = self._state.loaded, self._state.running_now()
            depth = len(self._state.queue)
            status = self._state.status()
        out: dict[str, Any] = {
            "state": status,
            "queue_depth": depth,
            "queue_size": self._runtime.queue_size,
            "running": running.request.id if running else None,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "worker_restarts": self._supervisor.restarts,
            "model": None,
            "worker": None,
            **self._metrics.summary(),
        }
        if loaded is not None:
            selection, info = loaded.selection, loaded.info
            out["model"] = {"model_id": selection.model_id, "quant": selection.quant,
                            "file": selection.file, "sha256": selection.sha256}
            out["worker"] = {
                "pid": loaded.worker.pid,
                "rss_bytes": loaded.worker.rss_bytes(),
                "peak_rss_bytes": loaded.worker.peak_rss_bytes(),
                "fallback_step": loaded.step,
                "settings": {k: v for k, v in loaded.settings.items() if k != "model_path"},
                "load_ms": round(info.load_ms, 3),
                "n_ctx": info.n_ctx,
            }
        return out

    def close(self, timeout_s: float = 10.0) -> None:
        """Fail what is queued, let the running request finish (up to timeout_s), stop."""
        state = self._state
        with state.cond:
            if state.model_state is not ModelState.STOPPED:
                state.move(ModelState.STOPPED, "")
            queued = list(state.queue)
            state.queue.clear()
            state.cond.notify_all()
        self._supervisor.stop()
        for job in queued:
            job.fail("cancelled", "the agent is shutting down; send the request again later")
        with state.cond:
            finished = state.cond.wait_for(lambda: state.running is None, timeout_s)
            busy, loaded = state.busy, state.loaded
            state.loaded = None
        if not finished and busy is not None:
            busy.worker.kill()
        if loaded is not None:
            loaded.worker.stop()
        self._runner.join(timeout_s)
        self._supervisor.join(timeout_s)
        self._loader.flush()

    def _worker_exited(self, worker: WorkerProcess) -> None:
        self._supervisor.worker_exited(worker)

    def _emit(self, event: dict[str, Any]) -> None:
        log.info(event["event"], **{k: v for k, v in event.items() if k != "event"})
        try:
            self._on_event(event)
        except Exception:  # same as on_record: the engine's own work goes on
            log.exception("on_event_failed", event=event["event"])
