"""The worker process against cancels that arrive while it sweeps stale ones: the reader
thread inserts them while the main thread starts the next generation."""

from __future__ import annotations

import queue
import threading

from agent.runtime.process import WorkerExit, WorkerProcess
from agent.runtime.protocol import Cancel, Final, Generate, Load, Loaded, LoadFailed

GENERATIONS = 8


def _settings(model_path: str) -> dict:
    return {"model_path": str(model_path), "n_ctx": 256, "n_batch": 64, "n_ubatch": 64,
            "n_threads": 1, "n_gpu_layers": 0, "steps": []}


def _generate(request_id: str) -> Generate:
    return Generate(id=request_id, prompt="Hello", max_tokens=128, temperature=0.0, top_p=1.0,
                    top_k=40, min_p=0.05, repeat_penalty=1.0, stop=[], seed=1, stream=False)


def _next_record(worker: WorkerProcess, kinds: tuple[type, ...]):
    while True:
        record = worker.records.get(timeout=60)
        if isinstance(record, kinds):
            return record


def test_a_flood_of_cancels_during_generations_does_not_kill_the_worker(ladder_model):
    worker = WorkerProcess()
    stop_flood = threading.Event()
    try:
        worker.send(Load(settings=_settings(ladder_model("Q4_K_M")), canary_prompt="Hi"))
        assert isinstance(_next_record(worker, (Loaded, LoadFailed, WorkerExit)), Loaded)

        def flood() -> None:  # cancels for requests that never ran: each one is stale
            count = 0
            while not stop_flood.is_set() and worker.send(
                    Cancel(id=f"gone-{count}", reason="cancelled")):
                count += 1

        threading.Thread(target=flood, daemon=True).start()
        finals = []
        for index in range(GENERATIONS):
            worker.send(_generate(f"request-{index}"))
            record = _next_record(worker, (Final, WorkerExit))
            assert isinstance(record, Final), (record, list(worker.stderr_tail)[-5:])
            finals.append(record)
        assert all(final.error is None for final in finals)
    finally:
        stop_flood.set()
        worker.stop()
