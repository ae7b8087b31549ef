"""Manifest loading and validation: real ladder manifest, key-path errors, URL loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.catalog.manifest import load_manifest, parse_manifest, variant_locations
from agent.errors import ManifestError
from tests.support.cpu import thread_cpu
from tests.support.range_server import link_into

SHA = "a" * 64


def document(**variant_overrides) -> dict:
    variant = {"quant": "Q4_K_M", "file": "m.Q4_K_M.gguf", "size": 100, "sha256": SHA, "quality": 0.9}
    variant.update(variant_overrides)
    return {"schema": 1, "models": [{"id": "m", "variants": [
        {"quant": "F16", "file": "m.F16.gguf", "size": 200, "sha256": SHA, "quality": 1.0},
        {"quant": "Q8_0", "file": "m.Q8_0.gguf", "size": 150, "sha256": SHA, "quality": 0.99},
        variant,
    ]}]}


def test_the_ladder_manifest_loads_with_every_variant(ladder_dir: Path, ladder_manifest: dict):
    manifest = load_manifest(str(ladder_dir / "manifest.json"))
    model = manifest.model()
    assert [v.quant for v in model.variants] == [v["quant"] for v in ladder_manifest["models"][0]["variants"]]
    q4 = next(v for v in model.variants if v.quant == "Q4_K_M")
    # No urls: the file is next to the manifest.
    assert variant_locations(manifest, q4) == [str(ladder_dir.resolve() / q4.file)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"sha256": "abc"}, "models[0].variants[2].sha256: expected 64 hex characters"),
        ({"file": "../etc/passwd"}, "models[0].variants[2].file: must be a bare file name"),
        ({"file": "/abs.gguf"}, "models[0].variants[2].file: must be a bare file name"),
        ({"file": "dir\\m.gguf"}, "models[0].variants[2].file: must be a bare file name"),
        ({"file": "m\x00.gguf"}, "models[0].variants[2].file: must not contain NUL"),
        ({"file": ".."}, "models[0].variants[2].file: must be a file name"),
        ({"size": 0}, "models[0].variants[2].size: must be a positive"),
        ({"quality": 1.5}, "models[0].variants[2].quality: must be between 0 and 1"),
        ({"quant": "F16"}, "models[0].variants[2].quant: 'F16' is listed twice"),
        ({"urls": ["ftp://x/y"]}, "models[0].variants[2].urls[0]: 'ftp://x/y' is not an http(s) URL"),
        ({"size": "big"}, "models[0].variants[2].size: expected `int`, got `str`"),
        ({"colour": "red"}, "models[0].variants[2]: object contains unknown field `colour`"),
        ({"requires": {"arch": "x86_64"}}, "models[0].variants[2].requires.arch: expected `array`"),
    ],
)
def test_invalid_variants_are_rejected_with_the_key_path(override: dict, message: str):
    with pytest.raises(ManifestError) as caught:
        parse_manifest(json.dumps(document(**override)), "m.json")
    assert message in caught.value.message
    assert caught.value.code == "manifest_invalid"


def test_schema_version_and_missing_fields_are_named():
    with pytest.raises(ManifestError, match=r"schema: 2 is not supported"):
        parse_manifest(json.dumps({**document(), "schema": 2}))
    doc = document()
    del doc["models"][0]["variants"][1]["sha256"]
    with pytest.raises(ManifestError, match=r"models\[0\].variants\[1\]: object missing required field `sha256`"):
        parse_manifest(json.dumps(doc))


def test_yaml_several_models_and_requires():
    text = f"""
schema: 1
models:
  - id: a
    variants:
      - {{quant: Q4_0, file: a.gguf, size: 1, sha256: "{SHA}", quality: 0.5,
          requires: {{arch: [aarch64], cpu_flags: [dotprod]}}}}
  - id: b
    family: qwen2
    variants:
      - {{quant: Q8_0, file: b.gguf, size: 2, sha256: "{SHA}", quality: 0.9,
          urls: ["https://mirror/b.gguf"]}}
"""
    manifest = parse_manifest(text, "https://host/dir/manifest.yaml")
    assert [m.id for m in manifest.models] == ["a", "b"]
    assert manifest.model("a").variants[0].requires.cpu_flags == ["dotprod"]
    assert variant_locations(manifest, manifest.model("a").variants[0]) == ["https://host/dir/a.gguf"]
    assert variant_locations(manifest, manifest.model("b").variants[0]) == ["https://mirror/b.gguf"]
    with pytest.raises(ManifestError, match="model 'c' is not in the manifest"):
        manifest.model("c")


def test_loads_from_a_url_and_reports_http_errors(range_server, ladder_dir: Path):
    link_into(range_server.root, ladder_dir / "manifest.json")
    manifest = load_manifest(f"{range_server.url}/manifest.json")
    variant = manifest.model().variants[0]
    assert variant_locations(manifest, variant) == [f"{range_server.url}/{variant.file}"]
    with pytest.raises(ManifestError, match="HTTP 404"):
        load_manifest(f"{range_server.url}/missing.json")


def test_unreadable_and_non_mapping_documents(tmp_path: Path):
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(str(tmp_path / "nope.json"))
    with pytest.raises(ManifestError, match="top level must be a mapping"):
        parse_manifest("[1, 2]")


# -- hostile manifests (issue 10, findings 8 and 10) ---------------------------------------------

ALIAS_BOMB = "\n".join(
    ["a: &a [x,x,x,x,x,x,x,x,x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["schema: *i", "models: []", ""]
)


def test_a_yaml_alias_bomb_is_refused_cheaply_with_a_short_message():
    """305 bytes once made a 522 MB error message (the repr of the expanded value), 1 GiB RSS
    and 8 s of CPU."""
    assert len(ALIAS_BOMB) < 400
    with thread_cpu() as spent, pytest.raises(ManifestError) as caught:
        parse_manifest(ALIAS_BOMB, "bomb.yaml")
    assert spent.seconds < 1.0
    assert caught.value.code == "manifest_invalid" and "alias" in caught.value.message
    assert len(caught.value.message) < 500


def test_a_single_anchor_is_refused_too():
    text = f"""schema: 1
models:
  - id: m
    variants:
      - &v {{quant: Q4_0, file: a.gguf, size: 1, sha256: "{SHA}", quality: 0.5}}
"""
    with pytest.raises(ManifestError, match="anchors and aliases are not allowed"):
        parse_manifest(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("schema: " + "9" * 5000 + "\nmodels: []\n", "neither valid YAML nor JSON"),  # int() past 4300 digits
        ("schema: 1\nmodels: 2024-13-45\n", "neither valid YAML nor JSON"),  # datetime() of a bad date
        ("schema: 1\nmodels: " + "[" * 5000 + "]" * 5000 + "\n", "neither valid YAML nor JSON"),
        ("[" * 100_000, "neither valid YAML nor JSON"),  # deeper than json's recursion limit
        ("schema: '" + "x" * 1_000_000 + "'\nmodels: []\n", "is not supported"),
    ],
)
def test_parser_traps_are_manifest_errors_with_bounded_messages(text: str, message: str):
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, "trap.yaml")
    assert message in caught.value.message and len(caught.value.message) < 500


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"quant": "Q4\nWATCHDOG=trigger"}, "quant"),
        ({"file": "m.gguf\nWATCHDOG=trigger"}, "file"),
        ({"file": "m\rx.gguf"}, "file"),
        ({"file": "m.bin"}, "file"),
        ({"file": "-" + "x" * 300 + ".gguf"}, "file"),
        ({"quant": "Q4 K"}, "quant"),
        ({"quant": "Q4/K"}, "quant"),
        ({"urls": ["https://host/a\nb.gguf"]}, "urls[0]"),
        ({"requires": {"cpu_flags": ["avx2\n"]}}, "requires.cpu_flags[0]"),
    ],
)
def test_names_with_control_characters_or_outside_the_safe_alphabet_are_refused(override: dict, key: str):
    with pytest.raises(ManifestError) as caught:
        parse_manifest(json.dumps(document(**override)), "m.json")
    assert caught.value.code == "manifest_invalid"
    assert f"models[0].variants[2].{key}:" in caught.value.message
    assert "\n" not in caught.value.message and "WATCHDOG" not in caught.value.message


def test_a_model_id_with_a_newline_is_refused():
    doc = document()
    doc["models"][0]["id"] = "m\nWATCHDOG=trigger"
    with pytest.raises(ManifestError, match=r"models\[0\]\.id: must be a model id") as caught:
        parse_manifest(json.dumps(doc))
    assert "\n" not in caught.value.message
