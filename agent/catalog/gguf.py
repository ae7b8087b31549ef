"""Read the metadata and tensor table of a GGUF file without loading its tensors.

The source is a local path or an http(s) URL. For a URL only header bytes travel: the
reader asks for a first window with an HTTP Range request and grows it (doubling) until
the whole header parsed, so a 4 GB model costs a few hundred KiB to inspect. A server that
ignores Range is read as a stream and dropped as soon as the window is full.

Hostile or broken input must not hurt the caller: every length and count is checked
against the bytes the file can still hold before anything is allocated or looped over,
the header is capped at MAX_HEADER_BYTES, and every failure is a GGUFError (truncated,
corrupt, unsupported version). This module does not decide anything about memory; the
estimator (agent.catalog.estimate) turns a GGUFInfo into bytes.

httpx is allowed here (the GGUF range reader is one of the two network boundaries).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import msgspec

from agent.errors import GGUFError
from agent.log import get_logger

log = get_logger(__name__)

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
FIRST_WINDOW_BYTES = 256 * 1024
# Real headers are a few MiB at most (a 256k-token vocabulary with merges); anything
# beyond this is corrupt or hostile and is not worth the memory.
MAX_HEADER_BYTES = 128 * 1024 * 1024
# Small numeric arrays are kept (per-layer head counts, sliding-window patterns); big
# ones (token scores, types) are only counted.
KEPT_ARRAY_ITEMS = 4096

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
        if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
            return int(parts[1])
        return None


class ArrayInfo(msgspec.Struct, frozen=True):
    """A metadata array too large (or too stringy) to keep: its item type and length."""

    item_type: int
    count: int


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
    metadata: dict[str, Any]  # scalars, strings and small arrays; large arrays as ArrayInfo

    @property
    def tensor_bytes(self) -> int:
        return sum(self.layer_tensor_bytes) + self.other_tensor_bytes


class _NeedMore(Exception):
    """The window ended inside the header; ``needed`` is how far parsing had to reach."""

    def __init__(self, needed: int) -> None:
        self.needed = needed


class _Cursor:
    """Reads little-endian GGUF values from a window of the file's first bytes."""

    def __init__(self, data: bytes, file_size: int | None) -> None:
        self.data = memoryview(data)
        self.file_size = file_size
        self.pos = 0

    def _take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if self.file_size is not None and end > self.file_size:
            raise GGUFError(
                f"{what} at offset {self.pos} needs {n} bytes but the file ends at "
                f"{self.file_size}: truncated or corrupt",
                offset=self.pos,
            )
        if end > MAX_HEADER_BYTES:
            raise GGUFError(
                f"header would exceed {MAX_HEADER_BYTES} bytes ({what} at offset {self.pos}): "
                "corrupt file",
                offset=self.pos,
            )
        if end > len(self.data):
            raise _NeedMore(end)
        view = self.data[self.pos : end]
        self.pos = end
        return view

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self._take(size, what))[0]

    def count(self, item_bytes: int, what: str) -> int:
        """A uint64 count, rejected when that many items cannot fit in what is left."""
        start = self.pos
        n = self.scalar("Q", what)
        limit = (self.file_size if self.file_size is not None else MAX_HEADER_BYTES) - self.pos
        if n * item_bytes > max(limit, 0):
            raise GGUFError(
                f"{what} at offset {start} is {n}, more than the {limit} bytes left: corrupt file",
                offset=start,
            )
        return n

    def string(self, what: str) -> str:
        n = self.count(1, f"{what} length")
        raw = self._take(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{what} at offset {self.pos - n} is not UTF-8", offset=self.pos - n) from exc

    def skip_string(self, what: str) -> None:
        self._take(self.count(1, f"{what} length"), what)


def _read_value(cur: _Cursor, value_type: int, key: str) -> Any:
    if value_type in _SCALARS:
        return cur.scalar(_SCALARS[value_type], key)
    if value_type == _STRING:
        return cur.string(key)
    if value_type != _ARRAY:
        raise GGUFError(f"metadata {key!r} has unknown value type {value_type}", key=key)
    item_type = cur.scalar("I", f"{key} item type")
    if item_type in _SCALARS:
        item_size = struct.calcsize("<" + _SCALARS[item_type])
        n = cur.count(item_size, f"{key} length")
        raw = cur._take(n * item_size, key)
        if n <= KEPT_ARRAY_ITEMS:
            return list(struct.unpack(f"<{n}{_SCALARS[item_type]}", raw))
        return ArrayInfo(item_type, n)
    if item_type == _STRING:
        n = cur.count(8, f"{key} length")  # each string costs at least its 8-byte length
        for index in range(n):
            cur.skip_string(f"{key}[{index}]")
        return ArrayInfo(item_type, n)
    # Nested arrays exist in the spec but no writer uses them; refusing keeps the walk bounded.
    raise GGUFError(f"metadata {key!r} is an array of type {item_type}, not supported", key=key)


def parse_header(data: bytes, file_size: int | None = None) -> GGUFInfo:
    """Parse a GGUF header from the file's first bytes (pure).

    Raises GGUFError for a malformed header and the private _NeedMore when ``data`` ends
    before the header does but the file may hold the rest.
    """
    cur = _Cursor(data, file_size)
    if bytes(cur._take(4, "magic")) != MAGIC:
        raise GGUFError("not a GGUF file (bad magic)")
    version = cur.scalar("I", "version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and version >> 16 in SUPPORTED_VERSIONS:
            raise GGUFError("big-endian GGUF files are not supported", version=version)
        raise GGUFError(f"GGUF version {version} is not supported (2 or 3)", version=version)
    # Minimum sizes on disk: a tensor entry is at least 8+4+4+8 bytes, a key/value 8+4+1.
    n_tensors = cur.count(24, "tensor count")
    n_kv = cur.count(13, "metadata count")
    metadata: dict[str, Any] = {}
    for index in range(n_kv):
        key = cur.string(f"metadata[{index}] key")
        value_type = cur.scalar("I", f"{key} type")
        metadata[key] = _read_value(cur, value_type, key)

    tensors_raw = []
    for index in range(n_tensors):
        name = cur.string(f"tensor[{index}] name")
        n_dims = cur.scalar("I", f"{name} dims")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (1..4 allowed)", tensor=name)
        shape = tuple(cur.scalar("Q", f"{name} shape") for _ in range(n_dims))
        ggml_type = cur.scalar("I", f"{name} type")
        offset = cur.scalar("Q", f"{name} offset")
        tensors_raw.append((name, shape, ggml_type, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment {alignment!r} is not a power of two")
    header_bytes = -(-cur.pos // alignment) * alignment

    tensors = [_tensor(name, shape, t, off, file_size, header_bytes) for name, shape, t, off in tensors_raw]
    return _info(version, metadata, tensors, header_bytes, alignment)


def _tensor(
    name: str, shape: tuple[int, ...], ggml_type: int, offset: int, file_size: int | None, data_start: int
) -> TensorInfo:
    if ggml_type not in GGML_TYPES:
        raise GGUFError(f"tensor {name!r} has unknown ggml type {ggml_type}", tensor=name)
    _, block, block_bytes = GGML_TYPES[ggml_type]
    elements = 1
    for dim in shape:
        elements *= dim
    if shape[0] % block:
        raise GGUFError(
            f"tensor {name!r} row of {shape[0]} is not a multiple of the {block}-element block",
            tensor=name,
        )
    nbytes = elements // block * block_bytes
    if file_size is not None and data_start + offset + nbytes > file_size:
        raise GGUFError(
            f"tensor {name!r} ends at {data_start + offset + nbytes}, past the end of the "
            f"{file_size}-byte file: truncated",
            tensor=name,
        )
    return TensorInfo(name, shape, ggml_type, offset, nbytes)


def _info(
    version: int, metadata: dict[str, Any], tensors: list[TensorInfo], header_bytes: int, alignment: int
) -> GGUFInfo:
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError("general.architecture is missing")

    def number(key: str, default: int | None = None) -> int | None:
        value = metadata.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values (e.g. OpenELM head counts): the largest
            value = max(value) if value else default
        if value is not None and not isinstance(value, (int, float)):
            raise GGUFError(f"{arch}.{key} is {value!r}, not a number", key=f"{arch}.{key}")
        return int(value) if value is not None else None

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
    vocab_size = number("vocab_size") or (
        tokens.count if isinstance(tokens, ArrayInfo) else len(tokens) if isinstance(tokens, list) else 0
    )
    per_layer = [0] * block_count
    other = 0
    for tensor in tensors:
        layer = tensor.layer
        if layer is not None and layer < block_count:
            per_layer[layer] += tensor.nbytes
        else:
            other += tensor.nbytes
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
        file_type=file_type if isinstance(file_type, int) else None,
        n_tensors=len(tensors),
        header_bytes=header_bytes,
        alignment=alignment,
        layer_tensor_bytes=per_layer,
        other_tensor_bytes=other,
        tensors=tensors,
        metadata=metadata,
    )


def _grow(needed: int, have: int) -> int:
    return min(max(needed, have * 2, FIRST_WINDOW_BYTES), MAX_HEADER_BYTES)


def read_gguf_file(path: str | os.PathLike[str]) -> GGUFInfo:
    """The header of a local GGUF file; reads only the header bytes."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            data = f.read(min(FIRST_WINDOW_BYTES, file_size))
            while True:
                try:
                    return parse_header(data, file_size)
                except _NeedMore as more:
                    # file_size bounds every length, so the parser only asks for bytes the file has.
                    want = min(_grow(more.needed, len(data)), file_size)
                    data += f.read(want - len(data))
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read: {exc.strerror}", path=str(path)) from exc


def read_gguf_url(url: str, *, client: httpx.Client | None = None, timeout_s: float = 30.0) -> GGUFInfo:
    """The header of a GGUF file behind an http(s) URL, fetched with growing Range requests."""
    owned = client is None
    http = client or httpx.Client(timeout=timeout_s, follow_redirects=True)
    try:
        data = b""
        file_size: int | None = None
        want = FIRST_WINDOW_BYTES
        while True:
            asked = want - len(data)
            chunk, total = _fetch_range(http, url, len(data), want)
            file_size = total if total is not None else file_size
            data += chunk
            try:
                info = parse_header(data, file_size)
            except _NeedMore as more:
                if len(chunk) < asked:
                    # The server had no more bytes although the header goes on.
                    raise GGUFError(f"{url}: the file ends inside its header: truncated", url=url) from None
                want = _grow(more.needed, len(data))
                if file_size is not None:
                    want = min(want, file_size)
                continue
            log.debug("gguf_header_read", url=url, header_bytes=info.header_bytes, fetched=len(data))
            return info
    except httpx.HTTPError as exc:
        raise GGUFError(f"{url}: cannot read the GGUF header: {exc}", url=url) from exc
    finally:
        if owned:
            http.close()


def _fetch_range(http: httpx.Client, url: str, start: int, end: int) -> tuple[bytes, int | None]:
    """Bytes [start, end) of ``url`` and the file's total size when the server says it."""
    headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
    with http.stream("GET", url, headers=headers) as response:
        if response.status_code == 416:
            raise GGUFError(f"{url}: the file ends inside its header: truncated", url=url)
        if response.status_code not in (200, 206):
            raise GGUFError(f"{url}: HTTP {response.status_code}", url=url, status=response.status_code)
        total = None
        skip = 0
        if response.status_code == 206:
            content_range = response.headers.get("Content-Range", "")
            size = content_range.rpartition("/")[2]
            total = int(size) if size.isdigit() else None
        else:
            # Range ignored: the body is the whole file from byte 0; keep only what we asked.
            skip = start
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
        wanted = end - start
        parts: list[bytes] = []
        got = 0
        for piece in response.iter_bytes():
            if skip:
                dropped = min(skip, len(piece))
                piece, skip = piece[dropped:], skip - dropped
            parts.append(piece)
            got += len(piece)
            if got >= wanted:
                break  # leaving the block closes the stream: the rest never travels
        return b"".join(parts)[:wanted], total


def read_gguf_header(source: str | os.PathLike[str]) -> GGUFInfo:
    """The header of a GGUF file from a local path or an http(s) URL."""
    text = str(source)
    if urlparse(text).scheme in ("http", "https"):
        return read_gguf_url(text)
    return read_gguf_file(Path(text))
