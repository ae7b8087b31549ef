"""The engine against the real SmolLM2 ladder: same text as llama-cpp-python, queue, errors."""

from __future__ import annotations

import threading

import pytest

from agent.errors import BusyError, NoModelError, RequestError
from agent.runtime.request import GenerateRequest, validate_request

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
# Raw text the model keeps continuing at temperature 0: a generation that runs long.
LONG_STORY = "Count from 1 to 1000: 1, 2, 3, 4, 5, 6,"


def request(request_id: str, **fields) -> GenerateRequest:
    if "prompt" not in fields:
        fields.setdefault("messages", QUESTION)
    return GenerateRequest(id=request_id, **fields)


def test_engine_text_equals_llama_cpp_in_process(make_engine, selection_for):
    import llama_cpp

    selection = selection_for("Q8_0")
    engine = make_engine()
    engine.load(selection)
    records = list(
        engine.generate(request("same", messages=QUESTION, max_tokens=16, temperature=0.0, seed=42))
    )
    final = records[-1]
    assert final["done"] and "error" not in final, final
    chunks = [r for r in records if not r.get("done")]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["delta"] for c in chunks) == final["text"]

    llama = llama_cpp.Llama(
        model_path=selection.model_path,
        n_ctx=selection.n_ctx,
        n_batch=selection.n_batch,
        n_ubatch=selection.n_ubatch,
        n_threads=selection.n_threads,
        n_threads_batch=selection.n_threads,
        verbose=False,
    )
    expected = llama.create_chat_completion(
        messages=QUESTION, max_tokens=16, temperature=0.0, seed=42,
        top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.1,
    )
    raw_expected = llama.create_completion(
        "The three primary colours are", max_tokens=16, temperature=0.0, seed=42,
        top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.1,
    )
    llama.close()
    raw = list(engine.generate(request("raw", prompt="The three primary colours are", max_tokens=16, temperature=0.0, seed=42)))[-1]
    assert raw["text"] == raw_expected["choices"][0]["text"]
    assert raw["usage"] == {
        "prompt_tokens": raw_expected["usage"]["prompt_tokens"],
        "completion_tokens": raw_expected["usage"]["completion_tokens"],
    }
    assert final["text"] == expected["choices"][0]["message"]["content"]
    assert final["text"].strip()
    assert final["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    assert final["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]
    timings = final["timings"]
    assert timings["ttft_ms"] > 0 and timings["total_ms"] >= timings["ttft_ms"]
    assert timings["prefill_tokens_per_s"] > 0 and timings["decode_tokens_per_s"] > 0


def test_raw_prompt_streams_and_metrics_roll_up(make_engine, selection_for):
    engine = make_engine()
    engine.load(selection_for())
    records = list(engine.generate(request("raw", prompt="Once upon a time", max_tokens=8, temperature=0.0)))
    final = records[-1]
    assert final["finish_reason"] in ("length", "stop")
    assert final["usage"]["completion_tokens"] <= 8
    stats = engine.stats()
    assert stats["state"] == "ready"
    assert stats["since_start"]["requests_ok"] == 1
    assert stats["last_minute"]["completion_tokens"] == final["usage"]["completion_tokens"]
    assert stats["worker"]["rss_bytes"] > 50 * 1024 * 1024  # the model lives in the worker
    assert stats["model"]["quant"] == "Q4_K_M"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"temperature": 5.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "messages": QUESTION}, "messages"),
        ({"messages": None}, "messages"),
        ({"min_p": 1.5}, "min_p"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_request_names_the_field_before_any_work(fields, named):
    # Every caller validates once at its boundary (MQTT's decode_prompt, the CLI) before the
    # engine sees the request: no model, no worker, nothing is needed to refuse it.
    with pytest.raises(RequestError) as caught:
        validate_request(GenerateRequest(id="bad", **{"messages": QUESTION, **fields}))
    assert caught.value.code == "bad_request"
    assert caught.value.message.startswith(f"{named}:")


def test_no_model_is_an_error(make_engine):
    with pytest.raises(NoModelError) as caught:
        make_engine().submit(request("x"), lambda r: None)
    assert caught.value.code == "no_model"


def test_too_long_prompt_is_refused_with_counts(make_engine, selection_for):
    engine = make_engine()
    engine.load(selection_for(n_ctx=256))
    records = list(engine.generate(request("long", prompt="lighthouse keeper " * 400)))
    assert len(records) == 1  # the final alone: no token was generated
    error = records[0]["error"]
    assert error["code"] == "too_long"
    assert error["message"].endswith("tokens, context is 256")
    assert error["details"]["prompt_tokens"] > 256 and error["details"]["n_ctx"] == 256
    assert engine.stats()["since_start"]["requests_ok"] == 0  # nothing ran


def test_busy_when_the_queue_is_full(make_engine, selection_for):
    engine = make_engine(queue_size=1)
    engine.load(selection_for())
    first: list[dict] = []
    started = threading.Event()
    engine.submit(request("running", prompt=LONG_STORY, max_tokens=400, temperature=0.0), lambda r: (first.append(r), started.set()))
    assert started.wait(30)
    engine.submit(request("queued", prompt=LONG_STORY, max_tokens=4), lambda r: None)
    with pytest.raises(BusyError) as caught:
        engine.submit(request("refused", prompt=LONG_STORY, max_tokens=4), lambda r: None)
    assert caught.value.code == "busy"
    assert caught.value.details["queue_depth"] == 1
    assert engine.queue_depth == 1
    assert engine.cancel("running") and engine.cancel("queued")


def test_cancel_stops_within_two_tokens(make_engine, selection_for):
    engine = make_engine()
    engine.load(selection_for())
    records: list[dict] = []
    done = threading.Event()
    first_chunk = threading.Event()
    after_cancel: list[dict] = []
    cancelled = threading.Event()

    def on_record(record: dict) -> None:
        records.append(record)
        if cancelled.is_set():
            after_cancel.append(record)
        first_chunk.set()
        if record.get("done"):
            done.set()

    engine.submit(request("stop-me", prompt=LONG_STORY, max_tokens=400, temperature=0.0), on_record)
    assert first_chunk.wait(30)
    cancelled.set()
    assert engine.cancel("stop-me")
    assert done.wait(30)
    assert records[-1]["error"]["code"] == "cancelled"
    assert len([r for r in after_cancel if not r.get("done")]) <= 2
    assert not engine.cancel("stop-me")  # nothing left to cancel
    # and the worker serves the next one
    assert "error" not in list(engine.generate(request("next", prompt="Hi", max_tokens=2)))[-1]


def test_deadline_gives_timeout_and_the_engine_keeps_serving(make_engine, selection_for):
    engine = make_engine()
    engine.load(selection_for())
    records = list(engine.generate(request("slow", prompt=LONG_STORY, max_tokens=400, temperature=0.0, timeout_s=0.5)))
    assert records[-1]["error"]["code"] == "timeout"
    follow = list(engine.generate(request("fast", prompt="Hi", max_tokens=2)))
    assert "error" not in follow[-1]
    assert engine.stats()["since_start"]["errors"] == {"timeout": 1}


def test_requests_run_one_at_a_time_in_arrival_order(make_engine, selection_for):
    engine = make_engine()
    engine.load(selection_for())
    order: list[str] = []
    done = threading.Semaphore(0)

    def on_record(record: dict) -> None:
        if record.get("done"):
            order.append(record["id"])
            done.release()

    for name in ("a", "b", "c"):
        engine.submit(request(name, prompt=f"Say {name}", max_tokens=3), on_record)
    for _ in range(3):
        assert done.acquire(timeout=60)
    assert order == ["a", "b", "c"]
