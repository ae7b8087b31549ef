"""The engine: the daemon's side of inference. Queue, deadlines, model state, crash restarts.

The model lives in a worker process (agent.runtime.worker); a native crash there costs one
request (``worker_crashed``), never the daemon. This module must stay light (no llama_cpp,
no numpy): the daemon imports it and its RSS is the agent's idle footprint.

The model's lifecycle is one state machine: ``ModelState`` and the ``TRANSITIONS`` table,
changed only through ``Engine._move``. ``drain`` is an operator's hold beside it (start nothing
new), not a model state.

Threads and ownership:
- the caller's threads: submit() enqueues a request its caller validated (once, at the
  boundary: agent.mqtt.payloads.decode_prompt, the CLI's prompt command) and never waits on
  the worker: the worker tokenizes the prompt, once, and answers a prompt longer than the
  context with a ``too_long`` final. cancel(), drain(), resume(), stats() take the lock.
- load() and swap() run the ladder (agent.runtime.loader) on the caller's thread, and so does
  load()'s ``smaller`` (planning and fetching a smaller variant belongs to the caller); a
  parallel swap loads the new worker while the dispatcher keeps serving on the old one.
- one ``engine`` thread (the dispatcher) starts one generation at a time in arrival order,
  enforces deadlines, expires queued requests, and learns the decode rate. It never restarts
  a worker.
- one ``engine-supervisor`` thread owns crash restarts: a worker's exit (during a request or
  idle) reaches it as a message; it restarts the same variant down the ladder and, when that
  fails, says so in a ``restart_failed`` event (``smaller_wanted``: the daemon's model owner
  may load a smaller variant) and retries with a backoff.
- each WorkerProcess has two reader threads (agent.runtime.process). The frame reader hands
  every record of the running request (its chunks, then its final, or a ``worker_crashed``
  final when the worker dies) to ``on_record``, on that one thread, in order: one hand-off
  from the worker to the daemon. A request that never ran gets its one final on the thread
  that expired or refused it. ``on_record`` must only hand the record on, never wait.
``on_event`` is called from whichever of these threads saw the event.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from agent.catalog.selection import Selection
from agent.config import RuntimeConfig
from agent.errors import BusyError, ModelLoadError, NoModelError, RequestError
from agent.log import get_logger
from agent.runtime.loader import LoadedWorker, WorkerLoader
from agent.runtime.metrics import Metrics
from agent.runtime.process import WORKER_ARGV, WorkerProcess, describe_exit
from agent.runtime.protocol import Cancel, Chunk, Final, Generate
from agent.runtime.request import GenerateRequest

log = get_logger(__name__)

# After a timeout's cancel frame the worker must stop within this, or it is killed: a
# long prefill cannot be interrupted between tokens.
TIMEOUT_KILL_GRACE_S = 10.0
# A parallel swap needs the new model's estimate plus this share of it free.
SWAP_HEADROOM = 1.2
POLL_S = 0.05
# After a failed restart the supervisor tries again, doubling the wait up to the maximum:
# quick after a passing fault, gentle on a model that truly cannot load.
RESTART_RETRY_FIRST_S = 1.0
RESTART_RETRY_MAX_S = 60.0

RecordCallback = Callable[[dict[str, Any]], None]
EventCallback = Callable[[dict[str, Any]], None]


class ModelState(enum.Enum):
    NO_MODEL = "no_model"  # nothing loaded; prompts are refused with no_model
    LOADING = "loading"  # a first load from no model (prompts queue)
    READY = "ready"  # a worker serves
    SWAPPING = "swapping"  # a swap: the old worker serves (parallel) or nothing does (drained)
    RESTARTING = "restarting"  # the supervisor restarts a crashed worker (prompts queue)
    STOPPED = "stopped"  # closed; final


S = ModelState
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    S.NO_MODEL: frozenset({S.LOADING, S.RESTARTING, S.STOPPED}),
    S.LOADING: frozenset({S.READY, S.NO_MODEL, S.STOPPED}),
    S.READY: frozenset({S.SWAPPING, S.RESTARTING, S.STOPPED}),
    S.SWAPPING: frozenset({S.READY, S.NO_MODEL, S.STOPPED}),
    S.RESTARTING: frozenset({S.READY, S.NO_MODEL, S.STOPPED}),
    S.STOPPED: frozenset(),
}
# While the model changes, prompts wait in the queue instead of getting no_model.
_QUEUEING = frozenset({S.LOADING, S.READY, S.SWAPPING, S.RESTARTING})


def default_memory_budget() -> int:
    """Bytes a new worker may take now: the selector's cgroup-aware budget (agent.hardware)."""
    from agent.hardware.memory import probe_memory

    return probe_memory().budget_bytes


class _Job:
    """One request, queued or running; the FrameSink of the worker that runs it."""

    __slots__ = (
        "_metrics",
        "cancel_reason",
        "cancel_sent",
        "deadline",
        "done",
        "final",
        "frame",
        "killed",
        "model",
        "on_record",
        "request",
    )

    def __init__(self, request: GenerateRequest, on_record: RecordCallback, frame: Generate,
                 deadline: float, metrics: Metrics) -> None:
        self.request = request
        self.on_record = on_record
        self.frame = frame
        self.deadline = deadline
        self.cancel_reason: str | None = None
        self.cancel_sent: float | None = None
        self.killed = False  # by the dispatcher, after a timeout's grace
        self.model: dict[str, str] | None = None
        self.final: dict[str, Any] | None = None
        self.done = threading.Event()
        self._metrics = metrics

    # Called on one thread per job: the frame reader of the worker that runs it, or, for a job
    # that never ran, the thread that expired or refused it. So no lock, and nothing follows
    # the final.
    def on_chunk(self, chunk: Chunk) -> None:
        if self.final is None:
            self._deliver({"id": chunk.id, "seq": chunk.seq, "delta": chunk.delta})

    def on_final(self, final: Final) -> None:
        record = final.record()
        if self.model is not None:
            record["model"] = self.model
        self.finish(record)

    def on_exit(self, returncode: int | None) -> None:
        if self.killed:
            self.fail("timeout", "the request passed its deadline; the worker was restarted")
        else:
            self.fail("worker_crashed",
                      f"{describe_exit(returncode)} during the request; the worker is restarting")

    def fail(self, code: str, message: str) -> None:
        self.finish({"id": self.request.id, "done": True,
                     "error": {"code": code, "message": message}})

    def finish(self, record: dict[str, Any]) -> None:
        if self.final is not None:
            return
        self.final = record
        self._metrics.record(record)  # before the caller hears: stats() then counts it
        self._deliver(record)
        self.done.set()

    def _deliver(self, record: dict[str, Any]) -> None:
        try:
            self.on_record(record)
        except Exception:  # a broken consumer must not take the engine's threads down with it
            log.exception("on_record_failed", request_id=self.request.id)


def _generate_frame(request: GenerateRequest, default_max_tokens: int) -> Generate:
    form = request.response_format
    return Generate(
        id=request.id,
        max_tokens=request.max_tokens or default_max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        repeat_penalty=request.repeat_penalty,
        stop=list(request.stop),
        seed=request.seed,
        stream=request.stream,
        messages=msgspec.to_builtins(request.messages) if request.messages is not None else None,
        prompt=request.prompt,
        grammar=request.grammar,
        response_format=(msgspec.to_builtins(form)
                         if form is not None and form.type != "text" else None),
    )


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
        self._memory_budget = memory_budget
        self._loader = WorkerLoader(runtime, state_dir=Path(state_dir), device_id=device_id,
                                    emit=self._emit, worker_argv=worker_argv,
                                    on_exit=self._worker_exited)
        self._metrics = Metrics()
        self._cond = threading.Condition()
        self._state = ModelState.NO_MODEL
        self._queue: deque[_Job] = deque()
        self._running: _Job | None = None
        self._busy: LoadedWorker | None = None  # the worker the running job is on
        self._loaded: LoadedWorker | None = None  # the worker new jobs start on
        self._draining = False
        self._restarts = 0
        self._started = time.monotonic()
        self._exits: queue.Queue[WorkerProcess | None] = queue.Queue()  # None: stop
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="engine", daemon=True)
        self._supervisor = threading.Thread(target=self._supervise, name="engine-supervisor",
                                            daemon=True)
        self._dispatcher.start()
        self._supervisor.start()

    # public API ------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def selection(self) -> Selection | None:
        with self._cond:
            return self._loaded.selection if self._loaded else None

    def load(self, selection: Selection, *,
             smaller: Callable[[Selection], Selection | None] | None = None) -> None:
        """Start a worker for ``selection`` (canary, fallback ladder, then ``smaller``
        variants, all on this thread); swap to it when a model is loaded already."""
        with self._cond:
            if self._state is ModelState.READY:
                cold = False
            else:
                self._move(ModelState.LOADING, "a model load or swap is already in progress")
                cold = True
        if not cold:
            self.swap(selection)
            return
        loaded = None
        try:
            loaded = self._loader.start(selection, smaller)
        finally:
            self._settle(loaded)

    def submit(self, request: GenerateRequest, on_record: RecordCallback) -> None:
        """Enqueue ``request`` (validated by the caller with
        agent.runtime.request.validate_request); ``on_record`` then gets chunks and one final
        record. Raises no_model, busy, or bad_request for an id already queued or running."""
        timeout_s = (request.timeout_s if request.timeout_s is not None
                     else self._runtime.request_timeout_s)
        frame = _generate_frame(request, self._runtime.default_max_tokens)
        job = _Job(request, on_record, frame, time.monotonic() + timeout_s, self._metrics)
        with self._cond:
            self._admit(request)
            self._queue.append(job)
            self._cond.notify_all()

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
        with self._cond:
            for job in self._queue:
                if job.request.id == request_id:
                    job.cancel_reason = "cancelled"
                    self._cond.notify_all()
                    return True
            job, busy = self._running_now(), self._busy
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
        with self._cond:
            self._draining = True
            return self._cond.wait_for(lambda: self._running is None, timeout_s)

    def resume(self) -> None:
        with self._cond:
            self._draining = False
            self._cond.notify_all()

    def swap(self, selection: Selection) -> None:
        """Switch to ``selection`` without dropping requests; on failure keep/restore the old."""
        with self._cond:
            old = self._loaded
            swapping = self._state is ModelState.READY
            self._move(ModelState.SWAPPING if swapping else ModelState.LOADING,
                       "a model load or swap is already in progress")
        if old is None:
            loaded = None
            try:
                loaded = self._loader.start(selection)
            finally:
                self._settle(loaded)
        elif selection.estimate.ram_bytes * SWAP_HEADROOM <= self._memory_budget():
            self._swap_parallel(old, selection)
        else:
            self._swap_drained(old, selection)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            loaded, running = self._loaded, self._running_now()
            depth = len(self._queue)
            state = self._state_name()
        out: dict[str, Any] = {
            "state": state,
            "queue_depth": depth,
            "queue_size": self._runtime.queue_size,
            "running": running.request.id if running else None,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "worker_restarts": self._restarts,
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
        with self._cond:
            if self._state is not ModelState.STOPPED:
                self._move(ModelState.STOPPED, "")
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._exits.put(None)
        for job in queued:
            job.fail("cancelled", "the agent is shutting down; send the request again later")
        with self._cond:
            finished = self._cond.wait_for(lambda: self._running is None, timeout_s)
            busy, loaded = self._busy, self._loaded
            self._loaded = None
        if not finished and busy is not None:
            busy.worker.kill()
        if loaded is not None:
            loaded.worker.stop()
        self._dispatcher.join(timeout_s)
        self._supervisor.join(timeout_s)
        self._loader.flush()

    # the state machine ---------------------------------------------------------------------

    def _move(self, to: ModelState, refusal: str) -> None:
        """The one place the state changes; called with the lock held. A move the table does
        not allow raises ModelLoadError(refusal), or is a bug when there is no refusal."""
        if to not in TRANSITIONS[self._state]:
            if refusal:
                raise ModelLoadError(f"{refusal} ({self._state.value}); try again")
            raise AssertionError(f"engine state {self._state.value} -> {to.value}")
        log.debug("engine_state", state=to.value, was=self._state.value)
        self._state = to
        self._cond.notify_all()

    def _settle(self, loaded: LoadedWorker | None) -> None:
        """End a load/swap/restart: serve ``loaded``, or nothing; a closed engine stops it."""
        with self._cond:
            if self._state is ModelState.STOPPED:
                stray = loaded
            else:
                stray = None
                self._loaded = loaded or self._loaded
                self._move(ModelState.READY if self._loaded else ModelState.NO_MODEL, "")
        if stray is not None:
            stray.worker.stop()

    def _state_name(self) -> str:
        """What stats() and the daemon's status call the state now."""
        if self._state is ModelState.STOPPED:
            return "stopped"
        if self._state is ModelState.SWAPPING and self._loaded is None:
            return "swapping"  # a drained swap: nothing serves meanwhile
        if self._draining:
            return "draining"
        if self._loaded is None:
            return "no_model" if self._state is ModelState.NO_MODEL else "loading"
        return "busy" if self._running_now() else "ready"

    def _running_now(self) -> _Job | None:
        """The running job until its final is out (the dispatcher clears ``_running`` after)."""
        job = self._running
        return job if job is not None and not job.done.is_set() else None

    def _admit(self, request: GenerateRequest) -> None:
        """Raise if the request cannot be queued now; called with the lock held."""
        if self._state is ModelState.STOPPED:
            raise NoModelError("the engine is shut down")
        if self._state not in _QUEUEING:
            raise NoModelError("no model is loaded; select and fetch one first")
        running = self._running_now()
        if (running and running.request.id == request.id) or any(
            job.request.id == request.id for job in self._queue
        ):
            raise RequestError(f"id: request {request.id} is already queued or running", field="id")
        depth = len(self._queue)
        if depth >= self._runtime.queue_size:
            raise BusyError(
                f"the queue is full ({depth} requests waiting); retry later", queue_depth=depth
            )

    def _emit(self, event: dict[str, Any]) -> None:
        log.info(event["event"], **{k: v for k, v in event.items() if k != "event"})
        try:
            self._on_event(event)
        except Exception:  # same as on_record: the engine's own work goes on
            log.exception("on_event_failed", event=event["event"])

    # swapping ------------------------------------------------------------------------------

    def _swap_parallel(self, old: LoadedWorker, selection: Selection) -> None:
        try:
            new = self._loader.start(selection)
        except ModelLoadError as exc:
            self._emit({"event": "rollback", "to": old.selection.quant, "reason": exc.message})
            self._settle(None)
            raise
        with self._cond:
            retire_now = self._busy is not old
            self._loaded = new
        self._settle(new)
        if retire_now:
            old.worker.stop()
        # else the dispatcher stops it when its running request ends
        self._emit({"event": "model_switch", "mode": "parallel", "from": old.selection.quant,
                    "to": selection.quant, "model_id": selection.model_id})

    def _swap_drained(self, old: LoadedWorker, selection: Selection) -> None:
        with self._cond:
            self._loaded = None  # nothing new starts; the running request ends on the old one
            self._cond.wait_for(lambda: self._running is None)
        old.worker.stop()
        try:
            new = self._loader.start(selection)
        except ModelLoadError as exc:
            self._emit({"event": "rollback", "to": old.selection.quant, "reason": exc.message})
            restored = None
            try:
                restored = self._loader.start(old.selection, None, old.step)
            finally:
                self._settle(restored)
            raise
        self._settle(new)
        self._emit({"event": "model_switch", "mode": "drained", "from": old.selection.quant,
                    "to": selection.quant, "model_id": selection.model_id})

    # dispatching ---------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                picked = self._next_job()
            if picked is None:
                return
            job, loaded, expired = picked
            for gone in expired:
                self._expire(gone)
            if job is not None and loaded is not None:
                self._run(job, loaded)

    def _next_job(self) -> tuple[_Job | None, LoadedWorker | None, list[_Job]] | None:
        """Wait for work; called with the lock held. None once the engine is stopped."""
        while True:
            if self._state is ModelState.STOPPED:
                return None
            now = time.monotonic()
            expired = [job for job in self._queue if job.cancel_reason or job.deadline <= now]
            if self._state is ModelState.NO_MODEL:
                expired = list(self._queue)
            for job in expired:
                self._queue.remove(job)
            loaded = self._loaded
            serving = loaded is not None and not loaded.worker.exited.is_set()
            if self._queue and serving and not self._draining:
                job = self._queue.popleft()
                self._running, self._busy = job, loaded
                return job, loaded, expired
            if expired:
                return None, None, expired
            wait = min((job.deadline - now for job in self._queue), default=None)
            self._cond.wait(None if wait is None else max(wait, POLL_S))

    def _expire(self, job: _Job) -> None:
        if job.cancel_reason:
            job.fail("cancelled", "cancelled before it started")
        elif job.deadline > time.monotonic():
            job.fail("no_model", "no model is loaded; the last one failed to restart")
        else:
            job.fail("timeout", "the request waited past its deadline in the queue")

    def _run(self, job: _Job, loaded: LoadedWorker) -> None:
        worker = loaded.worker
        job.model = loaded.model
        streaming = worker.stream_to(job.request.id, job)
        if streaming and worker.send(job.frame):
            self._await_final(job, loaded)
        elif streaming:
            job.done.wait()  # the worker is gone: its frame reader fails the job at the exit
        worker.stream_to(None)
        with self._cond:
            self._running = self._busy = None
            if not streaming:
                self._queue.appendleft(job)  # it died just before: run it on the restarted one
            retired = loaded is not self._loaded and not worker.exited.is_set()
            self._cond.notify_all()
        if retired:
            loaded.worker.stop()
        if job.final is not None:
            self._loader.learn_speed(loaded, job.final)

    def _await_final(self, job: _Job, loaded: LoadedWorker) -> None:
        """Wait for the job's final (the frame reader delivers it); enforce the deadline."""
        worker = loaded.worker
        while not job.done.wait(max(min(job.deadline - time.monotonic(), 1.0), POLL_S)):
            now = time.monotonic()
            with self._cond:
                timed_out = now >= job.deadline and job.cancel_reason is None
                if timed_out:
                    job.cancel_reason, job.cancel_sent = "timeout", now
            if timed_out:
                worker.send(Cancel(id=job.request.id, reason="timeout"))
            elif (job.cancel_reason == "timeout" and job.cancel_sent is not None
                  and now - job.cancel_sent > TIMEOUT_KILL_GRACE_S and not job.killed):
                job.killed = True  # its final comes from the frame reader, at the exit
                loaded.kill_reason = "killed after a request passed its deadline"
                worker.kill()

    # supervising ---------------------------------------------------------------------------

    def _worker_exited(self, worker: WorkerProcess) -> None:
        """A watched worker's frame reader: hand the exit to the supervisor, never handle it."""
        self._exits.put(worker)
        with self._cond:
            self._cond.notify_all()  # the dispatcher must not start a job on it

    def _supervise(self) -> None:
        crashed: LoadedWorker | None = None  # what a failed restart keeps retrying
        delay_s = RESTART_RETRY_FIRST_S
        attempt = 0
        while True:
            try:
                exited = self._exits.get(timeout=delay_s if crashed else None)
            except queue.Empty:
                exited = False
            if exited is None:
                return
            if exited:
                found = self._take_crashed(exited)
                if found is None:
                    continue  # retired by a swap, or a failed rung: no crash to restart
                crashed, delay_s, attempt = found, RESTART_RETRY_FIRST_S, 0
            elif crashed is None or not self._begin_retry():
                crashed = None  # stopped, or someone loaded a model meanwhile
                continue
            elif attempt:
                delay_s = min(delay_s * 2, RESTART_RETRY_MAX_S)
            attempt += 1
            if self._restart(crashed, attempt, delay_s):
                crashed = None

    def _take_crashed(self, worker: WorkerProcess) -> LoadedWorker | None:
        with self._cond:
            loaded = self._loaded
            if loaded is None or loaded.worker is not worker:
                return None
            self._loaded = None
            if self._state is ModelState.READY:
                self._move(ModelState.RESTARTING, "")
            else:
                return None  # a swap is under way: it settles what serves next
        reason = loaded.kill_reason or describe_exit(worker.returncode) + (
            "" if worker.exited_during_request else " while idle")
        self._restarts += 1
        self._emit({"event": "worker_crashed", "reason": reason, "quant": loaded.selection.quant,
                    "step": loaded.step, "pid": worker.pid})
        return loaded

    def _begin_retry(self) -> bool:
        with self._cond:
            if self._state is not ModelState.NO_MODEL:
                return False
            self._move(ModelState.RESTARTING, "")
            return True

    def _restart(self, crashed: LoadedWorker, attempt: int, delay_s: float) -> bool:
        """Restart with the remembered setting, further down the ladder if needed."""
        restarted = None
        try:
            restarted = self._loader.start(crashed.selection, None, crashed.step)
        except ModelLoadError as exc:
            # What killed it may have been passing (an OOM killer, an operator, a crash storm
            # during the restart's own canary): the supervisor keeps trying, backing off, so
            # the device serves again without a person. Meanwhile requests get no_model.
            self._emit({"event": "restart_failed", "reason": exc.message, "attempt": attempt,
                        "retry_in_s": delay_s, "quant": crashed.selection.quant,
                        "smaller_wanted": True})
        finally:
            self._settle(restarted)
        return restarted is not None
