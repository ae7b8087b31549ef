"""Changing the model that serves, on the caller's thread: a first load, or a swap.

A first load (nothing served) walks the ladder (agent.runtime.loader), then the caller's
``smaller`` variants (planning and fetching one belongs to the caller). A swap keeps every
request: in parallel, when the selector's cgroup-aware memory budget holds the new model
beside the old, the old worker serves while the new one loads and retires once its running
request ends; otherwise drained: the running request ends on the old worker, which stops
before the new one loads. A swap that fails rolls back to the old model. No llama_cpp here.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.catalog.selection import Selection
from agent.errors import ModelLoadError
from agent.runtime.loader import EventCallback, LoadedWorker, WorkerLoader
from agent.runtime.model_state import EngineState, ModelState

# A parallel swap needs the new model's estimate plus this share of it free.
SWAP_HEADROOM = 1.2


def default_memory_budget() -> int:
    """Bytes a new worker may take now: the selector's cgroup-aware budget (agent.hardware)."""
    from agent.hardware.memory import probe_memory

    return probe_memory().budget_bytes


class ModelSwitch:
    def __init__(self, state: EngineState, loader: WorkerLoader, emit: EventCallback,
                 memory_budget: Callable[[], int]) -> None:
        self._state = state
        self._loader = loader
        self._emit = emit
        self._memory_budget = memory_budget

    def load(self, selection: Selection,
             smaller: Callable[[Selection], Selection | None] | None) -> None:
        """Start a worker for ``selection``; swap to it when a model is loaded already."""
        with self._state.cond:
            if self._state.model_state is ModelState.READY:
                cold = False
            else:
                self._state.move(ModelState.LOADING, "a model load or swap is already in progress")
                cold = True
        if not cold:
            self.swap(selection)
            return
        loaded = None
        try:
            loaded = self._loader.start(selection, smaller)
        finally:
            self._state.settle(loaded)

    def swap(self, selection: Selection) -> None:
        """Switch to ``selection`` without dropping requests; on failure keep/restore the old."""
        state = self._state
        with state.cond:
            old = state.loaded
            swapping = state.model_state is ModelState.READY
            state.move(ModelState.SWAPPING if swapping else ModelState.LOADING,
                       "a model load or swap is already in progress")
        if old is None:
            loaded = None
            try:
                loaded = self._loader.start(selection)
            finally:
                state.settle(loaded)
        elif selection.estimate.ram_bytes * SWAP_HEADROOM <= self._memory_budget():
            self._swap_parallel(old, selection)
        else:
            self._swap_drained(old, selection)

    def _swap_parallel(self, old: LoadedWorker, selection: Selection) -> None:
        state = self._state
        try:
            new = self._loader.start(selection)
        except ModelLoadError as exc:
            self._emit({"event": "rollback", "to": old.selection.quant, "reason": exc.message})
            state.settle(None)
            raise
        with state.cond:
            retire_now = state.busy is not old
            state.loaded = new
        state.settle(new)
        if retire_now:
            old.worker.stop()
        # else the runner stops it when its running request ends
        self._emit({"event": "model_switch", "mode": "parallel", "from": old.selection.quant,
                    "to": selection.quant, "model_id": selection.model_id})

    def _swap_drained(self, old: LoadedWorker, selection: Selection) -> None:
        state = self._state
        with state.cond:
            state.loaded = None  # nothing new starts; the running request ends on the old one
            state.cond.wait_for(lambda: state.running is None)
        old.worker.stop()
        try:
            new = self._loader.start(selection)
        except ModelLoadError as exc:
            self._emit({"event": "rollback", "to": old.selection.quant, "reason": exc.message})
            restored = None
            try:
                restored = self._loader.start(old.selection, None, old.step)
            finally:
                state.settle(restored)
            raise
        state.settle(new)
        self._emit({"event": "model_switch", "mode": "drained", "from": old.selection.quant,
                    "to": selection.quant, "model_id": selection.model_id})
