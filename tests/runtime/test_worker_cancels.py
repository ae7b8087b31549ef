"""The worker process against cancels that arrive while it sweeps stale ones: the reader
thread inserts them while the main thread starts the next generation."""

from __future__ import annotations

import queue
import threading

from agent.runtime.process import WorkerProcess

GENERATIONS = 8


def _settings(model_path: str) -> dict:
    return {"model_path": str(model_path), "n_ctx": 256, "n_batch": 64, "n_ubatch": 64,
            "n_threads": 1, "n_gpu_layers": 0, "steps": []}


def _generate(request_id: str) -> dict:
    return {"op": "generate", "id": request_id, "prompt": "Hello", "max_tokens": 128,
            "temperature": 0.0, "top_p": 1.0, "top_k": 40, "min_p": 0.05,
            "repeat_penalty": 1.0, "stop": [], "seed": 1, "stream": False}


def _next_record(worker: WorkerProcess, kinds: set[str]) -> dict:
    while True:
        record = worker.records.get(timeout=60)
        if record.get("type") in kinds:
            return record


def test_a_flood_of_cancels_during_generations_does_not_kill_the_worker(ladder_model):
    worker = WorkerProcess()
    stop_flood = threading.Event()
    try:
        worker.send({"op": "load", "settings": _settings(ladder_model("Q4_K_M")),
                     "canary": {"prompt": "Hi", "tokens": 0}})
        assert _next_record(worker, {"loaded", "load_failed", "exit"})["type"] == "loaded"

        def flood() -> None:  # cancels for requests that never ran: each one is stale
            count = 0
            while not stop_flood.is_set() and worker.send(
                    {"op": "cancel", "id": f"gone-{count}", "reason": "cancelled"}):
                count += 1

        threading.Thread(target=flood, daemon=True).start()
        finals = []
        for index in range(GENERATIONS):
            worker.send(_generate(f"request-{index}"))
            record = _next_record(worker, {"final", "exit"})
            assert record["type"] == "final", (record, list(worker.stderr_tail)[-5:])
            finals.append(record)
        assert all("error" not in final for final in finals)
    finally:
        stop_flood.set()
        worker.stop()
