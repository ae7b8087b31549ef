"""scripts/make-test-models tells a short story: llama.cpp's own output goes to build.log,
the terminal gets one line per variant, and a failure names the log and quotes its end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ModelLoadError
from agent.runtime.quality import measure_quality

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make-test-models"
QUANTS = ["F16", "Q2_K"]


def make(out: Path, quants: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGE_AGENT_VENV": sys.prefix}
    return subprocess.run([str(SCRIPT), "--out", str(out), "--quants", ",".join(quants)],
                          capture_output=True, text=True, timeout=600, env=env, check=False)


def with_source(ladder_dir: Path, out: Path) -> Path:
    """A ladder dir holding only the pinned source model, so nothing is downloaded."""
    (source,) = ladder_dir.glob("source-*.gguf")
    out.mkdir()
    return shutil.copy(source, out / source.name)


def test_rebuild_prints_a_line_per_variant_and_logs_llama_cpp(
        tmp_path: Path, ladder_dir: Path, ladder_manifest: dict) -> None:
    out = tmp_path / "ladder"
    with_source(ladder_dir, out)
    built = make(out, QUANTS)
    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout.strip() == str(out / "manifest.json")

    lines = built.stderr.splitlines()
    assert all(line.startswith("make-test-models: ") for line in lines), built.stderr[-3000:]
    # A few lines in all: the log's name, one line per variant, the end; none of llama.cpp's.
    assert len(lines) <= len(QUANTS) + 4, built.stderr
    for quant in QUANTS:
        (line,) = [line for line in lines if line.startswith(f"make-test-models: {quant} ")]
        assert "quantized" in line and "quality" in line, line
    assert "llama_" not in built.stderr and "gguf" not in built.stderr.replace(".gguf", "")
    log = out / "build.log"
    assert str(log) in built.stderr
    logged = log.read_text(errors="replace")
    assert "llama_model_loader" in logged and len(logged.splitlines()) > 10 * len(lines)

    # The files are the ladder's, byte for byte: routing the output changed nothing they hold.
    ours = {v["quant"]: v for v in json.loads((out / "manifest.json").read_text())["models"][0]
            ["variants"]}
    theirs = {v["quant"]: v for v in ladder_manifest["models"][0]["variants"]}
    assert list(ours) == QUANTS
    for quant in QUANTS:
        assert (ours[quant]["sha256"], ours[quant]["size"]) == \
            (theirs[quant]["sha256"], theirs[quant]["size"])

    # A rerun finds everything made: a line per variant still, and the build's log is kept.
    again = make(out, QUANTS)
    assert again.returncode == 0, again.stderr[-3000:]
    variant_lines = [line.split()[1:3] for line in again.stderr.splitlines()[:-1]]
    assert variant_lines == [[quant, "kept,"] for quant in QUANTS], again.stderr
    assert log.read_text(errors="replace") == logged


def test_quantize_failure_names_the_log_and_quotes_its_end(tmp_path: Path,
                                                           ladder_dir: Path) -> None:
    out = tmp_path / "ladder"
    source = with_source(ladder_dir, out)
    source.write_bytes(source.read_bytes()[: 1 << 16])  # the header, cut off mid-metadata
    failed = make(out, QUANTS)
    assert failed.returncode != 0
    log = out / "build.log"
    assert f"llama.cpp's log is {log}" in failed.stderr, failed.stderr
    logged = log.read_text(errors="replace").splitlines()
    quoted = failed.stderr.split("ending:\n", 1)[1].splitlines()
    # What the error quotes is llama.cpp's own last words, from the log, and only its end.
    assert quoted and quoted == logged[-len(quoted):] and len(quoted) <= 20, failed.stderr
    assert any("llama_model_quantize" in line for line in quoted), failed.stderr
    assert not list(out.glob("*.F16.gguf"))


def test_quality_failure_names_the_log(tmp_path: Path, ladder_model) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(ladder_model("Q2_K").read_bytes()[: 1 << 16])
    log = tmp_path / "build.log"
    log.write_text("earlier output\n")
    with pytest.raises(ModelLoadError) as failed:
        measure_quality(ladder_model("F16"), [corrupt], log=log)
    assert failed.value.code == "load_failed"
    message = str(failed.value)
    assert f"llama.cpp's log is {log}" in message, message
    logged = log.read_text(errors="replace")
    # The child's output was appended to the caller's log, and the error ends with its end.
    assert logged.startswith("earlier output\n") and str(corrupt) in logged
    assert message.rstrip().endswith(logged.rstrip().splitlines()[-1]), message
