"""Starting a worker for a Selection: canary, the fallback ladder, and what a load teaches.

The engine (agent.runtime.engine) calls ``WorkerLoader.start`` on whichever thread changes the
model (the caller of load/swap, or the engine's supervisor after a crash). A load walks the
ladder (agent.runtime.ladder) from the setting remembered for this model here, down to the
safest; the setting that passed is remembered (agent.runtime.settings_memory), the memory it
took and the decode rate later generations reach are learned for the selector
(agent.catalog.learned). No llama_cpp here: this runs in the daemon.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from agent.catalog.learned import MIN_DECODED_TOKENS, LearnedSpeed, llama_build_key
from agent.catalog.selection import Selection
from agent.config import RuntimeConfig
from agent.errors import EdgeAgentError, ModelLoadError
from agent.log import get_logger
from agent.runtime.ladder import CANARY_PROMPT, rungs
from agent.runtime.process import WORKER_ARGV, WorkerExit, WorkerProcess, describe_exit
from agent.runtime.protocol import Load, Loaded, LoadFailed
from agent.runtime.settings_memory import SettingsMemory

log = get_logger(__name__)

# A load that takes longer than this is treated as hung; big models on SD cards are slow.
LOAD_TIMEOUT_S = 600.0

EventCallback = Callable[[dict[str, Any]], None]


class LoadedWorker:
    """A running worker and what it was loaded with."""

    def __init__(self, worker: WorkerProcess, selection: Selection, step: str,
                 settings: dict[str, Any], info: Loaded) -> None:
        self.worker = worker
        self.selection = selection
        self.step = step
        self.settings = settings
        self.info = info
        self.decode_cost: Any = None  # agent.catalog.speed.DecodeCost, for learning the rate
        self.kill_reason: str | None = None  # why the engine killed it, when it did
        # Named in every final from this worker: during a swap the engine's current
        # selection may already be the next model.
        self.model = {"model_id": selection.model_id, "quant": selection.quant}


def model_key(selection: Selection) -> str:
    return selection.sha256 or f"path:{selection.model_path}"


def _decode_cost(selection: Selection, kv_type: str) -> Any:
    """What one decoded token of the loaded file reads (agent.catalog.speed.DecodeCost), or
    None when its header cannot be read: speed is then not learned for it."""
    from agent.catalog.gguf import read_gguf_header, read_gguf_split
    from agent.catalog.speed import decode_cost

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


class WorkerLoader:
    def __init__(self, runtime: RuntimeConfig, *, state_dir: Path, device_id: str,
                 emit: EventCallback, worker_argv: Sequence[str] = WORKER_ARGV,
                 on_exit: Callable[[WorkerProcess], None] | None = None) -> None:
        self._runtime = runtime
        self._state_dir = state_dir
        self._device_id = device_id
        self._emit = emit
        self._worker_argv = tuple(worker_argv)
        self._on_exit = on_exit
        self._memory = SettingsMemory(state_dir)
        self._speed = LearnedSpeed(state_dir)
        self._build = llama_build_key()

    def start(
        self,
        selection: Selection,
        smaller: Callable[[Selection], Selection | None] | None = None,
        start_step: str | None = None,
    ) -> LoadedWorker:
        """Walk the ladder from the remembered (or given) step; then ``smaller`` variants.

        ``smaller`` runs on this (the caller's) thread. Raises ModelLoadError."""
        attempts: list[str] = []
        current: Selection | None = selection
        while current is not None:
            if not current.model_path:
                raise ModelLoadError(f"{current.quant}: no local model file; fetch it first")
            remembered = self._memory.lookup(self._device_id, model_key(current))
            first = start_step or (remembered["step"] if remembered else "as_selected")
            ladder = rungs(current, self._runtime, first)
            for index, (step, settings) in enumerate(ladder):
                loaded, reason, message = self._try(current, step, settings)
                if loaded is not None:
                    self._after_load(loaded)
                    return loaded
                attempts.append(f"{current.quant}/{step}: {message}")
                following = ladder[index + 1][0] if index + 1 < len(ladder) else "smaller_variant"
                self._emit({
                    "event": "canary_fallback", "step": following, "failed_step": step,
                    "quant": current.quant, "reason": reason,
                    "message": f"{current.quant} failed with {step}: {message}; trying {following}",
                })
            start_step = None
            current = smaller(current) if smaller else None
        tried = attempts[-1] if attempts else "nothing tried"
        raise ModelLoadError(f"every fallback setting failed for {selection.model_id}: {tried}",
                             attempts=attempts)

    def _try(self, selection: Selection, step: str,
             settings: dict[str, Any]) -> tuple[LoadedWorker | None, str, str]:
        """One load + canary. Returns (loaded, "", "") or (None, reason, message)."""
        worker = WorkerProcess(self._worker_argv)
        worker.send(Load(settings=settings, canary_prompt=CANARY_PROMPT,
                         canary_tokens=self._runtime.canary_tokens))
        try:
            reply = worker.records.get(timeout=LOAD_TIMEOUT_S)
        except queue.Empty:
            reply = None
        canary_ok = self._runtime.canary_tokens == 0 or (
            isinstance(reply, Loaded) and reply.canary_tokens > 0)
        if isinstance(reply, Loaded) and canary_ok:
            # Only a worker that passed is watched: a failed rung's exit is no crash.
            worker.watch_exit(self._on_exit)
            return LoadedWorker(worker, selection, step, settings, reply), "", ""
        if isinstance(reply, Loaded):
            reason = message = "canary produced no tokens"
        elif isinstance(reply, LoadFailed):
            reason, message = "load failed", reply.message
        else:
            worker.exited.wait(2.0)
            reason = describe_exit(reply.returncode if isinstance(reply, WorkerExit) else None)
            message = reason
            if worker.stderr_tail:
                message = f"{reason}; last output: {worker.stderr_tail[-1]}"
        worker.stop()
        return None, reason, message

    def _after_load(self, loaded: LoadedWorker) -> None:
        selection = loaded.selection
        self._memory.remember(self._device_id, model_key(selection), loaded.step, loaded.settings)
        measured = loaded.info.rss_after - loaded.info.rss_before
        self._record_learned(loaded, measured)
        loaded.decode_cost = _decode_cost(selection, loaded.settings["kv_type"])
        self._emit({
            "event": "model_loaded", "model_id": selection.model_id, "quant": selection.quant,
            "step": loaded.step, "load_ms": round(loaded.info.load_ms, 3),
            "rss_growth_bytes": measured, "pid": loaded.worker.pid,
        })

    def _record_learned(self, loaded: LoadedWorker, measured: int) -> None:
        if not loaded.selection.sha256:
            return  # a bare --model file: nothing the selector could look it up by
        from agent.catalog.learned import LearnedMemory, settings_key

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

    def learn_speed(self, loaded: LoadedWorker, final: dict[str, Any]) -> None:
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

    def flush(self) -> None:
        try:
            self._speed.flush()
        except OSError as exc:
            log.warning("learned_speed_not_written", error=str(exc))
