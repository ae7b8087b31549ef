"""GGUF header reader: real ladder files, truncated and corrupt copies, HTTP Range reads."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agent.catalog.gguf import read_gguf_file, read_gguf_header, read_gguf_url
from agent.errors import GGUFError
from tests.support.range_server import link_into

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
    # (The server's counter cannot show the cut: it keeps writing into a closed socket.)


def test_url_errors_are_gguf_errors(range_server, tmp_path: Path, ladder_model):
    with pytest.raises(GGUFError, match="HTTP 404"):
        read_gguf_url(f"{range_server.url}/missing.gguf")
    (range_server.root / "short.gguf").write_bytes(_header(ladder_model("Q2_K"), 5000))
    with pytest.raises(GGUFError, match="truncated|corrupt"):
        read_gguf_url(f"{range_server.url}/short.gguf")
