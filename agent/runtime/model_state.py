"""The engine's shared state: the model's state machine, the queue, and what serves.

``ModelState`` and the ``TRANSITIONS`` table are the model's lifecycle, changed only through
``EngineState.move``. ``draining`` is an operator's hold beside it (start nothing new), not a
model state. One Condition guards every field here; the engine's parts (agent.runtime.engine's
public API, the runner's ``engine`` thread, the restart supervisor, the model switch) each
take it for a few field reads and writes and never wait on a worker while holding it.
"""

from __future__ import annotations

import enum
import threading
from collections import deque

from agent.errors import BusyError, ModelLoadError, NoModelError, RequestError
from agent.log import get_logger
from agent.runtime.job import Job
from agent.runtime.loader import LoadedWorker
from agent.runtime.request import GenerateRequest

log = get_logger(__name__)


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


class EngineState:
    def __init__(self, queue_size: int) -> None:
        self.cond = threading.Condition()
        self.model_state = ModelState.NO_MODEL
        self.queue: deque[Job] = deque()
        self.running: Job | None = None
        self.busy: LoadedWorker | None = None  # the worker the running job is on
        self.loaded: LoadedWorker | None = None  # the worker new jobs start on
        self.draining = False
        self._queue_size = queue_size

    def move(self, to: ModelState, refusal: str) -> None:
        """The one place the model state changes; called with the lock held. A move the table
        does not allow raises ModelLoadError(refusal), or is a bug when there is no refusal."""
        if to not in TRANSITIONS[self.model_state]:
            if refusal:
                raise ModelLoadError(f"{refusal} ({self.model_state.value}); try again")
            raise AssertionError(f"engine state {self.model_state.value} -> {to.value}")
        log.debug("engine_state", state=to.value, was=self.model_state.value)
        self.model_state = to
        self.cond.notify_all()

    def settle(self, loaded: LoadedWorker | None) -> None:
        """End a load/swap/restart: serve ``loaded``, or nothing; a closed engine stops it."""
        with self.cond:
            if self.model_state is ModelState.STOPPED:
                stray = loaded
            else:
                stray = None
                self.loaded = loaded or self.loaded
                self.move(ModelState.READY if self.loaded else ModelState.NO_MODEL, "")
        if stray is not None:
            stray.worker.stop()

    def status(self) -> str:
        """What stats() and the daemon's status call the state now; called with the lock held."""
        if self.model_state is ModelState.STOPPED:
            return "stopped"
        if self.model_state is ModelState.SWAPPING and self.loaded is None:
            return "swapping"  # a drained swap: nothing serves meanwhile
        if self.draining:
            return "draining"
        if self.loaded is None:
            return "no_model" if self.model_state is ModelState.NO_MODEL else "loading"
        return "busy" if self.running_now() else "ready"

    def running_now(self) -> Job | None:
        """The running job until its final is out (the runner clears ``running`` after)."""
        job = self.running
        return job if job is not None and not job.done.is_set() else None

    def admit(self, request: GenerateRequest) -> None:
        """Raise if the request cannot be queued now; called with the lock held."""
        if self.model_state is ModelState.STOPPED:
            raise NoModelError("the engine is shut down")
        if self.model_state not in _QUEUEING:
            raise NoModelError("no model is loaded; select and fetch one first")
        running = self.running_now()
        if (running and running.request.id == request.id) or any(
            job.request.id == request.id for job in self.queue
        ):
            raise RequestError(f"id: request {request.id} is already queued or running", field="id")
        depth = len(self.queue)
        if depth >= self._queue_size:
            raise BusyError(
                f"the queue is full ({depth} requests waiting); retry later", queue_depth=depth
            )
