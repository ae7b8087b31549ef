"""ModelStore: cache hits, eviction keeping current + previous, offline use, sources, locking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from agent.catalog.selection import MemoryEstimate, Selection
from agent.errors import ChecksumError, FetchError, ManifestError, StoreError
from agent.fetch.downloader import sha256_of
from agent.fetch.store import ModelStore
from tests.fetch.payload import selection_for, served_file, write_payload
from tests.support.broker import Broker
from tests.support.daemon import RunningDaemon
from tests.support.range_server import link_into

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def index_of(store: ModelStore) -> dict:
    return json.loads((store.root / "index.json").read_text())


def test_ensure_fetches_once_then_uses_the_store(tmp_path, range_server, fast_fetch):
    payload = write_payload(tmp_path, "a.gguf", 2 * MiB)
    selection = selection_for(payload, [served_file(range_server, payload)])
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)

    first = store.ensure(selection)
    events: list[dict] = []
    with capture_logs() as logs:
        second = store.ensure(selection, on_progress=events.append)

    assert first == second == tmp_path / "store" / "a.gguf"
    assert sha256_of(first) == payload.sha256
    assert store.find(payload.sha256) == first
    assert store.find("f" * 64) is None
    assert range_server.served.requests == 1
    assert [log["event"] for log in logs] == ["fetch_cached"]
    assert [e["state"] for e in events] == ["cached"]


def test_keeps_current_and_previous_and_evicts_the_rest(tmp_path, range_server, fast_fetch):
    payloads = [write_payload(tmp_path, f"{name}.gguf", MiB + i) for i, name in enumerate("abc")]
    selections = [selection_for(p, [served_file(range_server, p)]) for p in payloads]
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)

    for selection in selections:
        store.ensure(selection)

    a, b, c = payloads
    assert store.find(a.sha256) is None and not (store.root / "a.gguf").exists()
    assert store.find(b.sha256) and store.find(c.sha256)
    index = index_of(store)
    assert (index["current"], index["previous"]) == (c.sha256, b.sha256)

    # Going back to b (a rollback) keeps c as the previous model: nothing is fetched.
    requests = range_server.served.requests
    store.ensure(selections[1])
    assert range_server.served.requests == requests
    index = index_of(store)
    assert (index["current"], index["previous"]) == (b.sha256, c.sha256)


def test_budget_keeps_more_and_evicts_least_recently_used(tmp_path, range_server, fast_fetch):
    payloads = [write_payload(tmp_path, f"{name}.gguf", MiB) for name in "abcd"]
    selections = [selection_for(p, [served_file(range_server, p)]) for p in payloads]
    store = ModelStore(tmp_path / "store", budget_bytes=3 * MiB, fetch=fast_fetch)

    store.ensure(selections[0])
    store.ensure(selections[1])
    store.ensure(selections[2])
    assert all(store.find(p.sha256) for p in payloads[:3])  # 3 MiB fits the budget

    store.ensure(selections[0])  # a is used again: b is now the least recently used
    store.ensure(selections[3])
    kept = {p.name for p in payloads if store.find(p.sha256)}
    assert kept == {"a.gguf", "c.gguf", "d.gguf"}
    assert sorted(m.file for m in store.models()) == ["a.gguf", "c.gguf", "d.gguf"]


def test_offline_uses_the_store_and_names_each_mirror_otherwise(
    tmp_path, range_server, second_server, fast_fetch
):
    have = write_payload(tmp_path, "have.gguf", MiB)
    missing = write_payload(tmp_path, "missing.gguf", MiB)
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)
    store.ensure(selection_for(have, [served_file(range_server, have)]))
    urls = [f"{range_server.url}/have.gguf", f"{second_server.url}/have.gguf"]
    range_server.stop()
    second_server.stop()

    # No network, but the store has it: used without any request.
    assert store.ensure(selection_for(have, urls)) == store.root / "have.gguf"

    offline = [f"{range_server.url}/missing.gguf", f"{second_server.url}/missing.gguf"]
    with capture_logs() as logs, pytest.raises(FetchError) as caught:
        store.ensure(selection_for(missing, offline))

    error = caught.value
    assert error.details["offline"] is True
    assert all(url in error.message for url in offline)
    assert "the store has have.gguf" in error.message
    assert error.details["cached"] == [
        {"file": "have.gguf", "sha256": have.sha256, "current": True}
    ]
    assert any(log["event"] == "fetch_offline" for log in logs)


def test_variant_without_urls_comes_from_next_to_an_http_manifest(
    tmp_path, range_server, fast_fetch
):
    payload = write_payload(tmp_path, "model v1.gguf", MiB)
    served_file(range_server, payload)
    selection = selection_for(payload, [], manifest_url=f"{range_server.url}/manifest.json")

    path = ModelStore(tmp_path / "store", fetch=fast_fetch).ensure(selection)

    assert sha256_of(path) == payload.sha256
    assert range_server.served.requests == 1


def test_real_ladder_file_from_a_local_manifest_is_linked_after_verifying(
    tmp_path, ladder_dir, ladder_manifest, fast_fetch
):
    variant = next(
        v for v in ladder_manifest["models"][0]["variants"] if v["quant"] == "Q2_K"
    )
    selection = Selection(
        model_id="smollm2-135m-instruct", quant="Q2_K", file=variant["file"],
        size=variant["size"], sha256=variant["sha256"], urls=[], quality=variant["quality"],
        n_ctx=512, estimate=MemoryEstimate(ram_bytes=variant["size"]),
        manifest_url=str(ladder_dir / "manifest.json"),
    )
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)

    path = store.ensure(selection)

    assert sha256_of(path) == variant["sha256"]
    source = ladder_dir / variant["file"]
    if source.stat().st_dev == path.stat().st_dev:
        assert path.stat().st_ino == source.stat().st_ino  # no second copy of the model

    wrong = msgspec.structs.replace(selection, sha256="0" * 64)
    with pytest.raises(ChecksumError):
        ModelStore(tmp_path / "other", fetch=fast_fetch).ensure(wrong)
    assert not (tmp_path / "other" / variant["file"]).exists()


def test_real_ladder_file_over_http_with_a_dropped_connection(
    tmp_path, range_server, ladder_model, ladder_manifest, fast_fetch
):
    variant = next(
        v for v in ladder_manifest["models"][0]["variants"] if v["quant"] == "Q2_K"
    )
    source = ladder_model("Q2_K")
    link_into(range_server.root, source)
    range_server.faults.drop_after = [variant["size"] // 3]
    selection = Selection(
        model_id="smollm2-135m-instruct", quant="Q2_K", file=variant["file"],
        size=variant["size"], sha256=variant["sha256"], urls=[f"{range_server.url}/{source.name}"],
        quality=variant["quality"], n_ctx=512, estimate=MemoryEstimate(ram_bytes=variant["size"]),
    )

    path = ModelStore(tmp_path / "store", fetch=fast_fetch).ensure(selection)

    assert sha256_of(path) == variant["sha256"]
    assert range_server.served.ranges == ["", f"bytes={variant['size'] // 3}-"]
    assert range_server.served.body_bytes == variant["size"]


@pytest.mark.parametrize("name", ["../escape.gguf", "/etc/passwd", "dir/x.gguf", "a\\b.gguf",
                                  "nul\x00.gguf", "..", ".hidden", "index.json", "x.gguf.part"])
def test_file_names_that_are_not_bare_are_refused(tmp_path, fast_fetch, name):
    payload = write_payload(tmp_path, "ok.gguf", 10)
    selection = msgspec.structs.replace(selection_for(payload, ["http://127.0.0.1:9/x"]), file=name)
    with pytest.raises(ManifestError) as caught:
        ModelStore(tmp_path / "store", fetch=fast_fetch).ensure(selection)
    assert caught.value.code == "manifest_invalid"
    assert not (tmp_path / "escape.gguf").exists()


def test_a_new_build_under_the_same_name_keeps_the_old_one_as_previous(
    tmp_path, range_server, fast_fetch
):
    old = write_payload(tmp_path / "www", "model.gguf", MiB, seed=1)
    url = f"{range_server.url}/model.gguf"
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)
    store.ensure(selection_for(old, [url]))
    new = write_payload(tmp_path / "www", "model.gguf", MiB, seed=2)

    store.ensure(selection_for(new, [url]))

    assert sha256_of(store.find(new.sha256)) == new.sha256
    assert sha256_of(store.find(old.sha256)) == old.sha256
    assert store.find(old.sha256).name == f"model.gguf.{old.sha256[:16]}"


CONCURRENT_ENSURE = """
import json, sys
from agent.config import FetchConfig
from agent.fetch.store import ModelStore
from agent.catalog.selection import Selection
from agent.log import configure_logging
configure_logging(json=True)  # logs to stderr; stdout carries only the path
selection = Selection(**json.loads(sys.argv[1]))
print(ModelStore(sys.argv[2], fetch=FetchConfig(read_timeout_s=10)).ensure(selection))
"""


def test_two_processes_ensuring_one_file_download_it_once(tmp_path, range_server):
    payload = write_payload(tmp_path, "model.gguf", 4 * MiB)
    selection = selection_for(payload, [served_file(range_server, payload)])
    # The body is held until the second process says it waits for the lock the first holds.
    release = threading.Event()
    range_server.faults.hold = release
    argv = [sys.executable, "-c", CONCURRENT_ENSURE,
            msgspec.json.encode(selection).decode(), str(tmp_path / "store")]

    def ensure() -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    try:
        first = ensure()
        deadline = time.monotonic() + 30
        while range_server.served.requests == 0:  # the first is inside the lock, downloading
            assert time.monotonic() < deadline and first.poll() is None, "the first never asked"
            time.sleep(0.01)
        second = ensure()
        second_err: list[str] = []
        lock_waited = threading.Event()

        def read_second() -> None:
            for line in second.stderr:
                second_err.append(line)
                if "fetch_lock_wait" in line:
                    lock_waited.set()

        reader = threading.Thread(target=read_second)
        reader.start()
        assert lock_waited.wait(30), "the second process never waited for the lock"
    finally:
        release.set()
    processes = [first, second]
    first_result = first.communicate(timeout=60)
    second.wait(60)
    reader.join(10)
    results = [first_result, (second.stdout.read(), "".join(second_err))]

    assert [p.returncode for p in processes] == [0, 0], results
    assert {out.strip() for out, _ in results} == {str(tmp_path / "store" / "model.gguf")}
    assert range_server.served.requests == 1
    assert range_server.served.body_bytes == payload.size
    assert any("fetch_lock_wait" in err for _, err in results)
    assert sha256_of(tmp_path / "store" / "model.gguf") == payload.sha256


# ---- a store someone else can write to ------------------------------------------------------

NOBODY = 65534


@pytest.mark.parametrize("planted", ["a.gguf.part", "a.gguf.lock", "a.gguf.part.json"])
def test_a_planted_symlink_in_the_store_is_never_followed(
    tmp_path, range_server, fast_fetch, planted
):
    """The attack: whoever could write the store plants ``x.gguf.part -> victim``; a fetch
    run by the store's owner (or root) must not truncate, write or create the target."""
    payload = write_payload(tmp_path, "a.gguf", 2 * MiB)
    selection = selection_for(payload, [served_file(range_server, payload)])
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious " * (MiB // 2))  # larger than the download: it would be cut
    before = victim.read_bytes()
    (tmp_path / "store").mkdir()
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)
    (store.root / planted).symlink_to(victim)
    dangling = store.root / "b.gguf.lock"  # a link to a path that does not exist yet
    dangling.symlink_to(tmp_path / "created-by-the-fetch")

    with pytest.raises(StoreError) as caught:
        store.ensure(selection)

    assert caught.value.code == "store_unsafe"
    assert planted in caught.value.message
    assert victim.read_bytes() == before
    assert not (store.root / "a.gguf").exists()
    other = write_payload(tmp_path, "b.gguf", MiB)
    with pytest.raises(StoreError):
        store.ensure(selection_for(other, [served_file(range_server, other)]))
    assert not (tmp_path / "created-by-the-fetch").exists()


@pytest.mark.parametrize("planted", ["a.gguf.part", "a.gguf.lock", "a.gguf.part.json"])
def test_a_planted_fifo_in_the_store_is_refused_without_hanging(
    tmp_path, range_server, fast_fetch, planted
):
    """A FIFO where the store expects its own file: opening it for reading blocks until a
    writer comes, so the fetch would hang before it could see the file is not a plain one."""
    payload = write_payload(tmp_path, "a.gguf", MiB)
    selection = selection_for(payload, [served_file(range_server, payload)])
    (tmp_path / "store").mkdir()
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)
    fifo = store.root / planted
    os.mkfifo(fifo)
    outcome: list[BaseException | Path] = []

    def fetch() -> None:
        try:
            outcome.append(store.ensure(selection))
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    fetching = threading.Thread(target=fetch, daemon=True)
    fetching.start()
    fetching.join(timeout=20)
    hung = fetching.is_alive()
    if hung:  # release the blocked open so the thread ends and the suite goes on
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
        fetching.join(timeout=20)

    assert not hung, f"the fetch blocked on the FIFO at {planted}"
    assert isinstance(outcome[0], StoreError)
    assert outcome[0].code == "store_unsafe"
    assert planted in outcome[0].message
    assert not (store.root / "a.gguf").exists()


@pytest.mark.parametrize("planted", ["a.gguf.part", "a.gguf.lock"])
def test_a_store_file_that_cannot_be_opened_is_a_store_error(
    tmp_path, range_server, fast_fetch, planted
):
    """A directory where the store writes a file fails to open (EISDIR, even as root): the
    caller gets store_unsafe naming the path, not a bare OSError outside the error tree."""
    payload = write_payload(tmp_path, "a.gguf", MiB)
    selection = selection_for(payload, [served_file(range_server, payload)])
    (tmp_path / "store").mkdir()
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)
    (store.root / planted).mkdir()

    with pytest.raises(StoreError) as caught:
        store.ensure(selection)

    assert caught.value.code == "store_unsafe"
    assert planted in caught.value.message


def test_a_planted_index_temporary_is_replaced_not_followed(tmp_path, range_server, fast_fetch):
    payload = write_payload(tmp_path, "a.gguf", MiB)
    selection = selection_for(payload, [served_file(range_server, payload)])
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "store").mkdir()
    store = ModelStore(tmp_path / "store", fetch=fast_fetch)
    (store.root / f".index.json.{os.getpid()}.tmp").symlink_to(victim)

    assert store.ensure(selection) == store.root / "a.gguf"

    assert victim.read_bytes() == b"precious"
    assert index_of(store)["current"] == payload.sha256


@pytest.mark.parametrize("unsafe", ["group-writable", "world-writable", "symlink", "other-owner"])
def test_a_store_directory_others_can_write_is_refused(tmp_path, fast_fetch, unsafe):
    root = tmp_path / "store"
    if unsafe == "symlink":
        (tmp_path / "elsewhere").mkdir()
        root.symlink_to(tmp_path / "elsewhere")
    else:
        root.mkdir()
        root.chmod({"group-writable": 0o775, "world-writable": 0o1777}.get(unsafe, 0o755))
        if unsafe == "other-owner":
            if os.geteuid() != 0:
                pytest.skip("needs root to give the directory to another user")
            os.chown(root, NOBODY, NOBODY)

    with pytest.raises(StoreError) as caught:
        ModelStore(root, fetch=fast_fetch)

    assert caught.value.code == "store_unsafe"
    assert str(root) in caught.value.message


def test_a_new_store_directory_is_made_safe_whatever_the_umask(tmp_path, fast_fetch):
    old = os.umask(0o002)  # a desktop user's umask: group-writable by default
    try:
        store = ModelStore(tmp_path / "cache" / "models", fetch=fast_fetch)
    finally:
        os.umask(old)
    assert store.root.stat().st_mode & 0o022 == 0


def test_the_daemon_refuses_to_start_on_a_group_writable_store(
    tmp_path, broker: Broker, ladder_dir
):
    models = tmp_path / "daemon" / "models"
    models.mkdir(parents=True)
    models.chmod(0o775)
    daemon = RunningDaemon(tmp_path / "daemon", broker, ladder_dir)
    try:
        code = daemon.start().process.wait(timeout=60)
        log = daemon.log_path.read_text()
    finally:
        daemon.close()
    assert code != 0
    assert "store_unsafe" in log and str(models) in log
