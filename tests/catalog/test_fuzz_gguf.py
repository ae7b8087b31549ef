"""Property-based fuzzing of the GGUF header reader (issue 10, finding 4).

Headers come from unverified mirrors, so the reader must survive anything: no exception but
GGUFError (gguf_invalid), bounded CPU time and bounded Python memory per input. The oracle is
independent of the reader: headers are written by tests/catalog/gguf_bytes.py, valid ones must
parse back to what was written, ones with a defect put in on purpose must be gguf_invalid,
and mutations of a real ladder header may do either, but nothing else.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.catalog.gguf import MAX_TENSORS, ArrayInfo, GGUFInfo, parse_header
from agent.errors import GGUFError
from tests.catalog import gguf_bytes as gb
from tests.support.cpu import thread_cpu

MIB = 1024 * 1024
MAX_CPU_S = 0.5  # per input; real headers parse in tens of milliseconds
MAX_PEAK_BYTES = 64 * MIB  # per input, Python allocations (tracemalloc)


def fuzz(examples: int) -> settings:
    """Fixed inputs in CI (derandomized, no example database). The five fuzz tests below run
    7,500 inputs together; issue 10 asks for at least 5,000 per parser."""
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def traced():
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    yield
    if started:
        tracemalloc.stop()


def parse_bounded(data: bytes, file_size: int | None = None) -> GGUFInfo | GGUFError:
    """The reader's answer; fails the test on any other exception, or on time or memory."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    with thread_cpu() as spent:
        try:
            outcome: GGUFInfo | GGUFError = parse_header(data, file_size)
        except GGUFError as exc:
            outcome = exc
    if isinstance(outcome, GGUFError):
        assert outcome.code == "gguf_invalid" and len(outcome.message) < 1000
    assert spent.seconds < MAX_CPU_S
    assert tracemalloc.get_traced_memory()[1] - base < MAX_PEAK_BYTES
    return outcome


# -- values -----------------------------------------------------------------------------------

RANGES = {gb.UINT8: (0, 2**8 - 1), gb.INT8: (-(2**7), 2**7 - 1), gb.UINT16: (0, 2**16 - 1),
          gb.INT16: (-(2**15), 2**15 - 1), gb.UINT32: (0, 2**32 - 1), gb.INT32: (-(2**31), 2**31 - 1),
          gb.UINT64: (0, 2**64 - 1), gb.INT64: (-(2**63), 2**63 - 1)}


def scalar_of(value_type: int) -> st.SearchStrategy:
    if value_type in RANGES:
        return st.integers(*RANGES[value_type])
    if value_type == gb.FLOAT32:
        return st.floats(width=32)
    if value_type == gb.FLOAT64:
        return st.floats()
    if value_type == gb.BOOL:
        return st.booleans()
    return st.text(max_size=40)


scalar_types = st.sampled_from([*RANGES, gb.FLOAT32, gb.FLOAT64, gb.BOOL, gb.STRING])


@st.composite
def extra_entry(draw, index: int) -> gb.Entry:
    key = f"fuzz.{index}.{draw(st.text('abcxyz_.', max_size=8))}"
    if draw(st.booleans()):
        value_type = draw(scalar_types)
        return gb.Entry(key, value_type, draw(scalar_of(value_type)))
    item_type = draw(scalar_types)
    return gb.Entry(key, gb.ARRAY, draw(st.lists(scalar_of(item_type), max_size=20)), item_type)


@st.composite
def valid_header(draw) -> tuple[gb.Header, dict]:
    heads = draw(st.integers(1, 16))
    facts = {"block_count": draw(st.integers(1, 48)), "embedding": heads * draw(st.integers(1, 16)) * 8,
             "heads": heads, "heads_kv": draw(st.integers(1, heads)), "context": draw(st.integers(1, 1 << 20)),
             "vocab": draw(st.integers(1, 40))}
    block_type = draw(st.sampled_from([gb.UINT32, gb.UINT64, gb.INT32, gb.UINT16]))
    extras = [draw(extra_entry(i)) for i in range(draw(st.integers(0, 6)))]
    header = gb.llama(facts["block_count"], block_type=block_type, embedding=facts["embedding"],
                      heads=heads, heads_kv=facts["heads_kv"], context=facts["context"],
                      vocab=facts["vocab"], extra=extras)
    return header, facts


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def rounded(entry: gb.Entry):
    """What a written value reads back as: float32 loses precision on the way, and string
    arrays (token tables) are only counted, as the reader documents."""
    if entry.type == gb.ARRAY and entry.item_type == gb.STRING:
        return ArrayInfo(gb.STRING, len(entry.value))
    if entry.type == gb.FLOAT32:
        return struct.unpack("<f", struct.pack("<f", entry.value))[0]
    if entry.type == gb.ARRAY and entry.item_type == gb.FLOAT32:
        return [struct.unpack("<f", struct.pack("<f", v))[0] for v in entry.value]
    return entry.value


@fuzz(1500)
@given(valid_header(), st.integers(0, 3))
def test_a_valid_header_parses_back_to_what_was_written(made, defect: int):
    header, facts = made
    data = header.file(gb.tensor_data_bytes(header))
    if defect == 1:  # cut inside the header: the file ends before the tensor table does
        outcome = parse_bounded(data[: len(header.encode(pad=False)) - 1 - (facts["vocab"] % 7)], None)
        assert isinstance(outcome, GGUFError)
        return
    if defect == 2:  # the file is shorter than its tensors say
        outcome = parse_bounded(data[:-1], len(data) - 1)
        assert isinstance(outcome, GGUFError)
        return
    outcome = parse_bounded(data, len(data))
    assert isinstance(outcome, GGUFInfo), outcome
    assert (outcome.block_count, outcome.embedding_length) == (facts["block_count"], facts["embedding"])
    assert (outcome.head_count, outcome.head_count_kv) == (facts["heads"], facts["heads_kv"])
    assert (outcome.context_length, outcome.vocab_size) == (facts["context"], facts["vocab"])
    assert len(outcome.layer_tensor_bytes) == facts["block_count"]
    for entry in header.entries:
        if entry.key.startswith("fuzz."):
            later = [e for e in header.entries if e.key == entry.key]
            if later[-1] is entry:  # a repeated key: the last one wins
                assert same(outcome.metadata[entry.key], rounded(entry)), entry


HOSTILE = st.one_of(
    st.tuples(st.just(gb.UINT64), st.integers(1 << 32, 2**64 - 1)),
    st.tuples(st.just(gb.UINT32), st.integers(1 << 20, 2**32 - 1)),
    st.tuples(st.just(gb.INT32), st.integers(-(2**31), 0)),
    st.tuples(st.just(gb.FLOAT64), st.sampled_from([math.inf, -math.inf, math.nan, 0.5, 1e300])),
    st.tuples(st.just(gb.FLOAT32), st.sampled_from([math.inf, math.nan, 2.5])),
    st.tuples(st.just(gb.BOOL), st.booleans()),
    st.tuples(st.just(gb.STRING), st.text(max_size=20)),
)


@fuzz(1500)
@given(HOSTILE, st.booleans())
def test_a_hostile_block_count_is_always_gguf_invalid(bad, with_file_size: bool):
    block_type, block_count = bad
    header = gb.llama(block_count, block_type=block_type)
    data = header.file(gb.tensor_data_bytes(header))
    outcome = parse_bounded(data, len(data) if with_file_size else None)
    assert isinstance(outcome, GGUFError) and "block_count" in outcome.message


# -- tensor tables ------------------------------------------------------------------------------

tensor_entry = st.builds(
    gb.Tensor,
    st.text("ab.0_\u00e9\u00b2", min_size=1, max_size=31),  # at most 62 bytes: a legal name
    # Any dims, then a 0: no data is needed whatever the others say.
    st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=3).map(lambda dims: (*dims, 0)),
)
CLAIMED = st.one_of(st.just(0), st.integers(1, 64),
                    st.sampled_from([MAX_TENSORS + 1, 2**20, 2**64 - 1]))


@fuzz(500)
@given(st.lists(tensor_entry, max_size=40), CLAIMED)
def test_a_tensor_table_parses_back_or_claims_more_than_it_holds(tensors, claimed_extra: int):
    """The tensor count is a claim: entries the file holds parse back, a count past them or
    past MAX_TENSORS is gguf_invalid, cheaply (200k claimed entries once cost 80 MiB)."""
    header = gb.llama(2)
    header.tensors += tensors
    data = bytearray(header.file(gb.tensor_data_bytes(header)))
    claimed = min(len(header.tensors) + claimed_extra, 2**64 - 1)
    struct.pack_into("<Q", data, 8, claimed)
    outcome = parse_bounded(bytes(data), len(data))
    if not claimed_extra:
        assert isinstance(outcome, GGUFInfo), outcome
        written = [(t.name, t.shape) for t in header.tensors]
        assert [(t.name, t.shape) for t in outcome.tensors] == written
    else:
        assert isinstance(outcome, GGUFError)


# -- mutations of a real header -------------------------------------------------------------

@functools.cache
def real_header() -> bytes:
    """The Q2_K ladder header with its token table and merges cut to a few entries: the real
    keys and the real 272-entry tensor table, small enough to parse thousands of times."""
    ladder = Path(os.environ.get("EDGE_AGENT_LADDER", Path.home() / ".cache/edge-agent/ladder"))
    with open(ladder / "smollm2-135m-instruct.Q2_K.gguf", "rb") as f:
        head = f.read(4 * MIB)
    return gb.shrunk(gb.walk(head))


INTERESTING_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1, 3 * 10**8, 0x7FF0000000000000]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("u64"), st.integers(0, 1 << 20), st.sampled_from(INTERESTING_U64)),
    st.tuples(st.just("u32"), st.integers(0, 1 << 20), st.sampled_from([0, 1, 7, 8, 9, 13, 2**31, 2**32 - 1])),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64)),
)


def mutate(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op, where, arg in ops:
        at = where % max(len(out), 1)
        if op == "flip" and out:
            out[at] ^= arg
        elif op == "u64" and len(out) >= 8:
            struct.pack_into("<Q", out, min(at, len(out) - 8), arg)
        elif op == "u32" and len(out) >= 4:
            struct.pack_into("<I", out, min(at, len(out) - 4), arg)
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = arg
        elif op == "delete":
            del out[at: at + arg]
    return bytes(out)


def test_the_real_header_parses_unmutated():
    info = parse_bounded(real_header())
    assert isinstance(info, GGUFInfo) and (info.block_count, info.n_tensors) == (30, 272)


@fuzz(3000)
@given(st.lists(mutation, min_size=1, max_size=4), st.booleans())
def test_a_mutated_real_header_is_parsed_or_gguf_invalid(ops, with_file_size: bool):
    data = mutate(real_header(), ops)
    parse_bounded(data, len(data) if with_file_size else None)


@fuzz(1000)
@given(st.binary(max_size=512))
def test_random_bytes_after_the_magic_are_gguf_invalid_or_parsed(tail: bytes):
    parse_bounded(b"GGUF\x03\x00\x00\x00" + tail)
