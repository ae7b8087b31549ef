"""Split GGUF files (llama.cpp's ``<name>-00001-of-0000N.gguf``), made with gguf-py from a real
ladder variant: llama.cpp loads them, the reader and estimator see every part's tensors (on
disk and over HTTP Range), the manifest lists and checks the parts, build groups them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import llama_cpp
import msgspec
import pytest

from agent.catalog.build import (
    build_manifest,
    check_variants,
    combine_parts,
    expand_sources,
    inspect,
    inspect_part,
)
from agent.catalog.estimate import estimate_memory, repack_rules
from agent.catalog.gguf import (
    merge_split,
    parse_header,
    parse_part,
    read_gguf_file,
    read_gguf_part_file,
    read_gguf_split,
    read_gguf_url,
)
from agent.catalog.manifest import load_manifest, parse_manifest
from agent.catalog.select import choose, read_headers
from agent.cli import main
from agent.config import ModelConfig
from agent.errors import GGUFError, ManifestError
from tests.catalog import gguf_bytes
from tests.catalog.conftest import make_device, make_profile
from tests.support.range_server import link_into
from tests.support.split import (
    SPLIT_PARTS,
    SPLIT_QUANT,
    copy_parts,
    ladder_split_fixture,  # noqa: F401
)

WHOLE = f"smollm2-135m-instruct.{SPLIT_QUANT}.gguf"


def greedy(path: Path) -> str:
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, seed=7, verbose=False)
    try:
        answer = model.create_completion("Once upon a time", max_tokens=16, temperature=0.0)
        return answer["choices"][0]["text"]
    finally:
        model.close()


def test_llama_cpp_loads_the_split_and_answers_as_the_whole_file(ladder_split, ladder_dir):
    assert len(ladder_split) == SPLIT_PARTS
    assert greedy(ladder_split[0]) == greedy(ladder_dir / WHOLE)


def test_the_reader_and_estimator_count_every_part(ladder_split, ladder_dir):
    whole = read_gguf_file(ladder_dir / WHOLE)
    split = read_gguf_file(ladder_split[0])  # the others are read from beside it
    assert split.split_count == SPLIT_PARTS and whole.split_count == 1
    assert split.layer_tensor_bytes == whole.layer_tensor_bytes
    assert split.other_tensor_bytes == whole.other_tensor_bytes
    assert sorted(t.name for t in split.tensors) == sorted(t.name for t in whole.tensors)
    # The first part alone holds only some of the tensors: reading it alone would under-count.
    first = read_gguf_part_file(ladder_split[0])
    assert 0 < len(first.tensors) < whole.n_tensors

    split_size = sum(p.stat().st_size for p in ladder_split)
    whole_size = (ladder_dir / WHOLE).stat().st_size
    rules = repack_rules("x86_64", ["avx2"])
    split_estimate = estimate_memory(split, split_size, n_ctx=2048, repack=rules)
    whole_estimate = estimate_memory(whole, whole_size, n_ctx=2048, repack=rules)
    # Everything but the mapped bytes is the same model's; those differ by the extra headers.
    assert split_estimate.ram_bytes - whole_estimate.ram_bytes == split_size - whole_size
    assert split_estimate.kv_bytes == whole_estimate.kv_bytes


def test_a_later_part_or_an_incomplete_set_is_refused(ladder_split, tmp_path):
    with pytest.raises(GGUFError, match="part 2 of 3"):
        read_gguf_file(ladder_split[1])
    first, second, third = (read_gguf_part_file(p) for p in ladder_split)
    with pytest.raises(GGUFError, match="3 parts, 2 given"):
        merge_split([first, second])
    with pytest.raises(GGUFError, match="file 2 of the split says it is part 3 of 3"):
        merge_split([first, third, second])
    lonely = copy_parts(ladder_split, tmp_path / "lonely")
    lonely[2].unlink()
    with pytest.raises(GGUFError, match="cannot read"):
        read_gguf_file(lonely[0])


def test_parts_are_read_over_http_range_without_their_bodies(ladder_split, ladder_dir,
                                                             range_server):
    for part in ladder_split:
        link_into(range_server.root, part)
    whole = read_gguf_file(ladder_dir / WHOLE)
    by_sibling = read_gguf_url(f"{range_server.url}/{ladder_split[0].name}")
    dead = f"{range_server.url}/gone/{ladder_split[1].name}"
    by_parts = read_gguf_split([[f"{range_server.url}/{p.name}"] if i != 1 else
                                [dead, f"{range_server.url}/{p.name}"]
                                for i, p in enumerate(ladder_split)])
    for info in (by_sibling, by_parts):
        assert info.split_count == SPLIT_PARTS
        assert info.layer_tensor_bytes == whole.layer_tensor_bytes
    for part in ladder_split:
        # Only header windows travelled for each part, not its tensors.
        assert 0 < range_server.served.bytes_by_path[part.name] < part.stat().st_size // 4


def split_variant(ladder_split: list[Path], base: str = "") -> dict:
    files = combine_parts([inspect_part(str(p)) for p in ladder_split])
    (variant,) = build_manifest(files, url_base=base or None)["models"][0]["variants"]
    return variant


def test_build_groups_the_parts_into_one_variant(ladder_split, ladder_dir, ladder_manifest,
                                                 tmp_path):
    folder = tmp_path / "models"
    copy_parts(ladder_split, folder)
    link_into(folder, ladder_dir / "smollm2-135m-instruct.Q2_K.gguf")
    files = combine_parts([inspect_part(s) for s in expand_sources([str(folder)])])
    document = build_manifest(files)
    (model,) = document["models"]
    variants = {v["quant"]: v for v in model["variants"]}
    assert set(variants) == {SPLIT_QUANT, "Q2_K"}
    split = variants[SPLIT_QUANT]
    assert [p["file"] for p in split["parts"]] == [p.name for p in ladder_split]
    assert [p["size"] for p in split["parts"]] == [p.stat().st_size for p in ladder_split]
    assert split["file"] == ladder_split[0].name
    assert split["size"] == sum(p.stat().st_size for p in ladder_split)
    assert split["sha256"] == split["parts"][0]["sha256"]
    ladder_quality = {v["quant"]: v for v in ladder_manifest["models"][0]["variants"]}
    assert "parts" not in variants["Q2_K"]
    assert variants["Q2_K"]["sha256"] == ladder_quality["Q2_K"]["sha256"]

    # Idempotent: a rerun over the same folder keeps the document as it was.
    existing = parse_manifest(json.dumps(document))
    again = build_manifest(combine_parts([inspect_part(s) for s in
                                          expand_sources([str(folder)])]), existing)
    assert again == document


def test_build_refuses_an_incomplete_set_naming_the_missing_part(ladder_split, tmp_path):
    folder = tmp_path / "models"
    copy_parts(ladder_split, folder)
    (folder / ladder_split[1].name).unlink()
    with pytest.raises(ManifestError, match=ladder_split[1].name):
        combine_parts([inspect_part(s) for s in expand_sources([str(folder)])])
    with pytest.raises(ManifestError, match="missing"):
        inspect(str(folder / ladder_split[0].name))  # one part alone is not a variant


def test_build_goes_by_the_header_not_the_name(ladder_split, tmp_path):
    # Part 3 renamed as part 2: the name says 2 of 3, its header says 3 of 3.
    folder = tmp_path / "models"
    copy_parts(ladder_split[:1], folder)
    shutil.copyfile(ladder_split[2], folder / ladder_split[1].name)
    with pytest.raises(ManifestError, match="the header says it is part 3 of 3"):
        combine_parts([inspect_part(s) for s in expand_sources([str(folder)])])


def test_manifest_validates_that_the_parts_are_one_set(ladder_split):
    variant = split_variant(ladder_split)

    def problem(change) -> str:
        broken = json.loads(json.dumps(variant))
        change(broken)
        document = {"schema": 1, "models": [{"id": "m", "variants": [broken]}]}
        with pytest.raises(ManifestError) as caught:
            parse_manifest(json.dumps(document))
        return caught.value.message

    document = {"schema": 1, "models": [{"id": "m", "variants": [variant]}]}
    (parsed,) = parse_manifest(json.dumps(document)).models[0].variants
    assert [p.file for p in parsed.parts] == [p.name for p in ladder_split]
    assert "variants[0].size: is" in problem(lambda v: v.update(size=v["size"] + 1))
    assert "variants[0].sha256: must be the first part's" in problem(
        lambda v: v.update(sha256="0" * 64))
    assert "variants[0].file: must be the first part's" in problem(
        lambda v: v.update(file="other-00001-of-00003.gguf"))
    assert "parts[0].file: must be" in problem(
        lambda v: v["parts"].reverse())
    assert "variants[0].parts: lists 1 parts" in problem(lambda v: v.update(parts=v["parts"][:1]))
    assert "variants[0].parts: lists 258 parts" in problem(
        lambda v: v.update(parts=v["parts"] * 86))
    assert "parts[2].sha256: expected 64 hex" in problem(
        lambda v: v["parts"][2].update(sha256="xyz"))
    assert "parts[0].urls[0]" in problem(lambda v: v["parts"][0].update(urls=["ftp://x/y"]))
    assert "variants[0].urls: must be empty" in problem(
        lambda v: v.update(urls=["http://mirror/x.gguf"]))
    single = {k: v for k, v in variant.items() if k != "parts"}
    assert "variants[0].file: is a split part's name" in problem(lambda v: (
        v.clear(), v.update(single)))


def test_a_manifest_without_parts_is_read_as_before(ladder_dir, ladder_manifest):
    parsed = parse_manifest((ladder_dir / "manifest.json").read_bytes())
    assert all(v.parts == [] for v in parsed.models[0].variants)
    assert msgspec.json.decode(msgspec.json.encode(parsed.models[0].variants[0]))["parts"] == []


def test_check_checks_every_part(ladder_split, range_server, tmp_path):
    range_server.faults.linked = True  # the server states each part's size and sha256
    for part in ladder_split:
        link_into(range_server.root, part)
    variant = split_variant(ladder_split, base=range_server.url)
    assert variant["parts"][1]["urls"] == [f"{range_server.url}/{ladder_split[1].name}"]
    document = {"schema": 1, "models": [{"id": "m", "variants": [variant]}]}
    assert check_variants(parse_manifest(json.dumps(document))) == []

    variant["parts"][2]["sha256"] = "0" * 64
    variant["parts"][1]["urls"].append(f"{range_server.url}/gone.gguf")
    problems = check_variants(parse_manifest(json.dumps(document)))
    assert sorted((p.code, p.message.split(":")[0]) for p in problems) == sorted([
        ("checksum_mismatch", ladder_split[2].name),
        ("fetch_failed", ladder_split[1].name),
    ])


def test_selection_reads_every_part_and_counts_the_total_size(ladder_split, ladder_dir,
                                                              tmp_path):
    folder = tmp_path / "models"
    copy_parts(ladder_split, folder)
    link_into(folder, ladder_dir / "smollm2-135m-instruct.Q2_K.gguf")
    document = build_manifest(combine_parts([inspect_part(s) for s in
                                             expand_sources([str(folder)])]))
    (folder / "manifest.json").write_text(json.dumps(document))
    manifest = load_manifest(str(folder / "manifest.json"))
    headers = read_headers(manifest, manifest.model())
    split_file = ladder_split[0].name
    assert headers[split_file].split_count == SPLIT_PARTS
    profile = make_profile(target=512, floor=512)

    chosen = choose(make_device(), profile, manifest, ModelConfig(), headers)
    assert (chosen.quant, chosen.file) == (SPLIT_QUANT, split_file)
    assert chosen.size == sum(p.stat().st_size for p in ladder_split)
    assert [p.file for p in chosen.parts] == [p.name for p in ladder_split]

    # Q2_K's need as the budget: the split's first part alone would fit it, the set does not.
    budget = next(c for c in chosen.candidates if c.quant == "Q2_K").estimate.ram_bytes
    first_only = estimate_memory(headers[split_file], ladder_split[0].stat().st_size, n_ctx=512,
                                 repack=repack_rules("x86_64", make_device().cpu.flags))
    assert first_only.ram_bytes < budget
    smaller = choose(make_device(), profile, manifest, ModelConfig(), headers,
                     memory_bytes=budget)
    assert smaller.quant == "Q2_K" and smaller.parts == []
    (rejected,) = [c for c in smaller.candidates if c.quant == SPLIT_QUANT]
    assert rejected.verdict == "rejected" and rejected.size == chosen.size


def split_keys(no, count, tensors, value_type=gguf_bytes.UINT16) -> list[gguf_bytes.Entry]:
    return [gguf_bytes.Entry("split.no", value_type, no),
            gguf_bytes.Entry("split.count", value_type, count),
            gguf_bytes.Entry("split.tensors.count", gguf_bytes.INT32, tensors)]


@pytest.mark.parametrize(("no", "count", "tensors", "value_type", "refused"), [
    (0, 300, 3, gguf_bytes.UINT16, "split.no 0 of split.count 300 is outside"),
    (3, 3, 3, gguf_bytes.UINT16, "split.no 3 of split.count 3 is outside"),
    (0, 2, 70000, gguf_bytes.UINT16, "split.tensors.count 70000 is over"),
    (0, 2, -1, gguf_bytes.UINT16, "split.tensors.count is -1, not a count"),
    (0.0, 2, 3, gguf_bytes.FLOAT32, "split.no is 0.0, not a count"),
])
def test_hostile_split_keys_are_refused_before_any_part_is_fetched(no, count, tensors,
                                                                   value_type, refused):
    header = gguf_bytes.llama(extra=split_keys(no, count, tensors, value_type))
    data = header.file(gguf_bytes.tensor_data_bytes(header))
    with pytest.raises(GGUFError, match=refused):
        parse_part(data, len(data))


def test_a_split_part_alone_is_not_a_whole_header():
    header = gguf_bytes.llama(extra=split_keys(0, 2, 3))
    data = header.file(gguf_bytes.tensor_data_bytes(header))
    assert parse_part(data, len(data)).split.count == 2
    with pytest.raises(GGUFError, match="a split of 2 parts, 1 given"):
        parse_header(data, len(data))


def test_manifest_build_and_check_commands_on_a_folder_with_a_split(ladder_split, tmp_path,
                                                                     capsys):
    folder = tmp_path / "models"
    copy_parts(ladder_split, folder)
    manifest = folder / "manifest.json"
    assert main(["manifest", "build", str(folder), "-o", str(manifest)]) == 0
    assert f"in {SPLIT_PARTS} parts" in capsys.readouterr().err
    (variant,) = load_manifest(str(manifest)).model().variants
    assert [p.file for p in variant.parts] == [p.name for p in ladder_split]

    assert main(["manifest", "check", str(manifest)]) == 0
    assert capsys.readouterr().out.splitlines() == []
    (folder / ladder_split[2].name).unlink()
    assert main(["manifest", "check", str(manifest)]) == 2
    (line,) = capsys.readouterr().out.splitlines()
    assert "fetch_failed" in line and ladder_split[2].name in line
