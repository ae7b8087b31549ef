"""agent.catalog.build on the real ladder: local folders and Range-served URLs become manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.catalog.build import (
    QUANT_PRIORS,
    build_manifest,
    check_variants,
    expand_sources,
    inspect,
    prior_quality,
)
from agent.catalog.manifest import parse_manifest
from agent.errors import ManifestError
from tests.support.range_server import link_into

SMALL = ["Q2_K", "Q3_K_M"]  # the smallest ladder files: hashing them is quick


def ladder_variants(ladder_manifest: dict) -> dict[str, dict]:
    return {v["file"]: v for v in ladder_manifest["models"][0]["variants"]}


def folder_of(tmp_path: Path, ladder_dir: Path, quants: list[str]) -> Path:
    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    for quant in quants:
        link_into(folder, ladder_dir / f"smollm2-135m-instruct.{quant}.gguf")
    return folder


def test_folder_build_matches_the_ladder_manifest(tmp_path: Path, ladder_dir: Path,
                                                  ladder_manifest: dict) -> None:
    folder = folder_of(tmp_path, ladder_dir, SMALL)
    files = [inspect(source) for source in expand_sources([str(folder)])]
    document = build_manifest(files)
    (model,) = document["models"]
    assert model["family"] == "llama"
    expected = ladder_variants(ladder_manifest)
    files = {f"smollm2-135m-instruct.{q}.gguf" for q in SMALL}
    assert {v["file"] for v in model["variants"]} == files
    for variant in model["variants"]:
        ladder = expected[variant["file"]]
        assert (variant["quant"], variant["size"], variant["sha256"]) == \
            (ladder["quant"], ladder["size"], ladder["sha256"])
        assert variant["quality_source"] == "prior"
        assert variant["urls"] == []


def test_quant_comes_from_the_header_not_the_name(tmp_path: Path, ladder_dir: Path) -> None:
    misnamed = tmp_path / "smollm2.Q8_0.gguf"
    misnamed.symlink_to(ladder_dir / "smollm2-135m-instruct.Q2_K.gguf")
    (variant,) = build_manifest([inspect(str(misnamed))])["models"][0]["variants"]
    assert variant["quant"] == "Q2_K"
    assert variant["file"] == misnamed.name


def test_rerun_on_a_grown_folder_keeps_entries_and_measured_quality(
        tmp_path: Path, ladder_dir: Path) -> None:
    folder = folder_of(tmp_path, ladder_dir, ["Q2_K"])
    first = build_manifest([inspect(s) for s in expand_sources([str(folder)])])
    measured = first["models"][0]["variants"][0]
    measured.update(quality=0.5, quality_source="measured")  # as --measure-quality leaves it
    existing = parse_manifest(json.dumps(first))

    folder_of(tmp_path, ladder_dir, ["Q2_K", "Q3_K_M"])
    second = build_manifest([inspect(s) for s in expand_sources([str(folder)])], existing)
    variants = {v["quant"]: v for v in second["models"][0]["variants"]}
    assert variants["Q2_K"] == measured
    assert variants["Q3_K_M"]["quality_source"] == "prior"


def test_urls_with_linked_etag_are_not_downloaded(range_server, ladder_dir: Path,
                                                  ladder_manifest: dict) -> None:
    range_server.faults.linked = True
    for quant in SMALL:
        link_into(range_server.root, ladder_dir / f"smollm2-135m-instruct.{quant}.gguf")
    urls = [f"{range_server.url}/smollm2-135m-instruct.{q}.gguf" for q in SMALL]
    document = build_manifest([inspect(url) for url in urls])
    expected = ladder_variants(ladder_manifest)
    for variant, url in zip(sorted(document["models"][0]["variants"], key=lambda v: v["file"]),
                            sorted(urls)):
        ladder = expected[variant["file"]]
        assert (variant["size"], variant["sha256"], variant["urls"]) == \
            (ladder["size"], ladder["sha256"], [url])
        # Only the header's Range windows travelled: far less than the file.
        assert range_server.served.bytes_by_path[variant["file"]] < ladder["size"] // 10


def test_resolve_urls_redirecting_with_linked_etag_are_not_downloaded(
        range_server, ladder_dir: Path, ladder_manifest: dict) -> None:
    # Hugging Face states the sha256 on the resolve URL's redirect, not on the CDN's answer.
    range_server.faults.resolve_redirect = True
    name = "smollm2-135m-instruct.Q2_K.gguf"
    link_into(range_server.root, ladder_dir / name)
    url = f"{range_server.url}/resolve/{name}"
    (variant,) = build_manifest([inspect(url)])["models"][0]["variants"]
    ladder = ladder_variants(ladder_manifest)[name]
    assert (variant["sha256"], variant["size"], variant["urls"]) == \
        (ladder["sha256"], ladder["size"], [url])
    assert range_server.served.bytes_by_path[name] < ladder["size"] // 10


def test_check_finds_a_header_that_is_another_quant(tmp_path: Path, ladder_dir: Path) -> None:
    folder = folder_of(tmp_path, ladder_dir, ["Q2_K"])
    document = build_manifest([inspect(s) for s in expand_sources([str(folder)])])
    document["models"][0]["variants"][0]["quant"] = "Q4_K_M"  # what a misnamed file claims
    (folder / "manifest.json").write_text(json.dumps(document))
    manifest = parse_manifest(json.dumps(document), str(folder / "manifest.json"))
    (problem,) = check_variants(manifest)
    assert (problem.quant, problem.code) == ("Q4_K_M", "manifest_invalid")
    assert "Q2_K" in problem.message


def test_urls_without_linked_etag_are_streamed_once(range_server, ladder_dir: Path,
                                                    ladder_manifest: dict) -> None:
    name = "smollm2-135m-instruct.Q2_K.gguf"
    link_into(range_server.root, ladder_dir / name)
    (variant,) = build_manifest([inspect(f"{range_server.url}/{name}")])["models"][0]["variants"]
    size = ladder_variants(ladder_manifest)[name]["size"]
    assert variant["sha256"] == ladder_variants(ladder_manifest)[name]["sha256"]
    assert size <= range_server.served.bytes_by_path[name] < 2 * size


def test_two_files_of_one_quant_in_one_model_are_refused(tmp_path: Path, ladder_dir: Path) -> None:
    folder = folder_of(tmp_path, ladder_dir, ["Q2_K"])
    (folder / "copy.gguf").symlink_to(ladder_dir / "smollm2-135m-instruct.Q2_K.gguf")
    with pytest.raises(ManifestError, match="both Q2_K"):
        build_manifest([inspect(s) for s in expand_sources([str(folder)])])


def test_priors_follow_the_published_order() -> None:
    # By llama.cpp's table, more bits never cost quality among the K-quants.
    k_quants = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
    priors = [prior_quality(q, 0.0) for q in k_quants]
    assert priors == sorted(priors) and len(set(priors)) == len(priors)
    assert all(0.0 < p < 1.0 for p in priors)
    assert prior_quality("F16", 16.0) == prior_quality("BF16", 16.0) == 1.0
    # A type the table lacks lands between its neighbours by bits per weight.
    bpw = {q: gib * 2**30 * 8 / 8.03e9 for q, (gib, _) in QUANT_PRIORS.items()}
    iq4 = prior_quality("IQ4_XS", (bpw["Q3_K_L"] + bpw["Q4_K_S"]) / 2)
    assert prior_quality("Q3_K_L", 0) <= iq4 <= prior_quality("Q4_K_S", 0)
