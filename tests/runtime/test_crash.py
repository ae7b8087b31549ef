"""Native crashes: the ladder recovers from an AMX-style SIGSEGV at the first decode, and a
worker killed mid-request costs that request only (``worker_crashed``)."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from agent.errors import ModelLoadError
from agent.runtime.request import GenerateRequest
from agent.runtime.settings_memory import FILE_NAME
from tests.support import crashing_worker

COUNTING = "Count from 1 to 1000: 1, 2, 3, 4, 5, 6,"


def test_amx_style_crash_falls_back_remembers_and_next_start_goes_straight(
    make_engine, selection_for, tmp_path
):
    events: list[dict] = []
    engine = make_engine(events, worker_argv=crashing_worker.argv(crash_unless="no_extra_bufts"))
    selection = selection_for()
    engine.load(selection)

    fallbacks = [e for e in events if e["event"] == "canary_fallback"]
    assert len(fallbacks) == 1
    assert fallbacks[0]["failed_step"] == "as_selected"
    assert fallbacks[0]["step"] == "no_extra_bufts"
    assert fallbacks[0]["reason"] == "worker killed by SIGSEGV"
    worker = engine.stats()["worker"]
    assert worker["fallback_step"] == "no_extra_bufts"
    assert worker["settings"]["use_extra_bufts"] is False
    assert worker["settings"]["n_threads"] == selection.n_threads  # nothing else given up
    final = list(engine.generate(GenerateRequest(id="after", prompt="Hello", max_tokens=3)))[-1]
    assert "error" not in final

    remembered = json.loads((tmp_path / "state" / FILE_NAME).read_text())["entries"]
    assert remembered[f"test-device/{selection.sha256}"]["step"] == "no_extra_bufts"

    engine.close()
    second_events: list[dict] = []
    second = make_engine(second_events,
                         worker_argv=crashing_worker.argv(crash_unless="no_extra_bufts"))
    second.load(selection)
    assert [e["event"] for e in second_events] == ["model_loaded"]
    assert second.stats()["worker"]["fallback_step"] == "no_extra_bufts"


def test_every_setting_failing_moves_to_the_smaller_variant(make_engine, selection_for, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(4096))  # a truncated download that passed no check
    events: list[dict] = []
    engine = make_engine(events)
    big = selection_for("Q8_0", model_path=str(broken), sha256="0" * 64, n_threads=2)
    engine.load(big, smaller=lambda s: selection_for("Q4_K_M") if s.quant == "Q8_0" else None)

    steps = [(e["failed_step"], e["step"]) for e in events if e["event"] == "canary_fallback"]
    assert steps == [
        ("as_selected", "no_extra_bufts"),
        ("no_extra_bufts", "fewer_threads"),
        ("fewer_threads", "smaller_batch"),  # no GPU layers here: that step changes nothing
        ("smaller_batch", "smaller_variant"),
    ]
    assert all(e["reason"] == "load failed" for e in events if e["event"] == "canary_fallback")
    assert engine.selection.quant == "Q4_K_M"


def test_nothing_loads_raises_load_failed(make_engine, selection_for, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError) as caught:
        make_engine().load(selection_for(model_path=str(broken), n_threads=1, n_batch=64, n_ubatch=64))
    assert caught.value.code == "load_failed"
    assert "failed" in caught.value.message


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_worker_killed_mid_request_gives_worker_crashed_then_serves(make_engine, selection_for, sig):
    events: list[dict] = []
    engine = make_engine(events)
    engine.load(selection_for())
    first_pid = engine.stats()["worker"]["pid"]
    records: list[dict] = []
    streaming = threading.Event()
    done = threading.Event()

    def on_record(record: dict) -> None:
        records.append(record)
        streaming.set()
        if record.get("done"):
            done.set()

    engine.submit(GenerateRequest(id="victim", prompt=COUNTING, max_tokens=400, temperature=0.0), on_record)
    assert streaming.wait(30)
    os.kill(first_pid, sig)
    assert done.wait(30)
    final = records[-1]
    assert final["error"]["code"] == "worker_crashed"
    assert signal.Signals(sig).name in final["error"]["message"]

    after = list(engine.generate(GenerateRequest(id="next", prompt="Hello", max_tokens=3)))[-1]
    assert "error" not in after
    stats = engine.stats()
    assert stats["worker"]["pid"] != first_pid
    assert stats["worker_restarts"] == 1
    crashed = [e for e in events if e["event"] == "worker_crashed"]
    assert crashed and crashed[0]["reason"] == f"worker killed by {signal.Signals(sig).name}"
