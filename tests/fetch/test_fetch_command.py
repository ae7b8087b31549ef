"""``edge-agent fetch`` end to end: the real selector, a real server, an interrupted download."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.catalog.selection import MemoryEstimate, Selection
from agent.fetch.downloader import sha256_of
from agent.fetch.store import ModelStore
from tests.support.range_server import link_into
from tests.support.signing import TEST_PUBLIC_KEY, sign_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def served_ladder(tmp_path, ladder_dir, ladder_manifest, range_server):
    """A local manifest whose variants list the range server as their mirror.

    The GGUF files are also linked beside the manifest, where the selector reads their
    headers, so the only GETs the server sees are the download's.
    """
    manifest_dir = tmp_path / "manifest"
    manifest_dir.mkdir()
    manifest = json.loads(json.dumps(ladder_manifest))
    for variant in manifest["models"][0]["variants"]:
        source = ladder_dir / variant["file"]
        link_into(manifest_dir, source)
        link_into(range_server.root, source)
        variant["urls"] = [f"{range_server.url}/{variant['file']}"]
    (manifest_dir / "manifest.json").write_text(json.dumps(manifest))
    sign_file(manifest_dir / "manifest.json")
    config = tmp_path / "agent.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\ncache_dir: {tmp_path / 'cache'}\n"
                      f"signing: {{public_key: '{TEST_PUBLIC_KEY}'}}\n")
    return manifest_dir / "manifest.json", config, manifest


def edge_agent(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_fetch_resumes_an_interrupted_download(tmp_path, served_ladder, range_server):
    manifest_path, config, manifest = served_ladder
    variant = next(v for v in manifest["models"][0]["variants"] if v["quant"] == "Q2_K")
    drop_at = variant["size"] // 2 + 12345
    range_server.faults.drop_after = [drop_at]
    store = tmp_path / "store"

    result = edge_agent("fetch", "--manifest", str(manifest_path), "--config", str(config),
                        "--memory", "8GiB", "--pin", "Q2_K", "--store", str(store))

    assert result.returncode == 0, result.stderr
    path = store / variant["file"]
    assert result.stdout.splitlines() == [str(path), f"sha256 {variant['sha256']}"]
    assert sha256_of(path) == variant["sha256"]
    assert range_server.served.ranges == ["", f"bytes={drop_at}-"]
    assert range_server.served.body_bytes == variant["size"]  # resumed, not restarted


def test_fetch_uses_what_the_store_has(tmp_path, served_ladder, range_server, ladder_dir):
    manifest_path, config, manifest = served_ladder
    variant = next(v for v in manifest["models"][0]["variants"] if v["quant"] == "Q3_K_M")
    store = tmp_path / "store"
    store.mkdir()
    first = ModelStore(store).ensure(
        Selection(model_id="smollm2-135m-instruct", quant="Q3_K_M", file=variant["file"],
                  size=variant["size"], sha256=variant["sha256"], urls=[], quality=1.0,
                  n_ctx=512, estimate=MemoryEstimate(ram_bytes=0),
                  manifest_url=str(ladder_dir / "manifest.json"))
    )

    result = edge_agent("fetch", "--manifest", str(manifest_path), "--config", str(config),
                        "--memory", "8GiB", "--pin", "Q3_K_M", "--store", str(store), "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"path": str(first), "sha256": variant["sha256"],
                                         "quant": "Q3_K_M", "size": variant["size"]}
    assert range_server.served.requests == 0


def test_fetch_reports_a_corrupt_mirror_with_its_code(tmp_path, served_ladder, range_server):
    manifest_path, config, _ = served_ladder
    range_server.faults.corrupt_at = 4096

    result = edge_agent("fetch", "--manifest", str(manifest_path), "--config", str(config),
                        "--memory", "8GiB", "--pin", "Q2_K", "--store", str(tmp_path / "store"))

    assert result.returncode == 2
    assert "error [checksum_mismatch]" in result.stderr
    left = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert not [name for name in left if name.endswith((".gguf", ".part", ".part.json"))], left
