"""The downloader against a real threaded HTTP server with Range support and injected faults."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from agent.errors import ChecksumError, DiskFullError, FetchError
from agent.fetch.downloader import Downloader, sha256_of
from tests.fetch.payload import served_file, write_payload

MiB = 1 << 20


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".part", ".part.json")))


def test_download_verifies_and_installs_atomically(tmp_path, range_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", 3 * MiB + 17)
    url = served_file(range_server, payload)
    store = tmp_path / "store"
    store.mkdir()

    events: list[dict] = []
    path = Downloader(fast_fetch).download(
        [url], store / payload.name, size=payload.size, sha256=payload.sha256,
        on_progress=events.append,
    )

    assert path == store / payload.name
    assert sha256_of(path) == payload.sha256
    assert leftovers(store) == []
    assert range_server.served.requests == 1
    assert {e["state"] for e in events} >= {"starting", "verifying", "complete"}
    final = events[-1]
    assert final == {"event": "download", "file": payload.name, "bytes": payload.size,
                     "total": payload.size, "rate_bps": final["rate_bps"], "mirror": url,
                     "state": "complete"}


def test_resumes_after_drops_at_random_offsets(tmp_path, range_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", 8 * MiB)
    url = served_file(range_server, payload)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # Each entry drops one GET after that many body bytes: a resumed GET starts where the
    # last one stopped, so the drops land at increasing file offsets.
    drops = [rng.randrange(1, 2 * MiB) for _ in range(4)]
    range_server.faults.drop_after = list(drops)

    path = Downloader(fast_fetch).download(
        [url], tmp_path / "out.gguf", size=payload.size, sha256=payload.sha256
    )

    assert sha256_of(path) == payload.sha256, f"seed {seed}"
    assert range_server.served.requests == 5, f"seed {seed}"
    offsets = [sum(drops[:i]) for i in range(1, 5)]
    assert range_server.served.ranges[1:] == [f"bytes={o}-" for o in offsets], f"seed {seed}"
    # Resumed, not restarted: every byte crossed the wire once.
    assert range_server.served.body_bytes == payload.size, f"seed {seed}"


@pytest.mark.parametrize("send_etag", [True, False], ids=["etag", "last-modified"])
def test_resume_in_a_later_process_sends_if_range(tmp_path, range_server, fast_fetch, send_etag):
    payload = write_payload(tmp_path, "model.gguf", 4 * MiB)
    url = served_file(range_server, payload)
    range_server.faults.send_etag = send_etag
    range_server.faults.drop_after = [MiB]
    fast_fetch.retries = 0
    dest = tmp_path / "out.gguf"

    with pytest.raises(FetchError):
        Downloader(fast_fetch).download([url], dest, size=payload.size, sha256=payload.sha256)
    assert (tmp_path / "out.gguf.part").stat().st_size == MiB

    Downloader(fast_fetch).download([url], dest, size=payload.size, sha256=payload.sha256)
    assert sha256_of(dest) == payload.sha256
    assert range_server.served.ranges == ["", f"bytes={MiB}-"]
    assert range_server.served.body_bytes == payload.size


@pytest.mark.parametrize("send_etag", [True, False], ids=["etag", "last-modified"])
def test_file_changed_on_the_server_restarts_from_zero(
    tmp_path, range_server, fast_fetch, send_etag
):
    old = write_payload(tmp_path, "model.gguf", 4 * MiB, seed=1)
    url = served_file(range_server, old)
    range_server.faults.send_etag = send_etag
    range_server.faults.drop_after = [MiB]
    fast_fetch.retries = 0
    dest = tmp_path / "out.gguf"
    with pytest.raises(FetchError):
        Downloader(fast_fetch).download([url], dest, size=old.size, sha256=old.sha256)

    # The mirror now has another build under the same URL (a new inode, a later mtime).
    new = write_payload(tmp_path / "www", "model.gguf.new", 4 * MiB, seed=2)
    os.utime(new.path, (time.time() + 5, time.time() + 5))
    os.replace(new.path, range_server.root / "model.gguf")

    Downloader(fast_fetch).download([url], dest, size=new.size, sha256=new.sha256)
    assert sha256_of(dest) == new.sha256
    # If-Range did not match: the server sent the whole new file, not a spliced tail.
    assert range_server.served.body_bytes == MiB + new.size


def test_server_that_ignores_range_restarts_cleanly(tmp_path, range_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", 4 * MiB)
    url = served_file(range_server, payload)
    range_server.faults.ignore_range = True
    range_server.faults.drop_after = [3 * MiB]

    path = Downloader(fast_fetch).download(
        [url], tmp_path / "out.gguf", size=payload.size, sha256=payload.sha256
    )

    assert sha256_of(path) == payload.sha256
    assert range_server.served.ranges == ["", f"bytes={3 * MiB}-"]
    assert range_server.served.body_bytes == 3 * MiB + payload.size


def test_corrupted_byte_is_a_checksum_error_and_removes_the_part(
    tmp_path, range_server, fast_fetch
):
    payload = write_payload(tmp_path, "model.gguf", 2 * MiB)
    url = served_file(range_server, payload)
    range_server.faults.corrupt_at = 1_234_567
    dest = tmp_path / "out.gguf"

    with pytest.raises(ChecksumError) as caught:
        Downloader(fast_fetch).download([url], dest, size=payload.size, sha256=payload.sha256)

    assert caught.value.code == "checksum_mismatch"
    assert payload.sha256 in caught.value.message
    assert not dest.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "claimed_delta", [-1000, +1000], ids=["manifest-smaller", "manifest-larger"]
)
def test_wrong_size_is_a_checksum_error(tmp_path, range_server, fast_fetch, claimed_delta):
    payload = write_payload(tmp_path, "model.gguf", 2 * MiB)
    url = served_file(range_server, payload)
    dest = tmp_path / "out.gguf"

    with pytest.raises(ChecksumError) as caught:
        Downloader(fast_fetch).download(
            [url], dest, size=payload.size + claimed_delta, sha256=payload.sha256
        )

    assert str(payload.size) in caught.value.message
    assert not dest.exists()
    assert leftovers(tmp_path) == []
    assert range_server.served.requests == 1  # a mirror with another file is not retried


def test_404_then_a_working_mirror(tmp_path, range_server, second_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", MiB)
    good = served_file(second_server, payload)
    missing = f"{range_server.url}/{payload.name}"

    events: list[dict] = []
    path = Downloader(fast_fetch).download(
        [missing, good], tmp_path / "out.gguf", size=payload.size, sha256=payload.sha256,
        on_progress=events.append,
    )

    assert sha256_of(path) == payload.sha256
    assert range_server.served.requests == 1  # a 404 is not retried
    assert events[-1]["mirror"] == good


def test_every_mirror_failing_names_each_failure(tmp_path, range_server, second_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", MiB)
    second_server.faults.status = 503
    urls = [f"{range_server.url}/{payload.name}", f"{second_server.url}/{payload.name}"]

    with pytest.raises(FetchError) as caught:
        Downloader(fast_fetch).download(urls, tmp_path / "out.gguf", size=payload.size,
                                        sha256=payload.sha256)

    error = caught.value
    assert type(error) is FetchError and error.code == "fetch_failed"
    assert f"{urls[0]}: HTTP 404" in error.message
    assert f"{urls[1]}: HTTP 503 (after 4 attempts)" in error.message
    assert second_server.served.requests == 4  # the first try and `retries` more
    assert error.details["offline"] is False


def test_stalled_server_times_out_then_next_mirror(
    tmp_path, range_server, second_server, fast_fetch
):
    payload = write_payload(tmp_path, "model.gguf", MiB)
    stalled = served_file(range_server, payload)
    good = served_file(second_server, payload)
    range_server.faults.stall_s = 30.0
    fast_fetch.retries = 1

    started = time.monotonic()
    path = Downloader(fast_fetch).download(
        [stalled, good], tmp_path / "out.gguf", size=payload.size, sha256=payload.sha256
    )

    assert sha256_of(path) == payload.sha256
    assert range_server.served.requests == 2  # one try and one retry, each timed out
    assert second_server.served.requests == 1
    assert time.monotonic() - started < 20  # two 0.5 s read timeouts, not two 30 s stalls


def test_connect_failures_are_marked_offline(tmp_path, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", 1000)
    fast_fetch.retries = 1
    with pytest.raises(FetchError) as caught:
        # Port 9 on localhost: nothing listens, so the connection is refused.
        Downloader(fast_fetch).download(["http://127.0.0.1:9/model.gguf"], tmp_path / "out",
                                        size=payload.size, sha256=payload.sha256)
    assert caught.value.details["offline"] is True
    assert "ConnectError" in caught.value.message


def test_not_enough_disk_before_starting(small_tmpfs, tmp_path, range_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", 12 * MiB)
    url = served_file(range_server, payload)

    with pytest.raises(DiskFullError) as caught:
        Downloader(fast_fetch).download([url], small_tmpfs / payload.name, size=payload.size,
                                        sha256=payload.sha256)

    assert caught.value.code == "disk_full"
    assert caught.value.details["needed_bytes"] == payload.size
    assert range_server.served.requests == 0
    assert leftovers(small_tmpfs) == []


def test_disk_filling_up_midway_is_disk_full_and_frees_the_part(
    small_tmpfs, tmp_path, range_server, fast_fetch
):
    payload = write_payload(tmp_path, "model.gguf", 6 * MiB)
    url = served_file(range_server, payload)
    filler = small_tmpfs / "filler"

    def fill_disk_when_the_transfer_starts(event: dict) -> None:
        # Something else on the device takes the space after the free-space check passed.
        if event["state"] == "starting":
            free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
            filler.write_bytes(b"\0" * (free - 2 * MiB))

    with pytest.raises(DiskFullError) as caught:
        Downloader(fast_fetch).download(
            [url], small_tmpfs / payload.name, size=payload.size, sha256=payload.sha256,
            on_progress=fill_disk_when_the_transfer_starts,
        )

    assert "filled up" in caught.value.message
    assert leftovers(small_tmpfs) == []
    assert not (small_tmpfs / payload.name).exists()

    filler.unlink()
    Downloader(fast_fetch).download([url], small_tmpfs / payload.name, size=payload.size,
                                    sha256=payload.sha256)
    assert sha256_of(small_tmpfs / payload.name) == payload.sha256


def test_local_copy_across_filesystems_is_verified(small_tmpfs, tmp_path, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", 3 * MiB)
    path = Downloader(fast_fetch).copy_local(payload.path, small_tmpfs / payload.name,
                                             size=payload.size, sha256=payload.sha256)
    assert sha256_of(path) == payload.sha256
    assert path.stat().st_ino != payload.path.stat().st_ino

    (small_tmpfs / payload.name).unlink()
    with pytest.raises(ChecksumError):
        Downloader(fast_fetch).copy_local(payload.path, small_tmpfs / payload.name,
                                          size=payload.size, sha256="0" * 64)
    assert not (small_tmpfs / payload.name).exists()
    assert leftovers(small_tmpfs) == []


def test_progress_events_are_throttled(tmp_path, range_server, fast_fetch):
    payload = write_payload(tmp_path, "model.gguf", 4 * MiB)
    url = served_file(range_server, payload)
    range_server.faults.drop_after = [MiB]
    events: list[dict] = []

    started = time.monotonic()
    Downloader(fast_fetch).download([url], tmp_path / "out.gguf", size=payload.size,
                                    sha256=payload.sha256, on_progress=events.append)
    elapsed = time.monotonic() - started

    downloading = [e for e in events if e["state"] == "downloading"]
    assert len(downloading) <= elapsed * 4 + 1
    assert [e["state"] for e in events if e["state"] != "downloading"] == [
        "starting", "retrying", "verifying", "complete"
    ]
    assert all(0 <= e["bytes"] <= e["total"] == payload.size for e in events)
