"""A restart that fails (the model file vanished for a while, say an SD card glitch) is
retried in the background until the device serves again, without a person."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from agent.errors import EdgeAgentError
from agent.runtime.request import GenerateRequest


def ask(engine, request_id: str) -> dict:
    """The final record, or the error submit() raised at once (as the daemon replies it)."""
    try:
        request = GenerateRequest(id=request_id, prompt="Hello", max_tokens=4, temperature=0.0)
        return list(engine.generate(request))[-1]
    except EdgeAgentError as exc:
        return {"error": exc.to_dict()}


def test_failed_restart_is_retried_until_the_model_is_back(make_engine, selection_for, tmp_path: Path) -> None:
    source = selection_for("Q2_K")
    model = tmp_path / source.file
    shutil.copy(source.model_path, model)
    events: list[dict] = []
    engine = make_engine(events)
    engine.load(selection_for("Q2_K", model_path=str(model)))
    assert "error" not in ask(engine, "before")

    hidden = model.with_suffix(".away")
    model.rename(hidden)  # the restart cannot find its file
    os.kill(engine.stats()["worker"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not any(e["event"] == "restart_failed" for e in events) and time.monotonic() < deadline:
        ask(engine, f"meanwhile-{time.monotonic_ns()}")  # worker_crashed, then no_model
        time.sleep(0.2)
    assert any(e["event"] == "restart_failed" for e in events), events
    assert ask(engine, "meanwhile")["error"]["code"] == "no_model"

    hidden.rename(model)
    deadline = time.monotonic() + 60
    while engine.selection is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.selection is not None, [e["event"] for e in events]
    assert "error" not in ask(engine, "after")


def test_worker_that_dies_while_idle_is_restarted_before_the_next_request(make_engine, selection_for) -> None:
    events: list[dict] = []
    engine = make_engine(events)
    engine.load(selection_for("Q2_K"))
    first_pid = engine.stats()["worker"]["pid"]
    os.kill(first_pid, signal.SIGKILL)  # an OOM killer's doing, between requests
    deadline = time.monotonic() + 30
    while (engine.stats()["worker"] or {}).get("pid") in (None, first_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.stats()["worker"]["pid"] != first_pid
    crash = next(e for e in events if e["event"] == "worker_crashed")
    assert "SIGKILL" in crash["reason"] and "idle" in crash["reason"]
    assert "error" not in ask(engine, "after-idle-death")  # nobody paid for the crash
