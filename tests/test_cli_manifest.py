"""``edge-agent manifest build|check|sign`` end to end: real ladder files, a real Range server."""

from __future__ import annotations

import json
from pathlib import Path

from agent.catalog.manifest import load_manifest
from agent.cli import main
from agent.config import SigningConfig
from tests.support.range_server import link_into
from tests.support.signing import TEST_PRIVATE_KEY, TEST_PUBLIC_KEY

SMALL = ["Q2_K", "Q3_K_M"]


def served_ladder(range_server, ladder_dir: Path) -> list[str]:
    for quant in SMALL:
        link_into(range_server.root, ladder_dir / f"smollm2-135m-instruct.{quant}.gguf")
    return [f"{range_server.url}/smollm2-135m-instruct.{q}.gguf" for q in SMALL]


def build_over_urls(tmp_path: Path, range_server, ladder_dir: Path) -> Path:
    range_server.faults.linked = True
    manifest = tmp_path / "manifest.json"
    assert main(["manifest", "build", *served_ladder(range_server, ladder_dir), "-o", str(manifest),
                 "--model-id", "smollm2"]) == 0
    return manifest


def check(manifest: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(["manifest", "check", str(manifest), *extra])
    return rc, capsys.readouterr().out.splitlines()


def test_sign_then_check_round_trip(tmp_path: Path, range_server, ladder_dir: Path, capsys) -> None:
    manifest = build_over_urls(tmp_path, range_server, ladder_dir)
    key = tmp_path / "private.key"
    key.write_text(TEST_PRIVATE_KEY + "\n")
    assert main(["manifest", "sign", str(manifest), "--key", str(key)]) == 0
    load_manifest(str(manifest), SigningConfig(public_key=TEST_PUBLIC_KEY))  # devices accept it
    rc, lines = check(manifest, capsys, "--public-key", TEST_PUBLIC_KEY)
    assert (rc, lines) == (0, [])


def test_check_reports_each_broken_variant_with_its_code(tmp_path: Path, range_server,
                                                         ladder_dir: Path, capsys) -> None:
    manifest = build_over_urls(tmp_path, range_server, ladder_dir)
    key = tmp_path / "private.key"
    key.write_text(TEST_PRIVATE_KEY + "\n")
    assert main(["manifest", "sign", str(manifest), "--key", str(key)]) == 0
    document = json.loads(manifest.read_text())
    q2, q3 = document["models"][0]["variants"][-1], document["models"][0]["variants"][0]
    assert (q2["quant"], q3["quant"]) == ("Q2_K", "Q3_K_M")
    q2["sha256"] = "0" * 64  # the server states the real one: a mismatch
    q3["urls"].append(f"{range_server.url}/gone.gguf")  # a dead mirror beside a good one
    manifest.write_text(json.dumps(document))  # and the signature no longer matches

    rc, lines = check(manifest, capsys, "--public-key", TEST_PUBLIC_KEY)
    assert rc == 2
    assert any(line.startswith("- - bad_signature:") for line in lines)
    assert [line for line in lines if line.startswith("smollm2 Q2_K ")] == \
        [line for line in lines if "checksum_mismatch" in line]
    assert len([line for line in lines if line.startswith("smollm2 Q2_K checksum_mismatch")]) == 1
    q3_lines = [line for line in lines if line.startswith("smollm2 Q3_K_M ")]
    assert len(q3_lines) == 1 and "fetch_failed" in q3_lines[0] and "gone.gguf" in q3_lines[0]


def test_check_of_an_invalid_manifest_exits_2(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"schema": 1, "models": []}')
    rc, lines = check(manifest, capsys)
    assert rc == 2 and lines[0].startswith("- - manifest_invalid:")


def test_measure_quality_on_two_variants_and_rerun_keeps_it(tmp_path: Path, ladder_dir: Path,
                                                          capsys) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for quant in SMALL:
        link_into(folder, ladder_dir / f"smollm2-135m-instruct.{quant}.gguf")
    manifest = tmp_path / "manifest.json"
    assert main(["manifest", "build", str(folder), "-o", str(manifest), "--measure-quality"]) == 0
    variants = {v["quant"]: v for v in json.loads(manifest.read_text())["models"][0]["variants"]}
    # The reference is the highest precision present; the other measures below it.
    assert variants["Q3_K_M"]["quality"] == 1.0
    assert 0.0 < variants["Q2_K"]["quality"] < 1.0
    assert {v["quality_source"] for v in variants.values()} == {"measured"}

    link_into(folder, ladder_dir / "smollm2-135m-instruct.Q4_K_M.gguf")
    assert main(["manifest", "build", str(folder), "-o", str(manifest)]) == 0
    again = {v["quant"]: v for v in json.loads(manifest.read_text())["models"][0]["variants"]}
    assert {q: again[q] for q in SMALL} == variants
    assert again["Q4_K_M"]["quality_source"] == "prior"


def test_select_explain_shows_where_quality_came_from(tmp_path: Path, ladder_dir: Path,
                                                     capsys) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    link_into(folder, ladder_dir / "smollm2-135m-instruct.Q2_K.gguf")
    manifest = folder / "manifest.json"  # files without urls are looked for beside it
    assert main(["manifest", "build", str(folder), "-o", str(manifest)]) == 0
    config = tmp_path / "agent.yaml"
    config.write_text("signing:\n  allow_unsigned: true\n")
    capsys.readouterr()
    assert main(["select", "--config", str(config), "--manifest", str(manifest), "--explain",
                 "--memory", "4GiB", "--headroom", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "quality 0." in out and "prior)" in out.splitlines()[1]  # the variant line
    (row,) = [line for line in out.splitlines() if line.startswith("Q2_K ")]
    assert row.split()[2] == "prior"
