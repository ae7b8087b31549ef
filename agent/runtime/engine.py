"""The engine: the daemon's side of inference. Queue, deadlines, canary, fallback, swap.

The model lives in a worker process (agent.runtime.worker); a native crash there costs one
request (``worker_crashed``), never the daemon. This module must stay light (no llama_cpp,
no numpy): the daemon imports it and its RSS is the agent's idle footprint.

Threads and ownership:
- the caller's threads: submit() validates, counts prompt tokens through the worker
  (a quick ``count`` frame) and enqueues; cancel(), drain(), resume(), stats() take the lock.
- one ``engine`` thread (the dispatcher) runs one generation at a time in arrival order,
  calls ``on_record`` for the final record, records the decode rate it measured
  (agent.catalog.learned.LearnedSpeed), enforces deadlines and restarts a crashed worker
  down the fallback ladder. The running request's chunks reach ``on_record`` from the
  worker's frame-reader thread (one thread wake-up per token instead of two); a per-job lock
  keeps the calls one at a time and no chunk after the final.
- load() and swap() run the ladder on the caller's thread; a parallel swap loads the new
  worker while the dispatcher keeps serving on the old one.
- each WorkerProcess has two reader threads of its own (agent.runtime.process).
``on_event`` is called from whichever of these threads saw the event.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil

from agent.catalog.learned import MIN_DECODED_TOKENS, LearnedSpeed, llama_build_key
from agent.catalog.selection import Selection
from agent.config import RuntimeConfig
from agent.errors import (
    BusyError,
    ModelLoadError,
    NoModelError,
    RequestError,
    TooLongError,
)
from agent.log import get_logger
from agent.runtime.ladder import CANARY_PROMPT, rungs
from agent.runtime.metrics import Metrics
from agent.runtime.process import WorkerProcess, describe_exit
from agent.runtime.request import GenerateRequest, validate_request
from agent.runtime.settings_memory import SettingsMemory

log = get_logger(__name__)

# A load that takes longer than this is treated as hung; big models on SD cards are slow.
LOAD_TIMEOUT_S = 600.0
# Tokenizing a prompt takes milliseconds; this only bounds a worker that stopped answering.
COUNT_TIMEOUT_S = 10.0
# After a timeout's cancel frame the worker must stop within this, or it is killed: a
# long prefill cannot be interrupted between tokens.
TIMEOUT_KILL_GRACE_S = 10.0
# A parallel swap needs the new model's estimate plus this share of it free.
SWAP_HEADROOM = 1.2
POLL_S = 0.05
# After a failed restart the engine tries again in the background, doubling the wait up
# to the maximum: quick after a passing fault, gentle on a model that truly cannot load.
RESTART_RETRY_FIRST_S = 1.0
RESTART_RETRY_MAX_S = 60.0
# How often an idle engine looks at its worker, so one that died between requests (OOM
# killer, a stray signal) is restarted before the next request arrives.
IDLE_WATCH_S = 0.5

RecordCallback = Callable[[dict[str, Any]], None]
EventCallback = Callable[[dict[str, Any]], None]


class _Job:
    __slots__ = ("request", "on_record", "frame", "deadline", "cancel_reason", "cancel_sent", "_lock", "_finished")

    def __init__(self, request: GenerateRequest, on_record: RecordCallback, frame: dict[str, Any], deadline: float) -> None:
        self.request = request
        self.on_record = on_record
        self.frame = frame
        self.deadline = deadline
        self.cancel_reason: str | None = None
        self.cancel_sent: float | None = None
        self._lock = threading.Lock()
        self._finished = False

    def deliver(self, record: dict[str, Any]) -> None:
        # Chunks come from the worker's reader thread, finals from the engine thread: the
        # lock keeps on_record calls one at a time, and a late chunk (a worker killed at its
        # deadline) is dropped rather than sent after the final.
        with self._lock:
            if self._finished:
                return
            if record.get("done"):
                self._finished = True
            try:
                self.on_record(record)
            except Exception:  # a broken consumer must not take the engine's threads down with it
                log.exception("on_record_failed", request_id=self.request.id)

    def fail(self, code: str, message: str) -> dict[str, Any]:
        final = {"id": self.request.id, "done": True, "error": {"code": code, "message": message}}
        self.deliver(final)
        return final


class _Loaded:
    """A running worker and what it was loaded with."""

    def __init__(self, worker: WorkerProcess, selection: Selection, step: str, settings: dict[str, Any], info: dict[str, Any]) -> None:
        self.worker = worker
        self.selection = selection
        self.step = step
        self.settings = settings
        self.info = info
        self.decode_cost: Any = None  # agent.catalog.speed.DecodeCost, for learning the rate


def _model_key(selection: Selection) -> str:
    return selection.sha256 or f"path:{selection.model_path}"


def _decode_cost(selection: Selection, kv_type: str) -> Any:
    """What one decoded token of the loaded file reads (agent.catalog.speed.DecodeCost), or
    None when its header cannot be read: speed is then not learned for it."""
    from agent.catalog.gguf import read_gguf_header, read_gguf_split
    from agent.catalog.speed import decode_cost
    from agent.errors import EdgeAgentError

    if not selection.sha256 or not selection.model_path:
        return None
    folder = Path(selection.model_path).parent  # a split's parts are kept beside the first
    try:
        info = (read_gguf_split([[str(folder / part.file)] for part in selection.parts])
                if selection.parts else read_gguf_header(selection.model_path))
        return decode_cost(info, kv_type)
    except EdgeAgentError as exc:
        log.warning("decode_cost_unknown", file=selection.file, error=exc.message)
        return None


class Engine:
    def __init__(
        self,
        runtime: RuntimeConfig,
        *,
        state_dir: Path,
        device_id: str,
        on_event: EventCallback | None = None,
    ) -> None:
        self._runtime = runtime
        self._state_dir = Path(state_dir)
        self._device_id = device_id
        self._on_event = on_event or (lambda event: None)
        self._memory = SettingsMemory(self._state_dir)
        self._speed = LearnedSpeed(self._state_dir)
        self._build = llama_build_key()
        self._metrics = Metrics()
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._running: _Job | None = None
        self._busy: _Loaded | None = None  # the worker the running job is on
        self._loaded: _Loaded | None = None
        self._smaller: Callable[[Selection], Selection | None] | None = None
        self._holds: set[str] = set()  # reasons not to start new jobs: drain, swap
        self._transitions = 0  # load/swap/restart in progress: queue instead of no_model
        self._closed = False
        self._restarts = 0
        self._started = time.monotonic()
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="engine", daemon=True)
        self._dispatcher.start()

    # public API ------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def selection(self) -> Selection | None:
        with self._cond:
            return self._loaded.selection if self._loaded else None

    def load(self, selection: Selection, *, smaller: Callable[[Selection], Selection | None] | None = None) -> None:
        """Start a worker for ``selection``: canary, fallback ladder, smaller variants."""
        with self._cond:
            self._smaller = smaller
            already = self._loaded is not None
        if already:
            self.swap(selection)
            return
        with self._cond:
            self._transitions += 1
        try:
            loaded = self._start(selection, smaller)
        finally:
            with self._cond:
                self._transitions -= 1
                self._cond.notify_all()
        with self._cond:
            self._loaded = loaded
            self._cond.notify_all()

    def submit(self, request: GenerateRequest, on_record: RecordCallback) -> None:
        """Validate and enqueue; ``on_record`` then gets chunks and one final record."""
        validate_request(request)
        frame = self._frame(request)
        with self._cond:
            loaded = self._admit(request)
        if loaded is not None:
            self._check_length(loaded, frame)
        timeout_s = request.timeout_s if request.timeout_s is not None else self._runtime.request_timeout_s
        job = _Job(request, on_record, frame, time.monotonic() + timeout_s)
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
            job, busy = self._running, self._busy
            if job is None or job.request.id != request_id or busy is None:
                return False
            job.cancel_reason = "cancelled"
            job.cancel_sent = time.monotonic()
        busy.worker.send({"op": "cancel", "id": request_id, "reason": "cancelled"})
        return True

    def drain(self, timeout_s: float | None = None) -> bool:
        """Start nothing new (requests still queue) and wait for the running one to end."""
        with self._cond:
            self._holds.add("drain")
            return self._cond.wait_for(lambda: self._running is None, timeout_s)

    def resume(self) -> None:
        with self._cond:
            self._holds.discard("drain")
            self._cond.notify_all()

    def swap(self, selection: Selection) -> None:
        """Switch to ``selection`` without dropping requests; on failure keep/restore the old."""
        with self._cond:
            if "swap" in self._holds or self._transitions:
                raise ModelLoadError("a model load or swap is already in progress; try again")
            old = self._loaded
            self._transitions += 1
        try:
            available = psutil.virtual_memory().available
            if old is None:
                self._swap_cold(selection)
            elif selection.estimate.ram_bytes * SWAP_HEADROOM <= available:
                self._swap_parallel(old, selection)
            else:
                self._swap_drained(old, selection)
        finally:
            with self._cond:
                self._transitions -= 1
                self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            loaded, running = self._loaded, self._running
            depth = len(self._queue)
            state = self._state()
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
            selection = loaded.selection
            out["model"] = {
                "model_id": selection.model_id,
                "quant": selection.quant,
                "file": selection.file,
                "sha256": selection.sha256,
            }
            out["worker"] = {
                "pid": loaded.worker.pid,
                "rss_bytes": loaded.worker.rss_bytes(),
                "peak_rss_bytes": loaded.worker.peak_rss_bytes(),
                "fallback_step": loaded.step,
                "settings": {k: v for k, v in loaded.settings.items() if k != "model_path"},
                "load_ms": round(loaded.info.get("load_ms", 0.0), 3),
                "n_ctx": loaded.info.get("n_ctx"),
            }
        return out

    def close(self, timeout_s: float = 10.0) -> None:
        """Fail what is queued, let the running request finish (up to timeout_s), stop."""
        with self._cond:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
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
        try:
            self._speed.flush()
        except OSError as exc:
            log.warning("learned_speed_not_written", error=str(exc))

    # submit helpers -----------------------------------------------------------------------

    def _frame(self, request: GenerateRequest) -> dict[str, Any]:
        frame: dict[str, Any] = {
            "op": "generate",
            "id": request.id,
            "max_tokens": request.max_tokens or self._runtime.default_max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "min_p": request.min_p,
            "repeat_penalty": request.repeat_penalty,
            "stop": list(request.stop),
            "seed": request.seed,
            "stream": request.stream,
        }
        if request.messages is not None:
            frame["messages"] = msgspec.to_builtins(request.messages)
        else:
            frame["prompt"] = request.prompt
        if request.grammar is not None:
            frame["grammar"] = request.grammar
        if request.response_format is not None and request.response_format.type != "text":
            frame["response_format"] = msgspec.to_builtins(request.response_format)
        return frame

    def _admit(self, request: GenerateRequest) -> _Loaded | None:
        """Raise if the request cannot be queued now; called with the lock held."""
        if self._closed:
            raise NoModelError("the engine is shut down")
        if self._loaded is None and not self._transitions:
            raise NoModelError("no model is loaded; select and fetch one first")
        if (self._running and self._running.request.id == request.id) or any(
            job.request.id == request.id for job in self._queue
        ):
            raise RequestError(f"id: request {request.id} is already queued or running", field="id")
        depth = len(self._queue)
        if depth >= self._runtime.queue_size:
            raise BusyError(
                f"the queue is full ({depth} requests waiting); retry later", queue_depth=depth
            )
        return self._loaded

    def _check_length(self, loaded: _Loaded, frame: dict[str, Any]) -> None:
        question = {k: frame[k] for k in ("messages", "prompt") if k in frame}
        reply = loaded.worker.count(question, COUNT_TIMEOUT_S)
        if reply is None or reply.get("error") == "not_loaded":
            return  # the worker checks again before it generates
        if "error" in reply:
            raise RequestError(f"messages: the chat template rejects them: {reply['error']}", field="messages")
        n_tokens, n_ctx = reply["n_tokens"], reply["n_ctx"]
        if n_tokens >= n_ctx:
            raise TooLongError(
                f"prompt is {n_tokens} tokens, context is {n_ctx}",
                prompt_tokens=n_tokens,
                n_ctx=n_ctx,
            )

    # loading -------------------------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        log.info(event["event"], **{k: v for k, v in event.items() if k != "event"})
        try:
            self._on_event(event)
        except Exception:  # same as on_record: the engine's own work goes on
            log.exception("on_event_failed", event=event["event"])

    def _start(
        self,
        selection: Selection,
        smaller: Callable[[Selection], Selection | None] | None,
        start_step: str | None = None,
    ) -> _Loaded:
        """Walk the ladder from the remembered (or given) step; raise ModelLoadError."""
        attempts: list[str] = []
        current: Selection | None = selection
        while current is not None:
            if not current.model_path:
                raise ModelLoadError(f"{current.quant}: no local model file; fetch it first")
            remembered = self._memory.lookup(self._device_id, _model_key(current))
            first = start_step or (remembered["step"] if remembered else "as_selected")
            ladder = rungs(current, self._runtime, first)
            for index, (step, settings) in enumerate(ladder):
                loaded, reason, message = self._try(current, step, settings)
                if loaded is not None:
                    self._after_load(loaded)
                    return loaded
                attempts.append(f"{current.quant}/{step}: {message}")
                following = ladder[index + 1][0] if index + 1 < len(ladder) else "smaller_variant"
                self._emit(
                    {
                        "event": "canary_fallback",
                        "step": following,
                        "failed_step": step,
                        "quant": current.quant,
                        "reason": reason,
                        "message": f"{current.quant} failed with {step}: {message}; trying {following}",
                    }
                )
            start_step = None
            current = smaller(current) if smaller else None
        raise ModelLoadError(
            f"every fallback setting failed for {selection.model_id}: {attempts[-1] if attempts else 'nothing tried'}",
            attempts=attempts,
        )

    def _try(self, selection: Selection, step: str, settings: dict[str, Any]) -> tuple[_Loaded | None, str, str]:
        """One load + canary. Returns (loaded, "", "") or (None, reason, message)."""
        worker = WorkerProcess()
        worker.send(
            {
                "op": "load",
                "settings": settings,
                "canary": {"prompt": CANARY_PROMPT, "tokens": self._runtime.canary_tokens},
            }
        )
        try:
            reply = worker.records.get(timeout=LOAD_TIMEOUT_S)
        except queue.Empty:
            reply = {"type": "exit", "returncode": None}
        kind = reply.get("type")
        if kind == "loaded" and (self._runtime.canary_tokens == 0 or reply["canary_tokens"] > 0):
            return _Loaded(worker, selection, step, settings, reply), "", ""
        if kind == "loaded":
            reason = message = "canary produced no tokens"
        elif kind == "load_failed":
            reason, message = "load failed", reply["message"]
        else:
            worker.exited.wait(2.0)
            reason = describe_exit(worker.returncode if kind == "exit" else None)
            message = reason
            if worker.stderr_tail:
                message = f"{reason}; last output: {worker.stderr_tail[-1]}"
        worker.stop()
        return None, reason, message

    def _after_load(self, loaded: _Loaded) -> None:
        selection = loaded.selection
        self._memory.remember(self._device_id, _model_key(selection), loaded.step, loaded.settings)
        measured = loaded.info["rss_after"] - loaded.info["rss_before"]
        self._record_learned(loaded, measured)
        loaded.decode_cost = _decode_cost(selection, loaded.settings["kv_type"])
        self._emit(
            {
                "event": "model_loaded",
                "model_id": selection.model_id,
                "quant": selection.quant,
                "step": loaded.step,
                "load_ms": round(loaded.info["load_ms"], 3),
                "rss_growth_bytes": measured,
                "pid": loaded.worker.pid,
            }
        )

    def _record_learned(self, loaded: _Loaded, measured: int) -> None:
        if not loaded.selection.sha256:
            return  # a bare --model file: nothing the selector could look it up by
        try:
            from agent.catalog.learned import LearnedMemory, settings_key
        except ImportError:  # the catalog's learned corrections are optional for the runtime
            return
        settings = loaded.settings
        effective = msgspec.structs.replace(
            loaded.selection,
            n_batch=settings["n_batch"],
            n_ubatch=settings["n_ubatch"],
            n_gpu_layers=settings["n_gpu_layers"],
            flash_attn=settings["flash_attn"],
        )
        try:
            LearnedMemory(self._state_dir).record(
                self._device_id, loaded.selection.sha256, settings_key(effective), measured
            )
        except OSError as exc:
            log.warning("learned_memory_not_written", error=str(exc))

    def _learn_speed(self, loaded: _Loaded, final: dict[str, Any]) -> None:
        """Every measured generation teaches the selector this build's decode rate here."""
        if "error" in final or loaded.decode_cost is None or not loaded.selection.sha256:
            return  # a cancelled or failed generation carries no timings
        usage, timings = final["usage"], final["timings"]
        if usage["completion_tokens"] - 1 < MIN_DECODED_TOKENS:
            return
        # The context grows from the prompt to prompt + answer while decoding: its middle.
        context = usage["prompt_tokens"] + usage["completion_tokens"] / 2
        try:
            self._speed.record(
                self._device_id, self._build, loaded.selection.sha256,
                loaded.settings["n_gpu_layers"], tokens_per_s=timings["decode_tokens_per_s"],
                bytes_per_token=loaded.decode_cost.bytes_per_token(context),
            )
        except OSError as exc:
            log.warning("learned_speed_not_written", error=str(exc))

    # swapping ------------------------------------------------------------------------------

    def _swap_cold(self, selection: Selection) -> None:
        loaded = self._start(selection, None)
        with self._cond:
            self._loaded = loaded
            self._cond.notify_all()

    def _swap_parallel(self, old: _Loaded, selection: Selection) -> None:
        try:
            new = self._start(selection, None)
        except ModelLoadError as exc:
            self._emit({"event": "rollback", "to": old.selection.quant, "reason": exc.message})
            raise
        with self._cond:
            self._loaded = new
            retire_now = self._busy is not old
            self._cond.notify_all()
        if retire_now:
            old.worker.stop()
        # else the dispatcher stops it when its running request ends
        self._emit(
            {"event": "model_switch", "mode": "parallel", "from": old.selection.quant, "to": selection.quant, "model_id": selection.model_id}
        )

    def _swap_drained(self, old: _Loaded, selection: Selection) -> None:
        with self._cond:
            self._holds.add("swap")
            self._cond.wait_for(lambda: self._running is None)
            self._loaded = None
        old.worker.stop()
        try:
            try:
                new = self._start(selection, None)
            except ModelLoadError as exc:
                self._emit({"event": "rollback", "to": old.selection.quant, "reason": exc.message})
                restored = self._start(old.selection, None, old.step)
                with self._cond:
                    self._loaded = restored
                raise
            with self._cond:
                self._loaded = new
            self._emit(
                {"event": "model_switch", "mode": "drained", "from": old.selection.quant, "to": selection.quant, "model_id": selection.model_id}
            )
        finally:
            with self._cond:
                self._holds.discard("swap")
                self._cond.notify_all()

    # dispatching ---------------------------------------------------------------------------

    def _state(self) -> str:
        if self._closed:
            return "stopped"
        if "swap" in self._holds:
            return "swapping"
        if "drain" in self._holds:
            return "draining"
        if self._loaded is None:
            return "loading" if self._transitions else "no_model"
        return "busy" if self._running else "ready"

    def _dispatch_loop(self) -> None:
        while True:
            expired: list[_Job] = []
            job: _Job | None = None
            loaded: _Loaded | None = None
            died_idle: _Loaded | None = None
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self._loaded is not None and self._loaded.worker.exited.is_set() and not self._holds:
                        died_idle = self._loaded  # restart it now, not on the next request's back
                        break
                    now = time.monotonic()
                    for queued in list(self._queue):
                        if queued.cancel_reason or queued.deadline <= now:
                            self._queue.remove(queued)
                            expired.append(queued)
                    no_model = self._loaded is None and not self._transitions and not self._holds
                    if no_model and self._queue:
                        expired.extend(self._queue)
                        self._queue.clear()
                    if expired:
                        break
                    if self._queue and self._loaded is not None and not self._holds:
                        job, loaded = self._queue.popleft(), self._loaded
                        self._running, self._busy = job, loaded
                        break
                    wait = min((q.deadline - now for q in self._queue), default=IDLE_WATCH_S)
                    self._cond.wait(max(min(wait, IDLE_WATCH_S), POLL_S))
            if died_idle is not None:
                self._recover(died_idle, describe_exit(died_idle.worker.returncode) + " while idle")
                continue
            for gone in expired:
                self._expire(gone)
            if job is not None and loaded is not None:
                try:
                    self._run(job, loaded)
                finally:
                    with self._cond:
                        self._running = self._busy = None
                        retired = loaded is not self._loaded and not loaded.worker.exited.is_set()
                        self._cond.notify_all()
                    if retired:
                        loaded.worker.stop()

    def _expire(self, job: _Job) -> None:
        if job.cancel_reason:
            final = job.fail("cancelled", "cancelled before it started")
        elif self._loaded is None and job.deadline > time.monotonic():
            final = job.fail("no_model", "no model is loaded; the last one failed to restart")
        else:
            final = job.fail("timeout", "the request waited past its deadline in the queue")
        self._metrics.record(final)

    def _run(self, job: _Job, loaded: _Loaded) -> None:
        worker = loaded.worker
        request_id = job.request.id
        worker.stream_to(request_id, job.deliver)
        try:
            self._await_final(job, loaded)
        finally:
            worker.stream_to(None)

    def _await_final(self, job: _Job, loaded: _Loaded) -> None:
        worker = loaded.worker
        request_id = job.request.id
        worker.send(job.frame)
        while True:
            now = time.monotonic()
            if now >= job.deadline and job.cancel_reason is None:
                job.cancel_reason, job.cancel_sent = "timeout", now
                worker.send({"op": "cancel", "id": request_id, "reason": "timeout"})
            if job.cancel_reason == "timeout" and job.cancel_sent and now - job.cancel_sent > TIMEOUT_KILL_GRACE_S:
                worker.kill()
                self._metrics.record(job.fail("timeout", "the request passed its deadline; the worker was restarted"))
                self._recover(loaded, "killed after a request passed its deadline")
                return
            try:
                record = worker.records.get(timeout=POLL_S if job.cancel_reason else max(min(job.deadline - now, 1.0), POLL_S))
            except queue.Empty:
                continue
            # The running request's chunks go to job.deliver from the reader thread; a chunk
            # here is a stale one from before and is dropped.
            kind = record.pop("type", None)
            if kind == "final":
                # Named here, from the worker that ran it: during a swap the engine's current
                # selection may already be the next model.
                record["model"] = {"model_id": loaded.selection.model_id, "quant": loaded.selection.quant}
                job.deliver(record)
                self._metrics.record(record)
                self._learn_speed(loaded, record)
                return
            elif kind == "exit":
                reason = describe_exit(record["returncode"])
                self._metrics.record(job.fail("worker_crashed", f"{reason} during the request; the worker is restarting"))
                self._recover(loaded, reason)
                return

    def _recover(self, crashed: _Loaded, reason: str) -> None:
        """Restart after a crash with the remembered setting, further down the ladder if needed."""
        crashed.worker.exited.wait(5.0)
        self._restarts += 1
        self._emit(
            {"event": "worker_crashed", "reason": reason, "quant": crashed.selection.quant, "step": crashed.step, "pid": crashed.worker.pid}
        )
        with self._cond:
            if self._loaded is not crashed:
                return  # already swapped away from it
            self._loaded = None
            self._transitions += 1
        restarted: _Loaded | None = None
        try:
            restarted = self._start(crashed.selection, self._smaller, crashed.step)
        except ModelLoadError as exc:
            self._emit({"event": "restart_failed", "reason": exc.message, "quant": crashed.selection.quant})
        finally:
            with self._cond:
                closed = self._closed
                self._loaded = None if closed else restarted
                self._transitions -= 1
                self._cond.notify_all()
            if closed and restarted is not None:
                restarted.worker.stop()
        if restarted is None and not closed:
            # What killed it may have been passing (an OOM killer, an operator, a crash storm
            # during the restart's own canary): keep trying in the background, backing off,
            # so the device serves again without a person. Meanwhile requests get no_model.
            threading.Thread(target=self._retry_restart, args=(crashed,), name="engine-restart",
                             daemon=True).start()

    def _retry_restart(self, crashed: _Loaded) -> None:
        delay_s = RESTART_RETRY_FIRST_S
        attempt = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed, timeout=delay_s)
                if self._closed or self._loaded is not None or self._transitions:
                    return  # shut down, or someone loaded a model meanwhile
                self._transitions += 1
            attempt += 1
            restarted: _Loaded | None = None
            try:
                restarted = self._start(crashed.selection, self._smaller, crashed.step)
            except ModelLoadError as exc:
                self._emit({"event": "restart_failed", "reason": exc.message, "attempt": attempt,
                            "retry_in_s": min(delay_s * 2, RESTART_RETRY_MAX_S), "quant": crashed.selection.quant})
            finally:
                with self._cond:
                    closed = self._closed
                    if restarted is not None and not closed:
                        self._loaded = restarted
                    self._transitions -= 1
                    self._cond.notify_all()
                if closed and restarted is not None:
                    restarted.worker.stop()
            if restarted is not None:
                return
            delay_s = min(delay_s * 2, RESTART_RETRY_MAX_S)
