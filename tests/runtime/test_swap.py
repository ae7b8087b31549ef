"""Model swap: requests that arrive before, during and after a swap are all answered."""

from __future__ import annotations

import threading

import pytest

from agent.catalog.selection import MemoryEstimate
from agent.errors import ModelLoadError
from agent.runtime.request import GenerateRequest


def _submit_many(engine, names: list[str], finals: dict, all_done: threading.Semaphore) -> None:
    def on_record(record: dict) -> None:
        if record.get("done"):
            finals[record["id"]] = record
            all_done.release()

    for name in names:
        engine.submit(GenerateRequest(id=name, prompt=f"The word {name} means", max_tokens=6), on_record)


@pytest.mark.parametrize("mode", ["parallel", "drained"])
def test_swap_answers_every_request(make_engine, selection_for, mode):
    events: list[dict] = []
    engine = make_engine(events, queue_size=16)
    engine.load(selection_for("Q4_K_M"))
    # A drained swap is what a device does when both models do not fit in memory at once.
    need = 300 * 1024 * 1024 if mode == "parallel" else 1 << 60
    target = selection_for("Q8_0", estimate=MemoryEstimate(ram_bytes=need))
    finals: dict[str, dict] = {}
    all_done = threading.Semaphore(0)

    _submit_many(engine, ["before1", "before2", "before3"], finals, all_done)
    swapper = threading.Thread(target=engine.swap, args=(target,))
    swapper.start()
    _submit_many(engine, ["during1", "during2"], finals, all_done)
    swapper.join(60)
    assert not swapper.is_alive()
    _submit_many(engine, ["after"], finals, all_done)
    for _ in range(6):
        assert all_done.acquire(timeout=60)

    assert sorted(finals) == sorted(["before1", "before2", "before3", "during1", "during2", "after"])
    assert all("error" not in f for f in finals.values()), finals
    assert engine.selection.quant == "Q8_0"
    switch = [e for e in events if e["event"] == "model_switch"]
    assert switch == [
        {"event": "model_switch", "mode": mode, "from": "Q4_K_M", "to": "Q8_0", "model_id": target.model_id}
    ]
    assert engine.stats()["model"]["sha256"] == target.sha256


@pytest.mark.parametrize("mode", ["parallel", "drained"])
def test_failed_swap_goes_back_to_the_previous_model(make_engine, selection_for, tmp_path, mode):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(1024))
    events: list[dict] = []
    engine = make_engine(events)
    engine.load(selection_for("Q4_K_M"))
    need = 1 << 20 if mode == "parallel" else 1 << 60
    target = selection_for(
        "Q8_0", model_path=str(broken), sha256="f" * 64, n_threads=1, n_batch=64, n_ubatch=64,
        estimate=MemoryEstimate(ram_bytes=need),
    )
    with pytest.raises(ModelLoadError):
        engine.swap(target)
    assert engine.selection.quant == "Q4_K_M"
    assert [e for e in events if e["event"] == "rollback"][0]["to"] == "Q4_K_M"
    final = list(engine.generate(GenerateRequest(id="still", prompt="Hello", max_tokens=3)))[-1]
    assert "error" not in final
