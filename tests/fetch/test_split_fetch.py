"""A split variant through the store: every part fetched, resumed and verified, installed
beside the first (the first part last), and kept, moved and evicted as one set."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.catalog.build import build_manifest, combine_parts, inspect_part
from agent.catalog.selection import MemoryEstimate, Selection, SelectionPart
from agent.errors import DiskFullError
from agent.fetch.downloader import sha256_of
from agent.fetch.store import ModelStore
from tests.fetch.payload import Payload, write_payload
from tests.support.range_server import link_into
from tests.support.signing import TEST_PUBLIC_KEY, sign_file
from tests.support.split import ladder_split_fixture  # noqa: F401

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def selection_of(parts: list[Payload], base: str) -> Selection:
    return Selection(
        model_id="test-model", quant="Q4_K_M", file=parts[0].name,
        size=sum(p.size for p in parts), sha256=parts[0].sha256, urls=[], quality=1.0,
        n_ctx=512, estimate=MemoryEstimate(ram_bytes=0),
        parts=[SelectionPart(file=p.name, size=p.size, sha256=p.sha256,
                             urls=[f"{base}/{p.name}"]) for p in parts],
    )


def payload_parts(directory: Path, count: int, size: int, seed: int = 0) -> list[Payload]:
    directory.mkdir(parents=True, exist_ok=True)
    return [write_payload(directory, f"m-{n:05d}-of-{count:05d}.gguf", size, seed=seed)
            for n in range(1, count + 1)]


def real_parts(ladder_split: list[Path]) -> list[Payload]:
    return [Payload(p, p.stat().st_size, sha256_of(p)) for p in ladder_split]


def test_every_part_is_fetched_verified_and_then_used_from_the_store(
        tmp_path, ladder_split, range_server, fast_fetch):
    for part in ladder_split:
        link_into(range_server.root, part)
    parts = real_parts(ladder_split)
    selection = selection_of(parts, range_server.url)
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)

    path = store.ensure(selection)

    assert path == store.root / ladder_split[0].name
    for part in parts:
        assert sha256_of(store.root / part.name) == part.sha256
    (record,) = json.loads((store.root / "index.json").read_text())["models"]
    assert [p["file"] for p in record["parts"]] == [p.name for p in parts]
    assert record["size"] == selection.size
    # The first part, the path the worker is given, came last.
    assert [r.name for r in range_server.served.responses] == \
        [p.name for p in parts[1:]] + [parts[0].name]

    requests = range_server.served.requests
    assert store.ensure(selection) == path
    assert range_server.served.requests == requests  # the whole set is there: no network
    assert store.find(selection.sha256, selection.parts) == path


def test_a_part_missing_from_the_store_is_fetched_again(tmp_path, range_server, fast_fetch):
    parts = payload_parts(tmp_path / "files", 3, MiB)
    for part in parts:
        link_into(range_server.root, part.path)
    selection = selection_of(parts, range_server.url)
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)
    store.ensure(selection)
    (store.root / parts[2].name).unlink()

    assert store.find(selection.sha256) is None  # the set is not whole: not usable
    store.ensure(selection)
    assert sha256_of(store.root / parts[2].name) == parts[2].sha256
    assert [r.name for r in range_server.served.responses][3:] == [parts[2].name]


def test_a_dropped_connection_mid_part_resumes_that_part(
        tmp_path, ladder_split, range_server, fast_fetch):
    for part in ladder_split:
        link_into(range_server.root, part)
    parts = real_parts(ladder_split)
    drop_at = parts[1].size // 2 + 4321
    range_server.faults.drop_after = [drop_at]

    ModelStore(tmp_path / "store", fetch=fast_fetch).ensure(selection_of(parts,
                                                                         range_server.url))

    assert range_server.served.ranges[:2] == ["", f"bytes={drop_at}-"]
    assert range_server.served.body_bytes == sum(p.size for p in parts)  # nothing twice
    for part in parts:
        assert sha256_of(tmp_path / "store" / part.name) == part.sha256


@pytest.fixture
def served_split(tmp_path, ladder_split, ladder_dir, range_server):
    """A local manifest with the split variant and the ladder's Q2_K; the files lie beside
    it (headers are read there) and on the range server (the mirror the fetch uses)."""
    manifest_dir = tmp_path / "manifest"
    manifest_dir.mkdir()
    files = [*ladder_split, ladder_dir / "smollm2-135m-instruct.Q2_K.gguf"]
    for path in files:
        link_into(manifest_dir, path)
        link_into(range_server.root, path)
    facts = combine_parts([inspect_part(str(manifest_dir / p.name)) for p in files])
    document = build_manifest(facts, url_base=range_server.url)
    manifest = manifest_dir / "manifest.json"
    manifest.write_text(json.dumps(document))
    sign_file(manifest)
    config = tmp_path / "agent.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\ncache_dir: {tmp_path / 'cache'}\n"
                      f"signing: {{public_key: '{TEST_PUBLIC_KEY}'}}\n")
    return manifest, config


def test_a_killed_fetch_resumes_mid_part_and_the_first_part_appears_last(
        tmp_path, served_split, ladder_split, range_server):
    manifest, config = served_split
    store = tmp_path / "store"
    argv = [sys.executable, "-m", "agent.cli", "fetch", "--manifest", str(manifest),
            "--config", str(config), "--memory", "8GiB", "--store", str(store)]
    second = store / f"{ladder_split[1].name}.part"
    range_server.faults.rate_bps = 8e6
    fetch = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fetch.poll() is None and \
                (not second.exists() or second.stat().st_size < 2 * MiB):
            time.sleep(0.02)
        assert fetch.poll() is None, fetch.communicate()
        fetch.send_signal(signal.SIGKILL)
    finally:
        fetch.wait(30)
    have = second.stat().st_size
    assert 0 < have < ladder_split[1].stat().st_size
    assert not (store / ladder_split[0].name).exists()  # nothing a worker could load yet

    range_server.faults.rate_bps = None
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(store / ladder_split[0].name)
    resumed = [r for r in range_server.served.responses
               if r.name == ladder_split[1].name and r.start > 0]
    assert len(resumed) == 1 and resumed[0].status == 206 and resumed[0].start >= have
    for part in ladder_split:
        assert sha256_of(store / part.name) == sha256_of(part)


def test_the_disk_check_covers_every_part(small_tmpfs, tmp_path, range_server, fast_fetch):
    # Each 3 MiB part fits the 8 MiB disk, the set of three does not: refused before a byte.
    parts = payload_parts(tmp_path / "files", 3, 3 * MiB)
    for part in parts:
        link_into(range_server.root, part.path)
    store = ModelStore(small_tmpfs / "store", fetch=fast_fetch)

    with pytest.raises(DiskFullError) as caught:
        store.ensure(selection_of(parts, range_server.url))

    assert caught.value.details["needed_bytes"] >= sum(p.size for p in parts)
    assert range_server.served.requests == 0
    assert [p.name for p in store.root.iterdir() if p.name.endswith((".gguf", ".part"))] == []


def test_eviction_removes_the_set_whole(tmp_path, range_server, fast_fetch):
    split = payload_parts(tmp_path / "files", 3, MiB)
    singles = [write_payload(tmp_path / "files", f"{name}.gguf", MiB, seed=9) for name in "ab"]
    for payload in [*split, *singles]:
        link_into(range_server.root, payload.path)
    store = ModelStore(tmp_path / "store", budget_bytes=0, fetch=fast_fetch)
    store.ensure(selection_of(split, range_server.url))
    for single in singles:  # the split becomes previous, then neither current nor previous
        store.ensure(Selection(
            model_id="test-model", quant="Q2_K", file=single.name, size=single.size,
            sha256=single.sha256, urls=[f"{range_server.url}/{single.name}"], quality=1.0,
            n_ctx=512, estimate=MemoryEstimate(ram_bytes=0)))

    left = sorted(p.name for p in store.root.iterdir() if p.suffix == ".gguf")
    assert left == ["a.gguf", "b.gguf"]
    assert store.find(split[0].sha256) is None


def test_a_new_build_of_a_split_keeps_the_old_set_whole_under_new_names(
        tmp_path, range_server, fast_fetch):
    old = payload_parts(tmp_path / "old", 2, MiB, seed=1)
    new = payload_parts(tmp_path / "new", 2, MiB, seed=2)
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)
    for payloads in (old, new):
        for payload in payloads:
            (range_server.root / payload.name).unlink(missing_ok=True)
            link_into(range_server.root, payload.path)
        store.ensure(selection_of(payloads, range_server.url))

    assert store.find(new[0].sha256) == store.root / new[0].name
    moved = store.find(old[0].sha256)
    assert moved is not None and moved != store.root / old[0].name
    # Still named as llama.cpp looks for the parts beside the first.
    prefix = moved.name.removesuffix("-00001-of-00002.gguf")
    assert sha256_of(moved) == old[0].sha256
    assert sha256_of(store.root / f"{prefix}-00002-of-00002.gguf") == old[1].sha256
    for payload in new:
        assert sha256_of(store.root / payload.name) == payload.sha256


def test_a_split_beside_a_local_manifest_is_linked_into_the_store(tmp_path, ladder_split,
                                                                 fast_fetch):
    parts = real_parts(ladder_split)
    selection = selection_of(parts, "")
    selection.parts = [SelectionPart(file=p.file, size=p.size, sha256=p.sha256)
                       for p in selection.parts]  # no urls: next to the manifest
    selection.manifest_url = str(ladder_split[0].parent / "manifest.json")
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)

    path = store.ensure(selection)

    assert path == store.root / ladder_split[0].name
    for part, source in zip(parts, ladder_split):
        assert sha256_of(store.root / part.name) == part.sha256
        if source.stat().st_dev == store.root.stat().st_dev:
            assert (store.root / part.name).stat().st_ino == source.stat().st_ino  # no copy
