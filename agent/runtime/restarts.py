"""The engine's ``engine-supervisor`` thread: the one owner of crash restarts.

A watched worker's exit (during a request or idle) reaches it as a message from that worker's
frame reader, which never handles the exit itself. The supervisor restarts the same variant
from the setting it ran with, down the fallback ladder if needed; when that fails it says so
in a ``restart_failed`` event (``smaller_wanted``: the daemon's model owner may load a smaller
variant) and retries with a backoff, so the device serves again without a person. A worker
retired by a swap, or a failed rung of a load, is no crash. No llama_cpp here.
"""

from __future__ import annotations

import queue
import threading

from agent.errors import ModelLoadError
from agent.runtime.loader import EventCallback, LoadedWorker, WorkerLoader
from agent.runtime.model_state import EngineState, ModelState
from agent.runtime.process import WorkerProcess, describe_exit

# After a failed restart the supervisor tries again, doubling the wait up to the maximum:
# quick after a passing fault, gentle on a model that truly cannot load.
RESTART_RETRY_FIRST_S = 1.0
RESTART_RETRY_MAX_S = 60.0


class RestartSupervisor:
    def __init__(self, state: EngineState, loader: WorkerLoader, emit: EventCallback) -> None:
        self._state = state
        self._loader = loader
        self._emit = emit
        self._exits: queue.Queue[WorkerProcess | None] = queue.Queue()  # None: stop
        self._thread = threading.Thread(target=self._supervise, name="engine-supervisor",
                                        daemon=True)
        self.restarts = 0  # crashes seen, for stats()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (after a restart under way); join() waits for it."""
        self._exits.put(None)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def worker_exited(self, worker: WorkerProcess) -> None:
        """Called by a watched worker's frame reader: queue the exit for this thread."""
        self._exits.put(worker)
        with self._state.cond:
            self._state.cond.notify_all()  # the runner must not start a job on it

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
        state = self._state
        with state.cond:
            loaded = state.loaded
            if loaded is None or loaded.worker is not worker:
                return None
            state.loaded = None
            if state.model_state is ModelState.READY:
                state.move(ModelState.RESTARTING, "")
            else:
                return None  # a swap is under way: it settles what serves next
        reason = loaded.kill_reason or describe_exit(worker.returncode) + (
            "" if worker.exited_during_request else " while idle")
        self.restarts += 1
        self._emit({"event": "worker_crashed", "reason": reason, "quant": loaded.selection.quant,
                    "step": loaded.step, "pid": worker.pid})
        return loaded

    def _begin_retry(self) -> bool:
        with self._state.cond:
            if self._state.model_state is not ModelState.NO_MODEL:
                return False
            self._state.move(ModelState.RESTARTING, "")
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
            self._state.settle(restarted)
        return restarted is not None
