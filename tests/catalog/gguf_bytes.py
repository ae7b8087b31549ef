"""GGUF bytes for tests, written and walked by this module alone (never by agent.catalog.gguf),
so tests can craft hostile headers and check the reader against an independent walk.

Format (GGUF v2/v3, little-endian): magic, version u32, tensor count u64, metadata count u64,
then ``key (u64 length + UTF-8), value type u32, value`` per metadata entry, then per tensor
``name, n_dims u32, dims u64…, ggml type u32, offset u64``, padded to the alignment.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
FORMATS = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f",
           BOOL: "?", UINT64: "Q", INT64: "q", FLOAT64: "d"}
F32_TYPE, Q8_0_TYPE = 0, 8  # ggml types: (elements per block, bytes per block) = (1, 4), (32, 34)


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def value(value_type: int, item: Any, item_type: int | None = None) -> bytes:
    """The bytes of one metadata value (without its type tag)."""
    if value_type == STRING:
        return string(item)
    if value_type == ARRAY:
        assert item_type is not None
        return struct.pack("<IQ", item_type, len(item)) + b"".join(value(item_type, x) for x in item)
    return struct.pack("<" + FORMATS[value_type], item)


@dataclass
class Entry:
    key: str
    type: int
    value: Any
    item_type: int | None = None

    def encode(self) -> bytes:
        tag = struct.pack("<I", self.type)
        return string(self.key) + tag + value(self.type, self.value, self.item_type)


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int = F32_TYPE
    offset: int = 0

    def encode(self) -> bytes:
        return (string(self.name) + struct.pack("<I", len(self.shape))
                + b"".join(struct.pack("<Q", d) for d in self.shape)
                + struct.pack("<IQ", self.ggml_type, self.offset))


@dataclass
class Header:
    entries: list[Entry] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    version: int = 3
    alignment: int = 32

    def encode(self, *, pad: bool = True) -> bytes:
        body = (b"GGUF" + struct.pack("<IQQ", self.version, len(self.tensors), len(self.entries))
                + b"".join(e.encode() for e in self.entries) + b"".join(t.encode() for t in self.tensors))
        return body + b"\0" * (-len(body) % self.alignment if pad else 0)

    def file(self, tensor_bytes: int = 0) -> bytes:
        """Header plus ``tensor_bytes`` of zero tensor data."""
        return self.encode() + b"\0" * tensor_bytes


def llama(block_count: Any = 2, *, block_type: int = UINT32, embedding: int = 64, heads: int = 4,
          heads_kv: int = 2, context: int = 256, vocab: int = 8, extra: list[Entry] | None = None) -> Header:
    """A small but complete llama header: the keys the reader needs, one F32 tensor per block
    plus the token embedding, laid out back to back."""
    entries = [
        Entry("general.architecture", STRING, "llama"),
        Entry("llama.block_count", block_type, block_count),
        Entry("llama.embedding_length", UINT32, embedding),
        Entry("llama.attention.head_count", UINT32, heads),
        Entry("llama.attention.head_count_kv", UINT32, heads_kv),
        Entry("llama.context_length", UINT32, context),
        Entry("tokenizer.ggml.tokens", ARRAY, [f"t{i}" for i in range(vocab)], STRING),
        *(extra or []),
    ]
    tensors = []
    offset = 0
    layers = block_count if isinstance(block_count, int) and 0 <= block_count <= 64 else 1
    for name in ["token_embd.weight", *(f"blk.{i}.attn_norm.weight" for i in range(layers))]:
        tensors.append(Tensor(name, (embedding,), F32_TYPE, offset))
        offset += -(-embedding * 4 // 32) * 32
    return Header(entries, tensors)


def tensor_data_bytes(header: Header) -> int:
    """Bytes the data section needs for the F32 tensors ``llama`` lays out."""
    return max((t.offset + 4 * _elements(t.shape) for t in header.tensors), default=0)


def _elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class Walked:
    """What an independent walk of real GGUF bytes found: raw entries and tensors."""

    version: int
    entries: list[tuple[str, int, bytes]]  # key, type, the value's encoded bytes
    tensors: list[bytes]  # each tensor entry's encoded bytes
    end: int  # offset after the tensor table (before padding)


def walk(data: bytes) -> Walked:
    """Split a GGUF header into its entries' bytes (no validation: test input is trusted)."""
    pos = 24
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)

    def skip_value(at: int, value_type: int) -> int:
        if value_type == STRING:
            return at + 8 + struct.unpack_from("<Q", data, at)[0]
        if value_type == ARRAY:
            item_type, n = struct.unpack_from("<IQ", data, at)
            at += 12
            if item_type in FORMATS:
                return at + n * struct.calcsize("<" + FORMATS[item_type])
            for _ in range(n):
                at = skip_value(at, item_type)
            return at
        return at + struct.calcsize("<" + FORMATS[value_type])

    entries = []
    for _ in range(n_kv):
        length = struct.unpack_from("<Q", data, pos)[0]
        key = data[pos + 8: pos + 8 + length].decode()
        pos += 8 + length
        value_type = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        end = skip_value(pos, value_type)
        entries.append((key, value_type, data[pos:end]))
        pos = end
    tensors = []
    for _ in range(n_tensors):
        start = pos
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        n_dims = struct.unpack_from("<I", data, pos)[0]
        pos += 4 + 8 * n_dims + 4 + 8
        tensors.append(data[start:pos])
    return Walked(version, entries, tensors, pos)


def shrunk(walked: Walked, keep_items: int = 16) -> bytes:
    """The same header with its string arrays (token table, merges) cut to ``keep_items``
    and other big arrays to as many: real keys and tensor table, a few KiB to parse."""
    out = []
    for key, value_type, raw in walked.entries:
        if value_type == ARRAY:
            item_type, n = struct.unpack_from("<IQ", raw, 0)
            if n > keep_items:
                if item_type == STRING:
                    items, at = [], 12
                    for _ in range(keep_items):
                        length = struct.unpack_from("<Q", raw, at)[0]
                        items.append(raw[at + 8: at + 8 + length])
                        at += 8 + length
                    raw = struct.pack("<IQ", item_type, keep_items) + b"".join(string(i) for i in items)
                else:
                    size = struct.calcsize("<" + FORMATS[item_type])
                    raw = struct.pack("<IQ", item_type, keep_items) + raw[12: 12 + keep_items * size]
        out.append(string(key) + struct.pack("<I", value_type) + raw)
    body = (b"GGUF" + struct.pack("<IQQ", walked.version, len(walked.tensors), len(out))
            + b"".join(out) + b"".join(walked.tensors))
    return body + b"\0" * (-len(body) % 32)
