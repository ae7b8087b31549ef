"""The engine's ``engine`` thread: runs the queue, one generation at a time, in arrival order.

It takes the next job from agent.runtime.model_state's queue, starts it on the worker that
serves (a Generate frame down the pipe; the worker's frame reader delivers its records),
enforces its deadline (a cancel frame, then a kill after a grace), expires queued requests
that were cancelled or waited past theirs, and teaches the loader the decode rate. It never
restarts a worker: a crash reaches agent.runtime.restarts. No llama_cpp here.
"""

from __future__ import annotations

import threading
import time

from agent.runtime.job import Job
from agent.runtime.loader import LoadedWorker, WorkerLoader
from agent.runtime.model_state import EngineState, ModelState
from agent.runtime.protocol import Cancel

# After a timeout's cancel frame the worker must stop within this, or it is killed: a
# long prefill cannot be interrupted between tokens.
TIMEOUT_KILL_GRACE_S = 10.0
POLL_S = 0.05


class JobRunner:
    def __init__(self, state: EngineState, loader: WorkerLoader) -> None:
        self._state = state
        self._loader = loader
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        """Wait for the thread, which ends once the engine is stopped."""
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            with self._state.cond:
                picked = self._next_job()
            if picked is None:
                return
            job, loaded, expired = picked
            for gone in expired:
                self._expire(gone)
            if job is not None and loaded is not None:
                self._run(job, loaded)

    def _next_job(self) -> tuple[Job | None, LoadedWorker | None, list[Job]] | None:
        """Wait for work; called with the lock held. None once the engine is stopped."""
        state = self._state
        while True:
            if state.model_state is ModelState.STOPPED:
                return None
            now = time.monotonic()
            expired = [job for job in state.queue if job.cancel_reason or job.deadline <= now]
            if state.model_state is ModelState.NO_MODEL:
                expired = list(state.queue)
            for job in expired:
                state.queue.remove(job)
            loaded = state.loaded
            serving = loaded is not None and not loaded.worker.exited.is_set()
            if state.queue and serving and not state.draining:
                job = state.queue.popleft()
                state.running, state.busy = job, loaded
                return job, loaded, expired
            if expired:
                return None, None, expired
            wait = min((job.deadline - now for job in state.queue), default=None)
            state.cond.wait(None if wait is None else max(wait, POLL_S))

    def _expire(self, job: Job) -> None:
        if job.cancel_reason:
            job.fail("cancelled", "cancelled before it started")
        elif job.deadline > time.monotonic():
            job.fail("no_model", "no model is loaded; the last one failed to restart")
        else:
            job.fail("timeout", "the request waited past its deadline in the queue")

    def _run(self, job: Job, loaded: LoadedWorker) -> None:
        worker = loaded.worker
        job.model = loaded.model
        streaming = worker.stream_to(job.request.id, job)
        if streaming and worker.send(job.frame):
            self._await_final(job, loaded)
        elif streaming:
            job.done.wait()  # the worker is gone: its frame reader fails the job at the exit
        worker.stream_to(None)
        state = self._state
        with state.cond:
            state.running = state.busy = None
            if not streaming:
                state.queue.appendleft(job)  # it died just before: run it on the restarted one
            retired = loaded is not state.loaded and not worker.exited.is_set()
            state.cond.notify_all()
        if retired:
            loaded.worker.stop()
        if job.final is not None:
            self._loader.learn_speed(loaded, job.final)

    def _await_final(self, job: Job, loaded: LoadedWorker) -> None:
        """Wait for the job's final (the frame reader delivers it); enforce the deadline."""
        worker = loaded.worker
        while not job.done.wait(max(min(job.deadline - time.monotonic(), 1.0), POLL_S)):
            now = time.monotonic()
            with self._state.cond:
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
