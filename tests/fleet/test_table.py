"""The fleet table (agent.fleet.table) and the sentences events read as (agent.fleet.view), on
plain data: filter (plain words, id globs, the inventory grammar), sort, page, bounds."""

from __future__ import annotations

import time

import pytest

from agent.errors import FilterError, RequestError
from agent.fleet.registry import DeviceRecord
from agent.fleet.table import FactsCache, TableQuery, parse_query, table_page
from agent.fleet.view import command_text, device_row, event_text

GIB = 1024**3


def record(device_id: str, *, board: str, ram_gib: int, flags: list[str], decode_tps=None,
           state: str = "ready", labels: dict | None = None) -> DeviceRecord:
    now = time.time()
    meta = {
        "probe": {"board": board, "cpu": {"arch": "aarch64", "flags": flags},
                  "memory": {"total_bytes": ram_gib * GIB}},
        "selection": {"model_id": "smollm2", "quant": "Q4_K_M"},
        "labels": labels or {},
    }
    telemetry = {"decode_tps": decode_tps} if decode_tps is not None else {}
    return DeviceRecord(device_id, now, now, state=state, meta=meta, telemetry=telemetry,
                        telemetry_ts=now if telemetry else None)


def fleet() -> list[DeviceRecord]:
    """Made per test: the rows' states count from the records' last_seen."""
    return [
        record("store-12-a", board="Raspberry Pi 5", ram_gib=8, flags=["neon", "dotprod"],
               decode_tps=12.0, labels={"site": "store-12"}),
        record("store-12-b", board="Raspberry Pi 4", ram_gib=4, flags=["neon"], decode_tps=7.5,
               labels={"site": "store-12"}),
        record("store-13-a", board="Jetson Orin Nano", ram_gib=8, flags=["neon", "dotprod"],
               decode_tps=30.0, state="busy", labels={"site": "store-13"}),
        record("lab-1", board="Intel NUC", ram_gib=32, flags=["avx2"]),  # no telemetry yet
    ]


def page(query: TableQuery, cache: FactsCache | None = None) -> dict:
    now = time.time()
    pairs = [(r, device_row(r, now, default_interval_s=10, stale_after_intervals=3))
             for r in fleet()]
    return table_page(pairs, query, cache)


def ids(answer: dict) -> list[str]:
    return [row["id"] for row in answer["devices"]]


@pytest.mark.parametrize("text, expected", [
    ("", ["lab-1", "store-12-a", "store-12-b", "store-13-a"]),
    ("raspberry", ["store-12-a", "store-12-b"]),          # plain words, any case
    ("store-12-* pi", ["store-12-a", "store-12-b"]),      # an id glob and a word
    ("jetson busy", ["store-13-a"]),
    ("ram_gib>=8 and flag:dotprod", ["store-12-a", "store-13-a"]),   # the inventory grammar
    ("label:site=store-12 and not board=\"*pi 4*\"", ["store-12-a"]),
    ("nothing-like-this", []),
])
def test_the_filter_takes_words_globs_and_the_inventory_grammar(text, expected):
    assert ids(page(TableQuery(filter=text))) == expected


def test_grammar_that_does_not_parse_says_where():
    with pytest.raises(FilterError) as caught:
        page(TableQuery(filter="ram_gib >= lots"))
    assert caught.value.code == "bad_filter"
    assert "ram_gib takes a number" in caught.value.message


def test_sorting_keeps_rows_without_a_value_last_in_both_orders():
    ascending = ids(page(TableQuery(sort="decode_tps")))
    descending = ids(page(TableQuery(sort="decode_tps", order="desc")))
    assert ascending == ["store-12-b", "store-12-a", "store-13-a", "lab-1"]
    assert descending == ["store-13-a", "store-12-a", "store-12-b", "lab-1"]


def test_pages_cover_the_matches_once_and_a_page_past_the_end_is_the_last():
    seen = []
    for number in (1, 2):
        answer = page(TableQuery(per_page=3, page=number))
        assert (answer["total"], answer["pages"], answer["page"]) == (4, 2, number)
        seen += ids(answer)
    assert sorted(seen) == sorted(r.id for r in fleet())
    assert page(TableQuery(per_page=3, page=99))["page"] == 2
    # the summary is the whole fleet's, whatever the filter
    assert page(TableQuery(filter="jetson"))["summary"]["devices"] == len(fleet())


def test_facts_are_read_again_only_when_the_meta_changes():
    cache = FactsCache()
    device = fleet()[0]
    first = cache.facts(device)
    device.telemetry = {"decode_tps": 1.0}  # telemetry: the same facts object
    assert cache.facts(device) is first
    device.meta = {**device.meta, "labels": {"site": "store-99"}}  # a new meta: new facts
    assert cache.facts(device).labels == {"site": "store-99"}


@pytest.mark.parametrize("params, field", [
    ({"per_page": "100000"}, "per_page"),
    ({"page": "0"}, "page"),
    ({"page": "-1"}, "page"),
    ({"page": "1e3"}, "page"),
    ({"sort": "meta"}, "sort"),
    ({"order": "sideways"}, "order"),
    ({"state": "asleep"}, "state"),
    ({"filter": "x" * 5000}, "filter"),
    ({"colour": "red"}, "colour"),
])
def test_a_query_out_of_bounds_is_bad_request_naming_the_parameter(params, field):
    with pytest.raises(RequestError) as caught:
        parse_query(params)
    assert caught.value.details["field"] == field


def test_download_events_and_commands_read_as_sentences():
    progress = {"event": "download", "file": "m.Q2_K.gguf", "state": "downloading",
                "bytes": 50 * 1024**2, "total": 100 * 1024**2, "rate_bps": 25e6}
    assert event_text("download", progress) == (
        "Downloading m.Q2_K.gguf (50 MiB of 100 MiB, 25.0 MB/s)")
    assert event_text("download", {**progress, "state": "complete", "bytes": 100 * 1024**2,
                                   "mirror": "http://a/"}).startswith("Downloaded m.Q2_K.gguf")
    assert event_text("model_switch", {"from": "Q4_K_M", "to": "Q2_K", "mode": "drained"}) == (
        "Switched from Q4_K_M to Q2_K (drained first)")
    assert "crashed" in event_text("worker_crashed", {"reason": "signal 11"})
    assert event_text("rollback", {"to": "Q4_K_M", "reason": "canary failed"}) == (
        "Went back to Q4_K_M: canary failed")
    # whatever a device sends in a field, the sentence is text and bounded
    odd = event_text("model_switch", {"from": {"x": 1}, "to": ["y"] * 10_000})
    assert odd == "Switched from ? to ?"
    assert len(event_text("future_thing", {"blob": "z" * 10_000})) <= 400
    assert command_text({"op": "pin", "args": {"quant": "Q2_K"}, "ok": True,
                         "result": {"quant": "Q2_K"}}) == "pin Q2_K: done, now Q2_K"
    assert command_text({"op": "set_manifest", "args": {}, "ok": False,
                         "result": {"code": "fetch_failed", "message": "no route"}}) == (
        "set_manifest failed: fetch_failed: no route")
    assert command_text({"op": "bench", "args": {}, "ok": None, "result": None}) == (
        "bench: waiting for the device")
