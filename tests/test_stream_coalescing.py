"""Streamed replies on a slow and on an idle broker connection: the real daemon, a real
mosquitto, and (for the slow case) a real TCP hop that carries a few KiB per second.

On a line slower than the tokens the chunks are coalesced: fewer chunks than tokens, numbered
without gaps, their deltas still joining to the final's text. On an idle line a chunk goes
out at once, not at the next ``mqtt.stream_interval_ms``: with an interval far longer than the
generation there is still more than one chunk."""

from __future__ import annotations

import json

import pytest

from tests.support.daemon import BASE, RunningDaemon, wait_final, wait_ready
from tests.support.observer import Observers
from tests.support.slow_link import SlowLink

# Every chunk carries the Correlation Data: 4 KiB of it makes one chunk half a second of an
# 8 KiB/s line, while the model makes tokens far faster.
CORRELATION = b"c" * 4096


@pytest.fixture
def observers(broker):
    made = Observers(broker)
    yield made.connect
    made.close()


def streamed(observer, topic: str) -> tuple[list[dict], dict]:
    final = wait_final(observer, topic, timeout=180)
    records = [json.loads(m.payload) for m in observer.on(topic)]
    return [r for r in records if "delta" in r], final


def test_a_slow_line_gets_fewer_bigger_chunks_that_join_to_the_text(tmp_path, broker, ladder_dir,
                                                                     observers):
    link = SlowLink(broker.host, broker.port, bytes_per_s=8192).start()
    daemon = RunningDaemon(tmp_path / "d", broker, ladder_dir, mqtt={"port": link.port},
                           runtime={"default_max_tokens": 64}).start()
    try:
        wait_ready(daemon)
        observer = observers("slow/r")
        story = [{"role": "user", "content": "Tell a long story about a cat."}]
        body = {"id": "slow-1", "messages": story, "max_tokens": 64, "temperature": 0, "seed": 1}
        observer.publish(f"{BASE}/prompt", json.dumps(body).encode(), response_topic="slow/r",
                         correlation_data=CORRELATION)
        chunks, final = streamed(observer, "slow/r")
    finally:
        daemon.close()
        link.close()
    assert "error" not in final, final
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and chunks
    assert "".join(c["delta"] for c in chunks) == final["text"]
    assert len(chunks) < final["usage"]["completion_tokens"]  # coalesced
    assert all(m.correlation_data == CORRELATION for m in observer.on("slow/r"))


def test_on_an_idle_line_a_chunk_does_not_wait_for_the_interval(tmp_path, broker, ladder_dir,
                                                                observers):
    daemon = RunningDaemon(tmp_path / "d", broker, ladder_dir,
                           mqtt={"stream_interval_ms": 10_000}).start()
    try:
        wait_ready(daemon)
        observer = observers("idle/r")
        observer.publish(f"{BASE}/prompt", json.dumps({
            "id": "idle-1", "messages": [{"role": "user", "content": "Tell a story about a dog."}],
            "max_tokens": 16, "temperature": 0, "reply_to": "idle/r"}).encode())
        chunks, final = streamed(observer, "idle/r")
    finally:
        daemon.close()
    assert "error" not in final and final["usage"]["completion_tokens"] > 2, final
    # Were chunks held for the 10 s interval, the whole text would come as one chunk with the
    # final, as the generation takes well under that.
    assert len(chunks) > 1
    assert "".join(c["delta"] for c in chunks) == final["text"]
