"""GGUF header reader: real ladder files, truncated and corrupt copies, HTTP Range reads."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from agent.catalog.gguf import MAX_TENSORS, read_gguf_file, read_gguf_header, read_gguf_url
from agent.errors import FetchError, GGUFError
from tests.catalog import gguf_bytes
from tests.support.daemon import BASE, RunningDaemon, wait_final, wait_ready
from tests.support.observer import Observers
from tests.support.range_server import link_into
from tests.support.signing import sign_file

MIB = 1024 * 1024

LADDER = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]


@pytest.mark.parametrize("quant", LADDER)
def test_reads_the_architecture_and_accounts_for_every_tensor_byte(ladder_model, quant: str):
    path = ladder_model(quant)
    info = read_gguf_file(path)
    assert (info.architecture, info.block_count, info.embedding_length) == ("llama", 30, 576)
    assert (info.head_count, info.head_count_kv, info.key_length, info.value_length) == (9, 3, 64, 64)
    assert (info.context_length, info.vocab_size, info.feed_forward_length) == (8192, 49152, 1536)
    assert info.sliding_window is None
    assert info.n_tensors == len(info.tensors) == 272
    assert len(info.layer_tensor_bytes) == 30 and all(b > 0 for b in info.layer_tensor_bytes)
    # Bytes computed from ggml block sizes tile the data section exactly, up to the file's end.
    last = max(info.tensors, key=lambda t: t.offset)
    assert info.header_bytes + last.offset + last.nbytes == path.stat().st_size
    assert info.header_bytes + info.tensor_bytes == path.stat().st_size
    for before, after in zip(sorted(info.tensors, key=lambda t: t.offset), sorted(info.tensors, key=lambda t: t.offset)[1:]):
        assert before.offset + before.nbytes <= after.offset


def test_file_type_distinguishes_the_ladder(ladder_model):
    assert read_gguf_file(ladder_model("F16")).file_type == 1
    assert read_gguf_file(ladder_model("Q8_0")).file_type == 7
    assert read_gguf_file(ladder_model("Q4_K_M")).file_type == 15


def _header(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def test_a_truncated_copy_is_an_error(tmp_path: Path, ladder_model):
    source = ladder_model("Q2_K")
    info = read_gguf_file(source)
    for cut in (10, 1000, info.header_bytes // 2, info.header_bytes + 100):
        copy = tmp_path / f"cut{cut}.gguf"
        copy.write_bytes(_header(source, cut))
        with pytest.raises(GGUFError) as caught:
            read_gguf_file(copy)
        assert caught.value.code == "gguf_invalid"


def test_a_huge_string_length_is_rejected_before_allocating(tmp_path: Path, ladder_model):
    data = bytearray(_header(ladder_model("Q2_K"), 4096))
    # The first metadata key's length sits right after magic, version and the two counts.
    struct.pack_into("<Q", data, 24, 2**60)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="corrupt"):
        read_gguf_file(corrupt)


def test_huge_counts_and_bad_magic_or_version(tmp_path: Path, ladder_model):
    source = ladder_model("Q2_K")
    head = bytearray(_header(source, read_gguf_file(source).header_bytes))
    for offset, value, message in ((8, 2**62, "tensor count"), (16, 2**40, "metadata count")):
        data = bytearray(head)
        struct.pack_into("<Q", data, offset, value)
        path = tmp_path / "counts.gguf"
        path.write_bytes(bytes(data))
        with pytest.raises(GGUFError, match=message):
            read_gguf_file(path)
    path = tmp_path / "magic.gguf"
    path.write_bytes(b"GGML" + bytes(head[4:]))
    with pytest.raises(GGUFError, match="bad magic"):
        read_gguf_file(path)
    data = bytearray(head)
    struct.pack_into("<I", data, 4, 1)
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="version 1"):
        read_gguf_file(path)


def test_range_read_moves_only_the_header(range_server, ladder_model):
    source = ladder_model("F16")
    link_into(range_server.root, source)
    info = read_gguf_url(f"{range_server.url}/{source.name}")
    local = read_gguf_file(source)
    assert info.tensor_bytes == local.tensor_bytes and info.header_bytes == local.header_bytes
    assert range_server.served.body_bytes < source.stat().st_size / 50
    assert all(r.startswith("bytes=") for r in range_server.served.ranges)
    # The header (1.7 MiB) is larger than the first window, so the range had to grow.
    assert range_server.served.requests >= 2


def test_a_server_that_ignores_range_still_sends_only_a_window(range_server, ladder_model):
    source = ladder_model("Q2_K")
    link_into(range_server.root, source)
    range_server.faults.ignore_range = True
    info = read_gguf_header(f"{range_server.url}/{source.name}")
    assert info.tensor_bytes == read_gguf_file(source).tensor_bytes
    # The server saw the client hang up: what it wrote is the window plus at most the socket
    # buffers, a small part of the 84 MiB file.
    responses = range_server.wait_for_responses(range_server.served.requests)
    assert responses and all(r.status == 200 and not r.complete for r in responses), responses
    assert sum(r.sent for r in responses) < source.stat().st_size / 4, responses


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_or_missing_mirror_is_fetch_failed_not_a_hostile_header(range_server):
    """read_headers reports the first failure: an offline mirror once read as gguf_invalid."""
    for url in (f"{range_server.url}/missing.gguf", f"http://127.0.0.1:{_closed_port()}/m.gguf"):
        with pytest.raises(FetchError) as caught:
            read_gguf_url(url)
        assert caught.value.code == "fetch_failed" and not isinstance(caught.value, GGUFError), url


def test_bad_bytes_behind_a_url_are_gguf_errors(range_server, ladder_model):
    (range_server.root / "short.gguf").write_bytes(_header(ladder_model("Q2_K"), 5000))
    with pytest.raises(GGUFError, match="truncated|corrupt"):
        read_gguf_url(f"{range_server.url}/short.gguf")


# -- hostile headers (issue 10, finding 4): every one is gguf_invalid, cheap, and bounded --------

HOSTILE_BLOCK_COUNTS = [
    pytest.param(2**63, gguf_bytes.UINT64, id="2^63"),
    pytest.param(2**64 - 1, gguf_bytes.UINT64, id="2^64-1"),
    pytest.param(float("inf"), gguf_bytes.FLOAT32, id="inf"),
    pytest.param(float("nan"), gguf_bytes.FLOAT64, id="nan"),
    pytest.param(-1, gguf_bytes.INT32, id="negative"),
    pytest.param(300_000_000, gguf_bytes.UINT32, id="3e8"),
    pytest.param(2.5, gguf_bytes.FLOAT32, id="fraction"),
    pytest.param(True, gguf_bytes.BOOL, id="bool"),
]


@pytest.mark.parametrize(("block_count", "block_type"), HOSTILE_BLOCK_COUNTS)
def test_a_hostile_block_count_is_gguf_invalid(tmp_path: Path, range_server, block_count, block_type):
    header = gguf_bytes.llama(block_count, block_type=block_type)
    data = header.file(gguf_bytes.tensor_data_bytes(header))
    path = tmp_path / "evil.gguf"
    path.write_bytes(data)
    (range_server.root / "evil.gguf").write_bytes(data)
    for read in (lambda: read_gguf_file(path), lambda: read_gguf_url(f"{range_server.url}/evil.gguf")):
        with pytest.raises(GGUFError) as caught:
            read()
        assert caught.value.code == "gguf_invalid" and "block_count" in caught.value.message


def test_the_crafted_header_is_otherwise_valid(tmp_path: Path):
    """The hostile cases above differ from this one only in block_count."""
    header = gguf_bytes.llama(3)
    path = tmp_path / "ok.gguf"
    path.write_bytes(header.file(gguf_bytes.tensor_data_bytes(header)))
    info = read_gguf_file(path)
    assert (info.block_count, info.embedding_length, info.head_count, info.vocab_size) == (3, 64, 4, 8)
    assert len(info.layer_tensor_bytes) == 3 and all(info.layer_tensor_bytes)


def test_a_non_ascii_digit_in_a_tensor_name_is_not_a_layer(tmp_path: Path):
    # "²".isdigit() is True but int("²") raises: such a name once escaped as ValueError.
    header = gguf_bytes.llama(1)
    header.tensors[0].name = "blk.\u00b2.attn_q.weight"
    path = tmp_path / "digit.gguf"
    path.write_bytes(header.file(gguf_bytes.tensor_data_bytes(header)))
    info = read_gguf_file(path)
    assert info.other_tensor_bytes == info.tensors[0].nbytes


CHILD = r"""
import json, resource, sys, time
from agent.catalog.gguf import read_gguf_header
from agent.errors import FetchError, GGUFError

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

results = []
for source in sys.argv[1:]:
    before, cpu = status("VmRSS"), time.process_time()
    try:
        info = read_gguf_header(source)
        outcome = {"ok": True, "block_count": info.block_count}
    except GGUFError as exc:
        outcome = {"ok": False, "code": exc.code}
    # VmHWM: this process image's own peak (ru_maxrss would carry a parent's over exec).
    results.append({**outcome, "growth": status("VmHWM") - before, "cpu_s": time.process_time() - cpu})
print(json.dumps(results))
"""


def _read_in_child(*sources: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", CHILD, *sources], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_huge_block_count_in_a_tiny_file_costs_nothing(tmp_path: Path, range_server):
    """block_count 3e8 in a ~200-byte file once took 2.3 GiB and 5 s before failing."""
    header = gguf_bytes.llama(300_000_000, vocab=1)
    header.tensors = []
    data = header.file()
    assert len(data) < 400
    path = tmp_path / "tiny.gguf"
    path.write_bytes(data)
    (range_server.root / "tiny.gguf").write_bytes(data)
    for result in _read_in_child(str(path), f"{range_server.url}/tiny.gguf"):
        assert result["code"] == "gguf_invalid", result
        assert result["growth"] < 32 * MIB and result["cpu_s"] < 1.0, result


def test_a_120_mib_header_of_arrays_parses_in_bounded_memory(tmp_path: Path, range_server):
    """7,000 arrays of 4,096 uint32 each once grew the reader to 1.1 GiB RSS; a header that
    size is legal (under the 128 MiB cap), so it must parse, keeping what it can afford."""
    array = struct.pack("<IQ", gguf_bytes.UINT32, 4096) + struct.pack("<4096I", *range(1 << 20, (1 << 20) + 4096))
    extra = [gguf_bytes.Entry(f"junk.{i:05d}", gguf_bytes.ARRAY, None) for i in range(7600)]
    header = gguf_bytes.llama(2)
    entries = b"".join(gguf_bytes.Entry(e.key, e.type, e.value, e.item_type).encode() for e in header.entries)
    junk = b"".join(gguf_bytes.string(e.key) + struct.pack("<I", gguf_bytes.ARRAY) + array for e in extra)
    tensors = b"".join(t.encode() for t in header.tensors)
    body = b"GGUF" + struct.pack("<IQQ", 3, len(header.tensors), len(header.entries) + len(extra))
    body += entries + junk + tensors
    body += b"\0" * (-len(body) % 32) + b"\0" * gguf_bytes.tensor_data_bytes(header)
    assert len(body) > 118 * MIB
    path = range_server.root / "arrays.gguf"
    path.write_bytes(body)
    range_server.served.body_bytes = 0
    results = _read_in_child(str(path), f"{range_server.url}/arrays.gguf")
    for result in results:
        assert result["ok"] and result["block_count"] == 2, result
        assert result["growth"] < 160 * MIB, result
    # One pass: each header byte crossed the network once (plus the last window's tail).
    assert range_server.served.body_bytes < len(body) + 20 * MIB


def test_a_daemon_pointed_at_a_hostile_header_reports_gguf_invalid_and_keeps_serving(
    tmp_path: Path, broker, range_server, ladder_dir
):
    """The header is read by HTTP Range from a mirror before any sha256 check: block_count
    2^63 there once killed `edge-agent run` (OverflowError), and systemd gave up on the unit."""
    header = gguf_bytes.llama(2**63, block_type=gguf_bytes.UINT64)
    data = header.file(gguf_bytes.tensor_data_bytes(header))
    (range_server.root / "evil.gguf").write_bytes(data)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"schema": 1, "models": [{"id": "evil", "variants": [{
        "quant": "Q4_K_M", "file": "evil.gguf", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "urls": [f"{range_server.url}/evil.gguf"], "quality": 0.9}]}]}))
    sign_file(manifest)
    daemon = RunningDaemon(tmp_path / "d", broker, ladder_dir, model={"manifest": str(manifest)})
    observers = Observers(broker)
    try:
        observer = observers.connect(f"{BASE}/events", f"{BASE}/cmd/result", "evil/r")
        daemon.start()
        wait_ready(daemon)
        event = observer.wait_for(lambda m: json.loads(m.payload).get("event") == "model_unavailable", timeout=60)
        assert json.loads(event.payload)["error"]["code"] == "gguf_invalid"
        assert any("STATUS=degraded (gguf_invalid" in n for n in daemon.read_notifications())
        # Still serving: a prompt is answered no_model, a reload answers the header's error.
        observer.publish(f"{BASE}/prompt", json.dumps({"id": "p1", "prompt": "hi", "reply_to": "evil/r"}).encode())
        assert wait_final(observer, "evil/r")["error"]["code"] == "no_model"
        observer.publish(f"{BASE}/cmd", json.dumps({"id": "c1", "op": "reload"}).encode())
        result = json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/cmd/result", timeout=60).payload)
        assert result["ok"] is False and result["error"]["code"] == "gguf_invalid"
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
    finally:
        observers.close()
        daemon.close()


def _tensor_table(count: int) -> bytes:
    """A valid llama file whose tensor table holds ``count`` entries as costly to keep as an
    entry can be: 63-byte names, four dimensions, dims and offset too large for Python's
    small-int cache (each is its own object). Shapes hold a 0, so no tensor needs data."""
    header = gguf_bytes.llama(2)
    header.tensors += [
        gguf_bytes.Tensor(f"blk.{i}.".ljust(63, "x"), (1024, 1024, 1024, 0), offset=1024)
        for i in range(count - len(header.tensors))
    ]
    return header.file(max(gguf_bytes.tensor_data_bytes(header), 1024))


def test_the_largest_tensor_table_allowed_parses_in_bounded_memory_and_time(range_server):
    """200,000 tensor entries (18 MiB of header) once grew the reader by ~80 MiB over 10 s,
    and 1M were allowed; the table is now capped and charged to the kept-bytes budget."""
    (range_server.root / "table.gguf").write_bytes(_tensor_table(MAX_TENSORS))
    (range_server.root / "over.gguf").write_bytes(_tensor_table(MAX_TENSORS + 1))
    sources = [f"{where}/{name}.gguf" for name in ("table", "over")
               for where in (range_server.root, range_server.url)]
    results = _read_in_child(*sources)
    assert all(r["ok"] and r["block_count"] == 2 for r in results[:2]), results
    assert all(r.get("code") == "gguf_invalid" for r in results[2:]), results
    for result in results:
        assert result["growth"] < 64 * MIB and result["cpu_s"] < 2.0, result
