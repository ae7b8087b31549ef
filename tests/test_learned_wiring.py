"""Learned memory wiring: a real load stores what the worker really took, and the next plan
(the `select` command) uses that stored figure instead of the raw estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.daemon import BASE, DEVICE, RunningDaemon, wait_ready
from tests.support.observer import Observers


@pytest.mark.slow
def test_a_real_load_is_learned_and_the_next_plan_uses_it(tmp_path: Path, broker, ladder_dir,
                                                          ladder_manifest):
    daemon = RunningDaemon(tmp_path / "daemon", broker, ladder_dir).start()
    observers = Observers(broker)
    try:
        wait_ready(daemon)
        # RunningDaemon pins Q4_K_M.
        variants = ladder_manifest["models"][0]["variants"]
        sha256 = next(v["sha256"] for v in variants if v["quant"] == "Q4_K_M")
        # Read the file the daemon wrote, not through the module that wrote it.
        learned_file = tmp_path / "daemon" / "state" / "learned-memory.json"
        stored = json.loads(learned_file.read_text())["entries"]
        mine = {key: entry["ram_bytes"] for key, entry in stored.items()
                if key.startswith(f"{DEVICE}|{sha256}|")}
        assert len(mine) == 1, stored  # one load, one settings key
        (key, measured), = mine.items()
        assert measured > 0

        observer = observers.connect(f"{BASE}/cmd/result")
        select = {"id": "plan", "op": "select", "args": {}}
        observer.publish(f"{BASE}/cmd", json.dumps(select).encode())
        answer = observer.wait_for(lambda m: json.loads(m.payload)["id"] == "plan", timeout=60)
        result = json.loads(answer.payload)
        assert result["ok"], result
        selection = result["result"]
        assert selection["quant"] == "Q4_K_M" and selection["sha256"] == sha256
        settings = (f"ctx={selection['n_ctx']},batch={selection['n_batch']},"
                    f"ubatch={selection['n_ubatch']},kv={selection['kv_type']},"
                    f"gpu={selection['n_gpu_layers']},fa={int(selection['flash_attn'])}")
        assert key == f"{DEVICE}|{sha256}|{settings}"  # the plan's settings are the learned ones
        estimate = selection["estimate"]
        # The learned figure is the measured growth plus the worker's own baseline; the raw
        # estimate is still shown beside it.
        assert estimate["learned_ram_bytes"] == measured + estimate["process_bytes"]
        assert estimate["ram_bytes"] > 0
        chosen = next(c for c in selection["candidates"] if c["verdict"] == "chosen")
        assert "learned figure" in chosen["reason"]
    finally:
        observers.close()
        daemon.close()
