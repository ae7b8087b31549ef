"""Read the metadata and tensor table of a GGUF file without loading its tensors.

The source is a local path or an http(s) URL. For a URL only header bytes travel: the
reader asks for a first window with an HTTP Range request and, each time the parser needs
bytes past it, for the next window (twice as large, up to MAX_WINDOW_BYTES), so a 4 GB model
costs a few hundred KiB to inspect. A server that ignores Range is read as one stream and
dropped as soon as the header is parsed.

Parsing is one pass over a small sliding buffer: every byte is fetched and looked at once,
what is not kept (token tables, merges, oversized values) is skipped without being built,
and what is kept (metadata values, keys, tensor entries) is charged to a byte budget, so
memory stays bounded whatever the header claims. Headers come from unverified mirrors
before any sha256 check, so every length and count is checked against the bytes the file
can still hold before anything is allocated or looped over, every number the estimator
uses is bounded to a sane range and must be finite, and every bad header is a GGUFError
(``gguf_invalid``); a mirror that cannot be reached is a FetchError (``fetch_failed``).
This module does not decide anything about memory; the estimator (agent.catalog.estimate)
turns a GGUFInfo into bytes.

A model split by llama.cpp's gguf-split (``<prefix>-00001-of-00003.gguf`` …) keeps its
metadata in the first part and spreads its tensors over all of them; every part carries
``split.no``, ``split.count`` and ``split.tensors.count``. Each part is parsed on its own
(GGUFPart) and ``merge_split`` checks that the parts form one whole set before it makes one
GGUFInfo of them, so the estimator sees every tensor. The whole-model readers
(``read_gguf_file``/``read_gguf_url``) given a first part read the others beside it by name,
where llama.cpp looks for them too.

httpx is allowed here (the GGUF range reader is one of the two network boundaries). It is
imported when a URL is read, not with this module: a daemon whose model is on disk never
needs it, and it costs the daemon's idle footprint about 4 MiB.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

import msgspec

from agent.errors import EdgeAgentError, FetchError, GGUFError, shown
from agent.log import get_logger

if TYPE_CHECKING:
    import httpx

log = get_logger(__name__)

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
FIRST_WINDOW_BYTES = 256 * 1024
MAX_WINDOW_BYTES = 16 * 1024 * 1024
FILE_READ_BYTES = 1024 * 1024
# Real headers are a few MiB at most (a 256k-token vocabulary with merges); anything
# beyond this is corrupt or hostile and is not worth the bytes.
MAX_HEADER_BYTES = 128 * 1024 * 1024
# Small numeric arrays are kept (per-layer head counts, sliding-window patterns); big
# ones (token scores, types) are only counted.
KEPT_ARRAY_ITEMS = 4096
# Strings past this (no architecture key or chat template comes close) are only counted.
KEPT_STRING_BYTES = 1024 * 1024
# What the kept metadata may cost in Python objects, all values together; past it, values
# are counted, not kept. Real headers keep well under 1 MiB.
KEPT_BYTES_BUDGET = 32 * 1024 * 1024
KEPT_KEYS_RESERVE = 8 * 1024 * 1024
# Counts no real model comes near: the largest have ~60 keys and a few thousand tensors
# (a 405B llama has ~1,100, a 671B MoE ~1,800). Kept tensor entries are charged to the
# same budget as metadata (this many cost 24 MiB of it).
MAX_METADATA_KEYS = 65536
MAX_TENSORS = 65536
# A kept tensor entry: the TensorInfo, its name, its shape tuple and, at worst, an int
# object for each dimension, the offset and the byte count.
TENSOR_COST = 384
MAX_KEY_BYTES = 65535  # the GGUF spec's limit
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME - 1: llama.cpp refuses longer names
MAX_ALIGNMENT = 1 << 24
MAX_ELEMENTS = (1 << 63) - 1  # ggml counts elements and bytes in int64
# Sane maxima for the architecture numbers the estimator multiplies together: an order of
# magnitude past the largest published models, far below what would make the estimator
# allocate or overflow (per-layer lists are block_count long).
ARCH_LIMITS = {
    "block_count": (1, 4096),
    "embedding_length": (1, 1 << 20),
    "feed_forward_length": (0, 1 << 22),
    "attention.head_count": (0, 1 << 14),
    "attention.head_count_kv": (0, 1 << 14),
    "attention.key_length": (0, 1 << 16),
    "attention.value_length": (0, 1 << 16),
    "context_length": (0, 1 << 26),
    "vocab_size": (0, 1 << 24),
    "attention.sliding_window": (0, 1 << 26),
}
_ARCH_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DIGITS = re.compile(r"[0-9]{1,20}")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)")
# llama.cpp's split naming (llama_split_path: "%s-%05d-of-%05d.gguf"), numbered from 1.
_SPLIT_NAME = re.compile(r"(.+)-([0-9]{5})-of-([0-9]{5})\.gguf")
# Published splits have a few dozen parts at most (a 671B model at F16 is ~30 x 48 GB);
# the bound keeps the per-part header reads and the manifest's part lists small.
MAX_SPLIT_PARTS = 256
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

# ggml_type id -> (name, elements per block, bytes per block); ggml/src/ggml-common.h.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

# GGUF metadata value types: id -> struct format of one fixed-size value.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_TYPE_OFFSET = struct.Struct("<IQ")
_DIMS = [struct.Struct(f"<{n}Q") for n in range(5)]
# The longest tensor entry: name length and name, n_dims, four dims, type and offset.
_TENSOR_ENTRY_MAX = 8 + MAX_TENSOR_NAME_BYTES + 4 + 4 * 8 + 4 + 8


class TensorInfo(msgspec.Struct, frozen=True):
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def layer(self) -> int | None:
        """Block index for ``blk.<n>.…`` tensors, None for the rest (embeddings, output)."""
        parts = self.name.split(".")
        # isascii: str.isdigit() also accepts "²", which int() refuses.
        if len(parts) > 2 and parts[0] == "blk" and parts[1].isascii() and parts[1].isdigit():
            return int(parts[1])
        return None


class ArrayInfo(msgspec.Struct, frozen=True):
    """A metadata array too large (or too stringy) to keep: its item type and length."""

    item_type: int
    count: int


class StringInfo(msgspec.Struct, frozen=True):
    """A metadata string too long to keep: its length in bytes."""

    length: int


class GGUFInfo(msgspec.Struct, kw_only=True):
    version: int
    architecture: str
    block_count: int
    embedding_length: int
    feed_forward_length: int  # 0 when the writer did not say (the estimator then assumes 4x)
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    context_length: int
    vocab_size: int
    sliding_window: int | None
    file_type: int | None  # general.file_type (llama_ftype), when the writer set it
    n_tensors: int
    header_bytes: int  # start of the tensor data: what a header read must fetch
    alignment: int
    layer_tensor_bytes: list[int]  # per block, all tensors named blk.<n>.*
    other_tensor_bytes: int  # token embedding, output head, final norm …
    tensors: list[TensorInfo]
    # scalars, strings and small arrays; large ones as ArrayInfo / StringInfo
    metadata: dict[str, Any]
    split_count: int = 1  # files the tensors are spread over (llama.cpp's split.count)

    @property
    def tensor_bytes(self) -> int:
        return sum(self.layer_tensor_bytes) + self.other_tensor_bytes


class SplitInfo(msgspec.Struct, frozen=True):
    """One part's place in a split model: llama.cpp's ``split.*`` keys."""

    no: int  # 0-based, as in split.no (the file name counts from 1)
    count: int
    tensors_count: int  # tensors in all the parts together


class GGUFPart(msgspec.Struct, kw_only=True):
    """One file as parsed, before it is known to be a whole model (a split's later parts
    hold tensors and the split keys only)."""

    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    header_bytes: int
    alignment: int
    split: SplitInfo | None  # None: not a split part


def split_name(name: str) -> tuple[str, int, int] | None:
    """(prefix, number from 1, count) of a llama.cpp split file name, else None."""
    match = _SPLIT_NAME.fullmatch(name)
    if match is None:
        return None
    number, count = int(match.group(2)), int(match.group(3))
    if not 1 <= number <= count:
        return None
    return match.group(1), number, count


def split_part_name(prefix: str, number: int, count: int) -> str:
    """The file name llama.cpp opens for part ``number`` (from 1) of ``count``."""
    return f"{prefix}-{number:05d}-of-{count:05d}.gguf"


class _Source(Protocol):
    """The file's bytes in order, from offset 0; ``size`` once known (None: not said)."""

    size: int | None

    def read(self, hint: int) -> bytes:
        """The next bytes (about ``hint``, maybe more); b"" at the end of the file."""
        ...


class _BytesSource:
    def __init__(self, data: bytes, size: int | None) -> None:
        self._data: bytes | None = data
        self.size = size

    def read(self, hint: int) -> bytes:
        data, self._data = self._data or b"", None
        return data


class _FileSource:
    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f = f
        self.size = size

    def read(self, hint: int) -> bytes:
        return self._f.read(max(hint, FILE_READ_BYTES))


class _Cursor:
    """Reads little-endian GGUF values from a source through a small sliding buffer.

    ``pos`` is the file offset of the next byte. Bytes already consumed are dropped, so the
    buffer holds about one read, never the header."""

    def __init__(self, source: _Source) -> None:
        self._source = source
        self._buf = bytearray()
        self._at = 0  # index in _buf of the byte at ``pos``
        self.pos = 0
        self.kept_budget = KEPT_BYTES_BUDGET

    def _limit(self) -> int:
        size = self._source.size
        return MAX_HEADER_BYTES if size is None else min(size, MAX_HEADER_BYTES)

    def _check_end(self, n: int, what: str) -> None:
        end = self.pos + n
        size = self._source.size
        if size is not None and end > size:
            raise GGUFError(
                f"{what} at offset {self.pos} needs {n} bytes but the file ends at {size}: "
                "truncated or corrupt",
                offset=self.pos,
            )
        if end > MAX_HEADER_BYTES:
            raise GGUFError(
                f"header would exceed {MAX_HEADER_BYTES} bytes ({what} at offset {self.pos}): "
                "corrupt file",
                offset=self.pos,
            )

    def _fill(self, n: int, what: str) -> None:
        """Make ``n`` bytes from ``pos`` available in the buffer."""
        while len(self._buf) - self._at < n:
            if self._at:
                del self._buf[: self._at]  # what was consumed is never looked at again
                self._at = 0
            chunk = self._source.read(n - len(self._buf))
            if not chunk:
                raise GGUFError(
                    f"{what} at offset {self.pos}: the file ends inside its header: truncated",
                    offset=self.pos,
                )
            self._buf += chunk

    def take(self, n: int, what: str) -> bytes:
        self._check_end(n, what)
        self._fill(n, what)
        view = bytes(self._buf[self._at : self._at + n])
        self._at += n
        self.pos += n
        return view

    def skip(self, n: int, what: str) -> None:
        """Step over ``n`` bytes without keeping them (only what one read brings is held)."""
        self._check_end(n, what)
        while n:
            if self._at == len(self._buf):
                self._fill(1, what)
            step = min(n, len(self._buf) - self._at)
            self._at += step
            self.pos += step
            n -= step

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size, what))[0]

    def count(self, item_bytes: int, what: str, maximum: int | None = None) -> int:
        """A uint64 count, rejected when that many items cannot fit in what is left."""
        start = self.pos
        n = self.scalar("Q", what)
        left = max(self._limit() - self.pos, 0)
        if n * item_bytes > left:
            raise GGUFError(
                f"{what} at offset {start} is {n}, more than the {left} bytes left: corrupt file",
                offset=start,
            )
        if maximum is not None and n > maximum:
            raise GGUFError(f"{what} at offset {start} is {n}, over {maximum}: corrupt file", offset=start)
        return n

    def text(self, n: int, what: str) -> str:
        start = self.pos
        raw = self.take(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{what} at offset {start} is not UTF-8", offset=start) from exc

    def string(self, what: str, maximum: int) -> str:
        return self.text(self.count(1, f"{what} length", maximum), what)

    @property
    def size(self) -> int | None:
        return self._source.size

    def skip_strings(self, n: int, what: str) -> None:
        """Step over ``n`` length-prefixed strings (a token table: the hot loop of a header)."""
        limit = self._limit()
        unpack = _U64.unpack_from
        for index in range(n):
            have = len(self._buf) - self._at
            if have >= 8:
                step = 8 + unpack(self._buf, self._at)[0]
                if step <= have and self.pos + step <= limit:
                    self._at += step
                    self.pos += step
                    continue
            self.skip(self.count(1, f"{what}[{index}] length"), what)

    def tensor_entry(self, index: int) -> tuple[str, tuple[int, ...], int, int]:
        """One tensor entry: name, shape, ggml type, offset (the hot loop of a tensor table).

        Straight from the buffer when a whole entry is there and sane; the checked reads
        below only run at a buffer's end or to word an error."""
        buf, at = self._buf, self._at
        if len(buf) - at >= _TENSOR_ENTRY_MAX:
            n = _U64.unpack_from(buf, at)[0]
            if n <= MAX_TENSOR_NAME_BYTES:
                dims_at = at + 12 + n
                n_dims = _U32.unpack_from(buf, dims_at - 4)[0]
                step = 24 + n + 8 * n_dims
                if 1 <= n_dims <= 4 and self.pos + step <= self._limit():
                    try:
                        name = str(buf[at + 8 : at + 8 + n], "utf-8")
                    except UnicodeDecodeError:
                        pass  # the checked read below says where
                    else:
                        shape = _DIMS[n_dims].unpack_from(buf, dims_at)
                        ggml_type, offset = _TYPE_OFFSET.unpack_from(buf, dims_at + 8 * n_dims)
                        self._at += step
                        self.pos += step
                        return name, shape, ggml_type, offset
        name = self.string(f"tensor[{index}] name", MAX_TENSOR_NAME_BYTES)
        n_dims = self.scalar("I", f"{name} dims")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (1..4 allowed)", tensor=name)
        shape = tuple(self.scalar("Q", f"{name} shape") for _ in range(n_dims))
        return name, shape, self.scalar("I", f"{name} type"), self.scalar("Q", f"{name} offset")

    def keep(self, cost: int, *, key: bool = False) -> bool:
        """Charge ``cost`` bytes of kept Python objects to the budget; False when it is spent.
        Values leave a reserve for keys, so big values make later ones counted, not the
        header refused."""
        if cost > self.kept_budget - (0 if key else KEPT_KEYS_RESERVE):
            return False
        self.kept_budget -= cost
        return True


def _read_value(cur: _Cursor, value_type: int, key: str) -> Any:
    """One metadata value; ``key`` (already cut short) is only for messages."""
    if value_type in _SCALARS:
        return cur.scalar(_SCALARS[value_type], key)
    if value_type == _STRING:
        n = cur.count(1, f"{key} length")
        if n <= KEPT_STRING_BYTES and cur.keep(64 + n):
            return cur.text(n, key)
        cur.skip(n, key)
        return StringInfo(n)
    if value_type != _ARRAY:
        raise GGUFError(f"metadata {key!r} has unknown value type {value_type}", key=key)
    item_type = cur.scalar("I", f"{key} item type")
    if item_type in _SCALARS:
        fmt = _SCALARS[item_type]
        item_size = struct.calcsize("<" + fmt)
        n = cur.count(item_size, f"{key} length")
        # A kept item costs a list slot and, at worst, its own int or float object.
        if n <= KEPT_ARRAY_ITEMS and cur.keep(64 + 40 * n):
            return list(struct.unpack(f"<{n}{fmt}", cur.take(n * item_size, key)))
        cur.skip(n * item_size, key)
        return ArrayInfo(item_type, n)
    if item_type == _STRING:
        n = cur.count(8, f"{key} length")  # each string costs at least its 8-byte length
        cur.skip_strings(n, key)
        return ArrayInfo(item_type, n)
    # Nested arrays exist in the spec but no writer uses them; refusing keeps the walk bounded.
    raise GGUFError(f"metadata {key!r} is an array of type {item_type}, not supported", key=key)


def _parse(cur: _Cursor) -> GGUFPart:
    if cur.take(4, "magic") != MAGIC:
        raise GGUFError("not a GGUF file (bad magic)")
    version = cur.scalar("I", "version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and version >> 16 in SUPPORTED_VERSIONS:
            raise GGUFError("big-endian GGUF files are not supported", version=version)
        raise GGUFError(f"GGUF version {version} is not supported (2 or 3)", version=version)
    # Minimum sizes on disk: a tensor entry is at least 8+4+4+8 bytes, a key/value 8+4+1.
    n_tensors = cur.count(24, "tensor count", MAX_TENSORS)
    n_kv = cur.count(13, "metadata count", MAX_METADATA_KEYS)
    metadata: dict[str, Any] = {}
    for index in range(n_kv):
        key = cur.string(f"metadata[{index}] key", MAX_KEY_BYTES)
        if not cur.keep(64 + len(key), key=True):
            raise GGUFError(f"metadata keys exceed {KEPT_BYTES_BUDGET} bytes: corrupt file")
        label = key if len(key) <= 80 else shown(key)  # keys go into messages
        value_type = cur.scalar("I", f"{label} type")
        metadata[key] = _read_value(cur, value_type, label)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment {shown(alignment)} is not a power of two up to {MAX_ALIGNMENT}")

    tensors = []
    for index in range(n_tensors):
        # key=True: the reserve held for metadata keys is free once the keys have ended.
        if not cur.keep(TENSOR_COST, key=True):
            raise GGUFError(f"the tensor table exceeds {KEPT_BYTES_BUDGET} kept bytes: corrupt")
        tensors.append(_tensor(*cur.tensor_entry(index), alignment))
    header_bytes = -(-cur.pos // alignment) * alignment

    # Offsets count from the data section, which starts only once the table has ended.
    limit = MAX_ELEMENTS if cur.size is None else cur.size
    for tensor in tensors:
        end = header_bytes + tensor.offset + tensor.nbytes
        if end > limit:
            raise GGUFError(
                f"tensor {tensor.name!r} ends at {end}, past the end of the "
                f"{cur.size if cur.size is not None else 'largest possible'}-byte file: truncated",
                tensor=tensor.name,
            )
    return GGUFPart(version=version, metadata=metadata, tensors=tensors, header_bytes=header_bytes,
                    alignment=alignment, split=_split_of(metadata))


def _split_of(metadata: dict[str, Any]) -> SplitInfo | None:
    """The split keys, bounded; None when the file is not a part of a split."""
    values = [metadata.get(key) for key in SPLIT_KEYS]
    if all(value is None for value in values):
        return None
    for key, value in zip(SPLIT_KEYS, values):
        if type(value) is not int or value < 0:
            raise GGUFError(f"{key} is {shown(value)}, not a count (a whole number from 0): "
                            "corrupt split part", key=key)
    no, count, tensors_count = values
    if not 0 <= no < count <= MAX_SPLIT_PARTS:
        raise GGUFError(f"split.no {no} of split.count {count} is outside "
                        f"0..{MAX_SPLIT_PARTS - 1}: corrupt split part", key="split.no")
    if tensors_count > MAX_TENSORS:
        raise GGUFError(f"split.tensors.count {tensors_count} is over {MAX_TENSORS}: corrupt file",
                        key="split.tensors.count")
    return SplitInfo(no=no, count=count, tensors_count=tensors_count)


def merge_split(parts: list[GGUFPart], label: str = "model") -> GGUFInfo:
    """One GGUFInfo of a model from its parts in order (one part: an unsplit file).

    The parts must be one whole set: each says it is part i of len(parts), they agree on
    the tensor count, hold that many tensors together, and no tensor name repeats."""
    first = parts[0]
    if first.split is None or first.split.count == 1:
        if len(parts) != 1:
            raise GGUFError(f"{label}: the first file is not a split part, "
                            f"{len(parts) - 1} more were given")
        return _info(first.version, first.metadata, first.tensors, first.header_bytes,
                     first.alignment)
    count, tensors_count = first.split.count, first.split.tensors_count
    if len(parts) != count:
        raise GGUFError(f"{label}: a split of {count} parts, {len(parts)} given", parts=len(parts))
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for index, part in enumerate(parts):
        if part.split is None or part.split.no != index or part.split.count != count:
            said = "not a split part" if part.split is None else \
                f"part {part.split.no + 1} of {part.split.count}"
            raise GGUFError(f"{label}: file {index + 1} of the split says it is {said}",
                            part=index + 1)
        if part.split.tensors_count != tensors_count:
            raise GGUFError(f"{label}: part {index + 1} says the split has "
                            f"{part.split.tensors_count} tensors, part 1 says {tensors_count}",
                            part=index + 1)
        for tensor in part.tensors:
            if tensor.name in names:
                raise GGUFError(f"{label}: tensor {tensor.name!r} is in two parts",
                                tensor=tensor.name)
            names.add(tensor.name)
        tensors += part.tensors
        if len(tensors) > tensors_count:
            break  # refused below, before later parts add more
    if len(tensors) != tensors_count:
        raise GGUFError(f"{label}: the parts hold {len(tensors)} tensors, split.tensors.count says "
                        f"{tensors_count}", tensors=len(tensors))
    info = _info(first.version, first.metadata, tensors, first.header_bytes, first.alignment)
    info.split_count = count
    return info


def _tensor(
    name: str, shape: tuple[int, ...], ggml_type: int, offset: int, alignment: int
) -> TensorInfo:
    if ggml_type not in GGML_TYPES:
        raise GGUFError(f"tensor {name!r} has unknown ggml type {ggml_type}", tensor=name)
    _, block, block_bytes = GGML_TYPES[ggml_type]
    elements = 1
    for dim in shape:
        elements *= dim
    if elements > MAX_ELEMENTS:
        raise GGUFError(f"tensor {name!r} of shape {shape} has more elements than int64 holds", tensor=name)
    if shape[0] % block:
        raise GGUFError(
            f"tensor {name!r} row of {shape[0]} is not a multiple of the {block}-element block",
            tensor=name,
        )
    if offset % alignment:
        raise GGUFError(f"tensor {name!r} offset {offset} is not a multiple of {alignment}", tensor=name)
    return TensorInfo(name, shape, ggml_type, offset, elements // block * block_bytes)


def _arch_number(metadata: dict[str, Any], arch: str, key: str, default: int | None = None) -> int | None:
    """``{arch}.{key}`` as a bounded int; a per-layer list gives its largest item."""
    full = f"{arch}.{key}"
    value = metadata.get(full)
    low, high = ARCH_LIMITS[key]
    items = value if isinstance(value, list) else [value]
    numbers = []
    for item in items:
        if item is None:
            continue
        # bool is an int to Python, not to GGUF; floats must be finite whole numbers.
        if type(item) is float and math.isfinite(item) and item.is_integer():
            item = int(item)
        if type(item) is not int:
            raise GGUFError(f"{full} is {shown(value)}, not a whole number", key=full)
        if not low <= item <= high:
            raise GGUFError(f"{full} is {item}, outside {low}..{high}: corrupt file", key=full)
        numbers.append(item)
    return max(numbers) if numbers else default


def _architecture(metadata: dict[str, Any]) -> str:
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError("general.architecture is missing")
    if not _ARCH_NAME.fullmatch(arch):
        raise GGUFError(f"general.architecture {shown(arch)} is not an architecture name")
    return arch


def _tensor_bytes_by_layer(tensors: list[TensorInfo], block_count: int) -> tuple[list[int], int]:
    """Bytes of each block's tensors, and of the rest (embeddings, output, norms)."""
    per_layer = [0] * block_count
    other = 0
    for tensor in tensors:
        layer = tensor.layer
        if layer is not None and layer < block_count:
            per_layer[layer] += tensor.nbytes
        else:
            other += tensor.nbytes
    return per_layer, other


def _info(
    version: int, metadata: dict[str, Any], tensors: list[TensorInfo], header_bytes: int, alignment: int
) -> GGUFInfo:
    arch = _architecture(metadata)

    def number(key: str, default: int | None = None) -> int | None:
        return _arch_number(metadata, arch, key, default)

    def required(key: str) -> int:
        value = number(key)
        if value is None:
            raise GGUFError(f"{arch}.{key} is missing", key=f"{arch}.{key}")
        return value

    block_count = required("block_count")
    embedding_length = required("embedding_length")
    head_count = required("attention.head_count")
    head_count_kv = number("attention.head_count_kv", head_count) or head_count
    head_dim = embedding_length // head_count if head_count else 0
    tokens = metadata.get("tokenizer.ggml.tokens")
    token_count = tokens.count if isinstance(tokens, ArrayInfo) else len(tokens) if isinstance(tokens, list) else 0
    vocab_size = number("vocab_size") or token_count
    if vocab_size > ARCH_LIMITS["vocab_size"][1]:
        raise GGUFError(f"tokenizer.ggml.tokens has {vocab_size} entries: corrupt file")
    per_layer, other = _tensor_bytes_by_layer(tensors, block_count)
    file_type = metadata.get("general.file_type")
    return GGUFInfo(
        version=version,
        architecture=arch,
        block_count=block_count,
        embedding_length=embedding_length,
        feed_forward_length=number("feed_forward_length", 0) or 0,
        head_count=head_count,
        head_count_kv=head_count_kv,
        key_length=number("attention.key_length", head_dim) or head_dim,
        value_length=number("attention.value_length", head_dim) or head_dim,
        context_length=number("context_length", 0) or 0,
        vocab_size=vocab_size,
        sliding_window=number("attention.sliding_window"),
        file_type=file_type if type(file_type) is int and 0 <= file_type < 2**32 else None,
        n_tensors=len(tensors),
        header_bytes=header_bytes,
        alignment=alignment,
        layer_tensor_bytes=per_layer,
        other_tensor_bytes=other,
        tensors=tensors,
        metadata=metadata,
    )


def _parse_source(source: _Source, label: str) -> GGUFPart:
    """One pass over ``source``; whatever goes wrong is a GGUFError naming ``label``."""
    try:
        return _parse(_Cursor(source))
    except (struct.error, ValueError, OverflowError, MemoryError, RecursionError) as exc:
        # The checks above are meant to leave nothing for this; it is the last line, so a
        # header nobody foresaw still answers gguf_invalid instead of killing the caller.
        raise GGUFError(f"{label}: corrupt GGUF header ({type(exc).__name__})", source=label) from exc


def parse_part(data: bytes, file_size: int | None = None) -> GGUFPart:
    """Parse one file's header from its first bytes (pure), split part or not."""
    return _parse_source(_BytesSource(data, file_size), "header")


def parse_header(data: bytes, file_size: int | None = None) -> GGUFInfo:
    """Parse a GGUF header from the file's first bytes (pure). ``data`` ending before the
    header does is a GGUFError (truncated), like every other malformed header; so is a
    part of a split (its tensors are not all here)."""
    return merge_split([parse_part(data, file_size)], "header")


def read_gguf_part_file(path: str | os.PathLike[str]) -> GGUFPart:
    """One local file's header; reads only the header bytes."""
    try:
        with open(path, "rb") as f:
            return _parse_source(_FileSource(f, os.fstat(f.fileno()).st_size), str(path))
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read: {exc.strerror}", path=str(path)) from exc


def _with_siblings(first: GGUFPart, location: str, read: Any) -> GGUFInfo:
    """``first`` merged with the parts named beside it, read with ``read(sibling location)``."""
    if first.split is None or first.split.count == 1:
        return merge_split([first], location)
    name = location.rsplit("/", 1)[-1]
    parsed = split_name(name)
    where = f"part {first.split.no + 1} of {first.split.count} of a split model"
    if first.split.no != 0:
        raise GGUFError(f"{location}: {where}; give the first part", path=location)
    if parsed is None or parsed[1:] != (1, first.split.count):
        # llama.cpp finds the other parts by this name pattern, so neither can we.
        expected = split_part_name("<name>", 1, first.split.count)
        raise GGUFError(f"{location}: {where}, but not named as one ({expected})", path=location)
    prefix, _, count = parsed
    base = location[: len(location) - len(name)]
    parts = [first] + [read(base + split_part_name(prefix, n, count)) for n in range(2, count + 1)]
    return merge_split(parts, location)


def read_gguf_file(path: str | os.PathLike[str]) -> GGUFInfo:
    """The header of a local GGUF file; reads only the header bytes. The first part of a
    split brings the other parts' headers from beside it."""
    return _with_siblings(read_gguf_part_file(path), str(path), read_gguf_part_file)


class _HTTPSource:
    """The file behind a URL, window after window with Range requests (each byte asked
    once); a server that answers 200 (Range ignored) is read on as one stream."""

    def __init__(self, http: httpx.Client, url: str) -> None:
        self._http = http
        self._url = url
        self.size: int | None = None
        self.pos = 0  # file offset of the next byte this source returns
        self._window = FIRST_WINDOW_BYTES
        self._stream: httpx.Response | None = None  # the 200 answer being read on
        self._pieces: Any = None
        self._ended = False
        self.requests = 0

    def read(self, hint: int) -> bytes:
        if self._stream is not None:
            return self._read_stream()
        if self._ended or (self.size is not None and self.pos >= self.size):
            return b""
        want = max(hint, self._window)
        self._window = min(self._window * 2, MAX_WINDOW_BYTES)
        end = min(self.pos + want, MAX_HEADER_BYTES)
        if self.size is not None:
            end = min(end, self.size)
        if end <= self.pos:
            return b""
        return self._request(self.pos, end)

    def _request(self, start: int, end: int) -> bytes:
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        request = self._http.build_request("GET", self._url, headers=headers)
        response = self._http.send(request, stream=True)
        self.requests += 1
        if response.status_code == 416:
            response.close()
            self._ended = True
            return b""
        if response.status_code not in (200, 206):
            response.close()
            raise FetchError(f"{self._url}: HTTP {response.status_code}", url=self._url,
                             status=response.status_code)
        if response.status_code == 206:
            try:
                match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
                if match is None or int(match.group(1)) != start:
                    raise FetchError(f"{self._url}: the server sent another range than asked for",
                                     url=self._url)
                if self.size is None and match.group(3) != "*":
                    self.size = int(match.group(3))
                body = bytearray()
                for piece in response.iter_bytes():
                    body += piece[: end - start - len(body)]
                    if len(body) >= end - start:
                        break
            finally:
                response.close()  # closing mid-body drops the connection: the rest never travels
            if len(body) < end - start:
                self._ended = True  # the server had no more bytes
            self.pos += len(body)
            return bytes(body)
        # Range ignored: the body is the whole file from byte 0. Keep reading it as the
        # parser asks, dropping the bytes already had, instead of asking again from 0.
        length = response.headers.get("Content-Length", "")
        if self.size is None and _DIGITS.fullmatch(length):
            self.size = int(length)
        self._stream, self._pieces = response, response.iter_bytes()
        skip = start
        while skip:
            piece = self._next_piece()
            if not piece:
                return b""
            if len(piece) > skip:
                self.pos += len(piece) - skip
                return piece[skip:]
            skip -= len(piece)
        return self._read_stream()

    def _next_piece(self) -> bytes:
        try:
            return next(self._pieces)
        except StopIteration:
            return b""

    def _read_stream(self) -> bytes:
        if self.pos >= MAX_HEADER_BYTES:
            return b""
        piece = self._next_piece()
        self.pos += len(piece)
        return piece

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


def read_gguf_url(url: str, *, client: httpx.Client | None = None, timeout_s: float = 30.0) -> GGUFInfo:
    """The header of a GGUF file behind an http(s) URL, fetched with growing Range requests;
    the first part of a split brings the other parts' headers from beside it.

    A mirror that cannot be reached or answers an HTTP error is a FetchError (``fetch_failed``):
    callers try the next mirror, and only bytes that arrived and are wrong are ``gguf_invalid``."""

    def read(location: str) -> GGUFPart:
        return read_gguf_part_url(location, client=client, timeout_s=timeout_s)

    return _with_siblings(read(url), url, read)


def read_gguf_part_url(
    url: str, *, client: httpx.Client | None = None, timeout_s: float = 30.0
) -> GGUFPart:
    """One file's header behind an http(s) URL (see read_gguf_url)."""
    import httpx

    owned = client is None
    source: _HTTPSource | None = None
    try:
        http = client or httpx.Client(timeout=timeout_s, follow_redirects=True)
        try:
            source = _HTTPSource(http, url)
            part = _parse_source(source, url)
            log.debug("gguf_header_read", url=url, header_bytes=part.header_bytes,
                      fetched=source.pos, requests=source.requests)
            return part
        finally:
            if source is not None:
                source.close()
            if owned:
                http.close()
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise FetchError(f"{url}: cannot read the GGUF header: {exc}", url=url) from exc


def _is_url(text: str) -> bool:
    return urlparse(text).scheme in ("http", "https")


def read_gguf_header(source: str | os.PathLike[str]) -> GGUFInfo:
    """The header of a GGUF file from a local path or an http(s) URL."""
    text = str(source)
    if _is_url(text):
        return read_gguf_url(text)
    return read_gguf_file(Path(text))


def read_gguf_part(source: str) -> GGUFPart:
    """One file's header from a local path or an http(s) URL, split part or not."""
    return read_gguf_part_url(source) if _is_url(source) else read_gguf_part_file(source)


def read_gguf_split(part_sources: list[list[str]]) -> GGUFInfo:
    """A split model's header from its parts, each tried at its locations in order (a
    location that fails is logged and the next tried); raises the last failure of a part
    no location could give."""
    parts: list[GGUFPart] = []
    for index, sources in enumerate(part_sources):
        failure: EdgeAgentError | None = None
        for source in sources:
            try:
                parts.append(read_gguf_part(source))
                break
            except (GGUFError, FetchError) as exc:
                failure = exc
                log.warning("gguf_part_unreadable", part=index + 1, source=source,
                            error=exc.message)
        else:
            raise failure or GGUFError(f"part {index + 1} of the split has no location",
                                       part=index + 1)
    return merge_split(parts, part_sources[0][0] if part_sources and part_sources[0] else "split")
