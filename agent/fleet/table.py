"""The fleet table, filtered, sorted and paged on the controller: the dashboard's device list,
its live stream and ``GET /api/devices`` all go through ``table_page``, so a browser holds one
page of a fleet of thousands, never the whole of it.

What a client asks for arrives as query parameters and is parsed once into a ``TableQuery``
(bounded: a filter of at most ``MAX_FILTER_CHARS``, at most ``MAX_PER_PAGE`` rows a page, a
sort key from the table's columns); ``table_page`` is then a pure function of the device rows
(agent.fleet.view.device_row) and the records they came from. No I/O here; the caller runs it
in a thread, since a fleet of thousands takes tens of milliseconds to build and sort.

The filter is the inventory grammar rollouts target with (agent.fleet.inventory:
``ram_gib>=4 and flag:dotprod and label:site=store-12``), or, when the text holds none of its
operators, keywords or prefixes, plain words that must all be found (case-insensitively) in a
row's id, state, board, CPU, GPU, model, quant, version or pool (``jetson q4_k_m``); a word
with ``*``, ``?`` or ``[`` is then a glob on the device id (``store-12-*``). Grammar facts are
kept per record version (``FactsCache``), so a filter over thousands of devices does not read
every meta again on each tick of the live stream.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import msgspec

from agent.errors import RequestError
from agent.fleet.inventory import MAX_FILTER_CHARS, DeviceFacts, facts_of, parse_filter
from agent.fleet.registry import DeviceRecord
from agent.fleet.view import STATES, fleet_summary

MAX_PER_PAGE = 1000
MAX_PAGE = 1_000_000
DEFAULT_PER_PAGE = 50
SortKey = Literal[
    "id", "state", "board", "cpu", "ram_bytes", "gpu", "model", "quant", "decode_tps",
    "mem_bytes", "temp_c", "last_seen",
]
State = Literal[STATES]  # type: ignore[valid-type]
TEXT_FIELDS = ("id", "state", "board", "cpu", "gpu", "model", "quant", "version", "pool")
GLOB_CHARS = frozenset("*?[")
# Any of these makes a filter text the inventory grammar rather than plain words.
GRAMMAR_CHARS = frozenset("=<>!():\"")
GRAMMAR_WORDS = frozenset({"and", "or", "not"})


class TableQuery(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One view of the fleet table: ``?filter=…&state=…&sort=…&order=…&page=…&per_page=…``."""

    filter: Annotated[str, msgspec.Meta(max_length=MAX_FILTER_CHARS)] = ""
    state: State | None = None
    sort: SortKey = "id"
    order: Literal["asc", "desc"] = "asc"
    page: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = 1
    per_page: Annotated[int, msgspec.Meta(ge=1, le=MAX_PER_PAGE)] = DEFAULT_PER_PAGE


QUERY_FIELDS = frozenset(TableQuery.__struct_fields__)


def parse_query(params: Mapping[str, str], *, per_page: int = DEFAULT_PER_PAGE) -> TableQuery:
    """A TableQuery from query parameters (each at most once; numbers as decimal text);
    anything out of bounds or unknown is bad_request naming the parameter."""
    values: dict[str, Any] = {"per_page": per_page}
    for name, raw in params.items():
        if name not in QUERY_FIELDS:
            raise RequestError(
                f"{name}: not a parameter of the fleet table ({', '.join(sorted(QUERY_FIELDS))})",
                field=name,
            )
        if name in ("page", "per_page"):
            if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(MAX_PAGE))):
                raise RequestError(f"{name}: a whole number from 1", field=name)
            values[name] = int(raw)
        elif name == "state" and raw == "":
            continue  # the dashboard's "all states"
        else:
            values[name] = raw
    try:
        return msgspec.convert(values, TableQuery)
    except msgspec.ValidationError as exc:
        text, _, where = str(exc).partition(" - at `$.")
        field = where.rstrip("`") or "query"
        raise RequestError(f"{field}: {text}", field=field) from None


class FactsCache:
    """Inventory facts per device, kept while what they are read from (the record's meta
    object, which each new meta replaces, its state and agent version) stays the same:
    telemetry, the most frequent change, does not count. As large as the registry's device
    list, which never drops a device. Read from several worker threads at once: an entry is
    replaced whole, and a lost race only computes it twice."""

    def __init__(self) -> None:
        self._facts: dict[str, tuple[dict[str, Any], tuple, DeviceFacts]] = {}

    def facts(self, record: DeviceRecord) -> DeviceFacts:
        found = self._facts.get(record.id)
        status = (record.state, record.agent_version)
        if found is not None and found[0] is record.meta and found[1] == status:
            return found[2]
        facts = facts_of(record)
        self._facts[record.id] = (record.meta, status, facts)
        return facts


def is_grammar(text: str) -> bool:
    return bool(GRAMMAR_CHARS & set(text)) or bool(GRAMMAR_WORDS & set(text.lower().split()))


def compile_filter(
    text: str, cache: FactsCache | None = None
) -> Callable[[DeviceRecord, dict[str, Any]], bool]:
    """The predicate a filter text stands for, over (record, row); FilterError (bad_filter,
    with the offset) for grammar that does not parse."""
    if is_grammar(text):
        parsed = parse_filter(text)
        facts = cache.facts if cache is not None else facts_of
        return lambda record, row: parsed.matches(facts(record))
    words = text.lower().split()
    globs = [w for w in words if GLOB_CHARS & set(w)]
    needles = [w for w in words if not GLOB_CHARS & set(w)]

    def matches(record: DeviceRecord, row: dict[str, Any]) -> bool:
        device_id = record.id.lower()
        if not all(fnmatch.fnmatchcase(device_id, g) for g in globs):
            return False
        if not needles:
            return True
        haystack = " ".join(str(row.get(f) or "") for f in TEXT_FIELDS).lower()
        return all(n in haystack for n in needles)

    return matches


def _sort_key(key: str) -> Callable[[dict[str, Any]], tuple]:
    """Rows without a value come last in either order; ties go by id, so pages are stable."""

    def numeric(row: dict[str, Any]) -> tuple:
        value = row.get(key)
        present = isinstance(value, (int, float)) and math.isfinite(value)
        return (not present, value if present else 0, row["id"])

    def text(row: dict[str, Any]) -> tuple:
        value = str(row.get(key) or "").lower()
        return (value == "", value, row["id"])

    return text if key in ("id", "state", "board", "cpu", "gpu", "model", "quant") else numeric


def table_page(
    pairs: list[tuple[DeviceRecord, dict[str, Any]]],
    query: TableQuery,
    cache: FactsCache | None = None,
) -> dict[str, Any]:
    """The page ``query`` asks for: the whole fleet's summary, how many rows match, and the
    matching rows of that page (a page past the last is the last)."""
    matches = compile_filter(query.filter, cache)
    rows = [
        row
        for record, row in pairs
        if (query.state is None or row["state"] == query.state) and matches(record, row)
    ]
    key = _sort_key(query.sort)
    if query.order == "desc":
        # Missing values stay last: sort present ones descending, then append the rest.
        present = [r for r in rows if not key(r)[0]]
        present.sort(key=lambda r: r["id"])
        present.sort(key=lambda r: key(r)[1], reverse=True)
        rows = present + sorted((r for r in rows if key(r)[0]), key=lambda r: r["id"])
    else:
        rows.sort(key=key)
    pages = max(1, math.ceil(len(rows) / query.per_page))
    page = min(query.page, pages)
    start = (page - 1) * query.per_page
    return {
        "summary": fleet_summary([row for _, row in pairs]),
        "total": len(rows),
        "page": page,
        "pages": pages,
        "per_page": query.per_page,
        "devices": rows[start : start + query.per_page],
    }
