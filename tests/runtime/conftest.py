"""Runtime fixtures: Selections for the real SmolLM2 ladder and engines that clean up."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.catalog.selection import MemoryEstimate, Selection
from agent.config import RuntimeConfig
from agent.runtime.engine import Engine
from agent.runtime.process import WORKER_ARGV


@pytest.fixture
def selection_for(ladder_model, ladder_manifest):
    """A Selection of one ladder variant, small context so loads stay fast."""
    variants = {v["quant"]: v for m in ladder_manifest["models"] for v in m["variants"]}

    def make(quant: str = "Q4_K_M", **overrides) -> Selection:
        variant = variants[quant]
        path = ladder_model(quant)
        fields = dict(
            model_id="smollm2-135m-instruct",
            quant=quant,
            file=path.name,
            size=variant["size"],
            sha256=variant["sha256"],
            urls=[],
            quality=variant.get("quality", 1.0),
            n_ctx=512,
            n_batch=256,
            n_ubatch=256,
            n_threads=1,  # one thread: robust on a shared 2-core machine
            estimate=MemoryEstimate(ram_bytes=300 * 1024 * 1024),
            model_path=str(path),
        )
        fields.update(overrides)
        return Selection(**fields)

    return make


@pytest.fixture
def make_engine(tmp_path: Path):
    """Engines on a shared state dir; every engine made here is closed at teardown."""
    engines: list[Engine] = []

    def make(events: list | None = None, *, worker_argv=WORKER_ARGV, **runtime) -> Engine:
        engine = Engine(
            RuntimeConfig(**runtime),
            state_dir=tmp_path / "state",
            device_id="test-device",
            on_event=events.append if events is not None else None,
            worker_argv=worker_argv,
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close(timeout_s=5)
