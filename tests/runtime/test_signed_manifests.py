"""``edge-agent prompt --manifest`` and ``bench --manifest`` follow the daemon's signature
rules (issue 10, finding 3): an unsigned manifest is refused unless ``--allow-unsigned``, a
signed one runs with ``--public-key``. Real CLI processes on a real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.range_server import link_into
from tests.support.signing import TEST_PUBLIC_KEY, sign_file

QUANT = "Q2_K"


def edge_agent(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_SIGNING")}
    env["EDGE_AGENT_STATE_DIR"] = str(tmp_path / "state")
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True,
                          text=True, env=env, timeout=180)


@pytest.fixture
def local_manifest(tmp_path: Path, ladder_dir: Path) -> Path:
    """An unsigned one-variant manifest with its model file next to it (a hard link)."""
    manifest = json.loads((ladder_dir / "manifest.json").read_text())
    variants = manifest["models"][0]["variants"]
    manifest["models"][0]["variants"] = [v for v in variants if v["quant"] == QUANT]
    name = manifest["models"][0]["variants"][0]["file"]
    link_into(tmp_path, ladder_dir / name)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("command", ["prompt", "bench"])
def test_unsigned_manifest_is_refused_by_default(tmp_path, local_manifest, command) -> None:
    args = ["Hello"] if command == "prompt" else []
    result = edge_agent(tmp_path, command, *args, "--manifest", str(local_manifest),
                        "--max-tokens", "2")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "[bad_signature]" in result.stderr


def test_signed_manifest_runs_with_the_pinned_key_and_unsigned_only_when_allowed(
        tmp_path, local_manifest) -> None:
    common = ["Hello", "--manifest", str(local_manifest), "--max-tokens", "2", "--temperature", "0",
              "--n-ctx", "256", "--json"]
    sign_file(local_manifest)
    signed = edge_agent(tmp_path, "prompt", *common, "--public-key", TEST_PUBLIC_KEY)
    assert signed.returncode == 0, signed.stderr
    assert json.loads(signed.stdout)["done"] is True

    local_manifest.write_text(local_manifest.read_text().replace('"quality": ', '"quality":  '))
    tampered = edge_agent(tmp_path, "prompt", *common, "--public-key", TEST_PUBLIC_KEY)
    assert tampered.returncode == 2 and "[bad_signature]" in tampered.stderr

    Path(f"{local_manifest}.sig").unlink()
    allowed = edge_agent(tmp_path, "prompt", *common, "--allow-unsigned")
    assert allowed.returncode == 0, allowed.stderr
