"""One request as the engine holds it, queued or running, and its frame for the worker.

A Job is the FrameSink (agent.runtime.process) of the worker that runs it: that worker's frame
reader hands it the request's chunks and final, and the Job hands each on to the caller's
``on_record``, on that same thread, in order; a Job that never ran gets its one final on the
thread that expired or refused it. No llama_cpp here: this runs in the daemon.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import msgspec

from agent.log import get_logger
from agent.runtime.metrics import Metrics
from agent.runtime.process import describe_exit
from agent.runtime.protocol import Chunk, Final, Generate
from agent.runtime.request import GenerateRequest

log = get_logger(__name__)

RecordCallback = Callable[[dict[str, Any]], None]


class Job:
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
        self.killed = False  # by the engine thread (agent.runtime.runner), after a timeout's grace
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


def generate_frame(request: GenerateRequest, default_max_tokens: int) -> Generate:
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
