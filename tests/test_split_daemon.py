"""A split model end to end: a real daemon over a real Mosquitto selects the split variant of
a manifest on the real Range server, fetches its parts, is killed mid-part, resumes that part
when started again, loads the first part (llama.cpp opens the rest beside it) and answers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.catalog.build import build_manifest, combine_parts, inspect_part
from agent.fetch.downloader import sha256_of
from tests.support.broker import Broker
from tests.support.daemon import BASE, RunningDaemon, wait_final, wait_ready
from tests.support.observer import Observers
from tests.support.range_server import link_into
from tests.support.signing import sign_file
from tests.support.split import SPLIT_QUANT, ladder_split_fixture  # noqa: F401

MiB = 1 << 20


@pytest.fixture
def split_manifest_url(range_server, ladder_split, ladder_dir) -> str:
    """The split variant and the ladder's Q2_K (lower quality, so not chosen) on the Range
    server, in a manifest built over their URLs and signed with the test key."""
    range_server.faults.linked = True  # build takes size and sha256 from the server
    files = [*ladder_split, ladder_dir / "smollm2-135m-instruct.Q2_K.gguf"]
    for path in files:
        link_into(range_server.root, path)
    facts = combine_parts([inspect_part(f"{range_server.url}/{p.name}") for p in files])
    manifest = range_server.root / "manifest.json"
    manifest.write_text(json.dumps(build_manifest(facts)))
    sign_file(manifest)
    range_server.faults.linked = False
    return f"{range_server.url}/manifest.json"


def test_a_split_variant_is_selected_fetched_after_a_kill_loaded_and_answers(
        tmp_path: Path, split_manifest_url, ladder_split, range_server):
    broker = Broker(tmp_path / "broker").start()
    observers = Observers(broker)
    daemons: list[RunningDaemon] = []

    def start() -> RunningDaemon:
        daemon = RunningDaemon(tmp_path / "daemon", broker, tmp_path,
                               model={"manifest": split_manifest_url, "pin": None})
        daemons.append(daemon.start())
        return daemon

    try:
        models = tmp_path / "daemon" / "models"
        second = models / f"{ladder_split[1].name}.part"
        range_server.faults.rate_bps = 8e6  # slow enough to be killed mid-part
        first_run = start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and first_run.process.poll() is None and \
                (not second.exists() or second.stat().st_size < 2 * MiB):
            time.sleep(0.02)
        assert first_run.process.poll() is None, first_run.log_path.read_text()[-3000:]
        first_run.close()  # SIGKILL, mid-part
        have = second.stat().st_size
        assert 0 < have < ladder_split[1].stat().st_size
        assert not (models / ladder_split[0].name).exists()  # nothing loadable yet

        range_server.faults.rate_bps = None
        observer = observers.connect(f"{BASE}/meta", f"{BASE}/reply/#")
        daemon = start()
        wait_ready(daemon)

        meta = json.loads(observer.wait_for(
            lambda m: m.topic == f"{BASE}/meta" and json.loads(m.payload).get("selection"),
            timeout=60).payload)
        assert meta["selection"]["quant"] == SPLIT_QUANT
        assert meta["selection"]["file"] == ladder_split[0].name
        resumed = [r for r in range_server.served.responses
                   if r.name == ladder_split[1].name and r.start > 0]
        assert len(resumed) == 1 and resumed[0].status == 206 and resumed[0].start >= have
        for part in ladder_split:
            assert sha256_of(models / part.name) == sha256_of(part)

        observer.publish(f"{BASE}/prompt", json.dumps({
            "id": "split-1", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
        }).encode())
        final = wait_final(observer, f"{BASE}/reply/split-1", timeout=120)
        assert "error" not in final, final
        assert final["text"] and final["usage"]["completion_tokens"] >= 1
    finally:
        for daemon in daemons:
            daemon.close()
        observers.close()
        broker.stop()
