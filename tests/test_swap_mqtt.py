"""Zero-loss swap through MQTT: prompts sent while a `pin` swaps the model are each answered
exactly once, and every answer names the model that produced it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.support.daemon import BASE, RunningDaemon, wait_ready
from tests.support.observer import Observers

OLD, NEW = "Q4_K_M", "Q2_K"  # RunningDaemon pins OLD
IN_FLIGHT = 4  # prompts kept outstanding the whole time, so some always meet the swap
REPLIES = f"{BASE}/reply/+"
RESULTS = f"{BASE}/cmd/result"


@pytest.mark.slow
def test_prompts_during_a_swap_are_answered_once_each_by_a_named_model(
        tmp_path: Path, broker, ladder_dir, ladder_manifest):
    daemon = RunningDaemon(tmp_path / "daemon", broker, ladder_dir).start()
    observers = Observers(broker)
    try:
        wait_ready(daemon)
        observer = observers.connect(REPLIES, RESULTS)
        sent: list[str] = []

        def send() -> None:
            request_id = f"swap-{len(sent)}"
            sent.append(request_id)
            observer.publish(f"{BASE}/prompt", json.dumps({
                "id": request_id, "prompt": "The sky is", "max_tokens": 8, "temperature": 0,
                "seed": 1, "stream": False}).encode())

        def finals() -> list[dict]:
            """Final replies in arrival order."""
            out = []
            for message in list(observer.messages):
                if message.topic.startswith(f"{BASE}/reply/"):
                    body = json.loads(message.payload)
                    if body.get("done"):
                        out.append(body)
            return out

        def swap_result() -> dict | None:
            return next((json.loads(m.payload) for m in observer.on(RESULTS)
                         if json.loads(m.payload)["id"] == "swap"), None)

        def top_up() -> None:
            while len(sent) - len(finals()) < IN_FLIGHT:
                send()

        top_up()
        pin = {"id": "swap", "op": "pin", "args": {"quant": NEW}}
        observer.publish(f"{BASE}/cmd", json.dumps(pin).encode())
        # Right behind the pin on the same connection (so the daemon gets them after it): these
        # arrive while the swap runs, whether or not the first ones were answered already.
        for _ in range(IN_FLIGHT):
            send()
        assert swap_result() is None, "the swap finished before prompts could meet it"
        while swap_result() is None:  # every answer (or the swap's result) lets another prompt in
            seen = len(observer.messages)
            top_up()
            observer.wait_for(lambda m, n=seen: len(observer.messages) > n, timeout=120)
        result = swap_result()
        assert result["ok"], result
        assert result["result"]["changed"] and result["result"]["quant"] == NEW, result

        for _ in range(IN_FLIGHT):  # and some after it, which only the new model may answer
            send()
        after_swap = set(sent[-IN_FLIGHT:])
        observer.wait_for(lambda m: {f["id"] for f in finals()} >= set(sent), timeout=120)
        # One more round trip: a duplicate final for any earlier id would have come before it.
        send()
        observer.wait_for(lambda m: sent[-1] in {f["id"] for f in finals()}, timeout=60)

        answered = finals()
        assert [f for f in answered if "error" in f] == []
        assert Counter(f["id"] for f in answered) == Counter(sent)  # each exactly once, none lost
        model_id = ladder_manifest["models"][0]["id"]
        assert {f["model"]["model_id"] for f in answered} == {model_id}
        quants = [f["model"]["quant"] for f in answered]
        # One model at a time, in arrival order: the old one until the switch, then the new one.
        switch = quants.index(NEW)
        assert quants[:switch] == [OLD] * switch
        assert quants[switch:] == [NEW] * (len(quants) - switch)
        assert switch >= 1, "the old model answered nothing"
        assert all(f["model"]["quant"] == NEW for f in answered if f["id"] in after_swap)
    finally:
        observers.close()
        daemon.close()
