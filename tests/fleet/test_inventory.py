"""The inventory filter grammar (agent.fleet.inventory): valid filters pick the right devices,
invalid and hostile ones are refused with ``bad_filter`` before any device is looked at, and
metas that passed the controller's schema are read without type checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import FilterError, RequestError
from agent.fleet import schemas
from agent.fleet.inventory import (
    MAX_DEPTH,
    MAX_FILTER_CHARS,
    MAX_TERMS,
    facts_of,
    parse_filter,
)

GIB = 1 << 30


@dataclass
class Record:
    id: str
    state: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    agent_version: str | None = None


def matching_ids(flt, records) -> list[str]:
    return sorted(record.id for record in records if flt.matches(facts_of(record)))


def meta(*, arch="x86_64", flags=(), ram_gib=8, limit_gib=None, vram_gib=(), board=None,
         labels=None, profile=None, quant=None, pool=None) -> dict[str, Any]:
    body = {
        "probe": {
            "cpu": {"arch": arch, "flags": list(flags)},
            "memory": {"total_bytes": ram_gib * GIB,
                       "cgroup_limit_bytes": limit_gib * GIB if limit_gib else None},
            "gpus": [{"vendor": "nvidia", "vram_total_bytes": v * GIB} for v in vram_gib],
            "board": board,
        },
        "labels": labels or {},
        "profile": {"name": profile, "reasons": []},
        "selection": {"quant": quant} if quant else None,
        "pool": pool,
    }
    return schemas.validate("meta", body)  # what the registry holds: a meta that passed


FLEET = [
    Record("store-12-till", "ready", meta(
        arch="aarch64", flags=("neon", "dotprod"), ram_gib=8, board="Raspberry Pi 5 Model B",
        labels={"site": "store-12", "role": "till"}, profile="raspberry-pi-5", quant="Q4_K_M"),
        agent_version="0.4.0"),
    Record("store-12-kiosk", "lost", meta(
        arch="aarch64", flags=("neon",), ram_gib=4, board="Raspberry Pi 4 Model B",
        labels={"site": "store-12", "role": "kiosk"}, profile="raspberry-pi-4", quant="Q2_K")),
    Record("store-13-till", "ready", meta(
        flags=("avx2",), ram_gib=64, limit_gib=2, labels={"site": "store-13", "role": "till"},
        pool="tills")),
    Record("lab-gpu", "busy", meta(flags=("avx2", "avx512f"), ram_gib=32, vram_gib=(24, 24),
                                   labels={"site": "lab"}, quant="Q8_0")),
    Record("new-box", "starting", {}),  # no meta yet: every fact unknown
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ram_gib>=4 and flag:dotprod and label:site=store-12", ["store-12-till"]),
        ("label:site=store-12", ["store-12-kiosk", "store-12-till"]),
        ("label:site=store-1*", ["store-12-kiosk", "store-12-till", "store-13-till"]),
        ("label:site!=store-12", ["lab-gpu", "store-13-till"]),  # unset label: not picked
        ("label:role", ["store-12-kiosk", "store-12-till", "store-13-till"]),
        ("not label:role", ["lab-gpu", "new-box"]),
        # the cgroup limit, not the host's 64 GiB, is what store-13-till may use
        ("ram_gib<4", ["store-13-till"]),
        ("ram_gib>=4", ["lab-gpu", "store-12-kiosk", "store-12-till"]),
        ("vram_gib>0", ["lab-gpu"]),
        ("vram_gib>=48", ["lab-gpu"]),
        ("vram_gib=0", ["store-12-kiosk", "store-12-till", "store-13-till"]),
        ("flag:avx2 and not flag:avx512f", ["store-13-till"]),
        ("flag:AVX2", ["lab-gpu", "store-13-till"]),
        ("arch=aarch64", ["store-12-kiosk", "store-12-till"]),
        ("arch!=aarch64", ["lab-gpu", "store-13-till"]),  # unknown arch: not picked
        ("not arch=aarch64", ["lab-gpu", "new-box", "store-13-till"]),
        ('board="raspberry pi 5*"', ["store-12-till"]),
        ("board=*Pi*", ["store-12-kiosk", "store-12-till"]),
        ("profile=raspberry-pi-?", ["store-12-kiosk", "store-12-till"]),
        ("state=ready or state=busy", ["lab-gpu", "store-12-till", "store-13-till"]),
        ("not state=lost and label:site=store-12", ["store-12-till"]),
        ("id=store-*-till", ["store-12-till", "store-13-till"]),
        ("id=*", ["lab-gpu", "new-box", "store-12-kiosk", "store-12-till", "store-13-till"]),
        ("quant=Q*_K* and version=0.4.*", ["store-12-till"]),
        ("pool=tills", ["store-13-till"]),
        # precedence: not > and > or; parentheses regroup
        ("label:site=lab or label:role=till and flag:dotprod", ["lab-gpu", "store-12-till"]),
        ("(label:site=lab or label:role=till) and flag:avx2", ["lab-gpu", "store-13-till"]),
        ("NOT (state=lost OR state=starting) AND label:site=store-12", ["store-12-till"]),
        ("((((id=lab-gpu))))", ["lab-gpu"]),
        ("  id=lab-gpu  ", ["lab-gpu"]),
    ],
)
def test_filter_picks_the_devices_it_describes(text, expected):
    assert matching_ids(parse_filter(text), FLEET) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("colour=red", "unknown key"),
        ("ram=4", "unknown key"),
        ("ram_gib>=four", "takes a number"),
        ("ram_gib>=nan", "takes a number"),
        ("ram_gib>=1e400", "takes a number"),
        ("ram_gib", "operator"),
        ("arch<x86_64", "takes = !="),
        ("label:site>3", "takes = !="),
        ("label:=x", "label key"),
        ("flag:", "flag"),
        ("flag:avx2=1", "join terms"),
        ("id=a id=b", "join terms"),
        ("id=a and", "expected a term"),
        ("and id=a", "expected a term"),
        ("id=a or or id=b", "expected a term"),
        ("(id=a", "expected ')'"),
        ("id=a)", "unexpected ')'"),
        ("()", "expected a term"),
        ("id=", "value"),
        ("id==a", "expected a value"),
        ('id="unterminated', "unexpected"),
        ("id=a; drop table devices", "unexpected"),
        ("état=1", "unexpected"),
    ],
)
def test_invalid_filter_is_refused_with_a_stable_code(text, says):
    with pytest.raises(FilterError) as caught:
        parse_filter(text)
    assert caught.value.code == "bad_filter"
    assert isinstance(caught.value, RequestError)  # a 400 wherever RequestError is one
    assert says in caught.value.message


def test_unknown_key_error_names_what_is_known():
    with pytest.raises(FilterError) as caught:
        parse_filter("ram_gib>=4 and colour=red")
    assert "colour" in caught.value.message and "ram_gib" in caught.value.message
    assert caught.value.details["at"] == len("ram_gib>=4 and ")


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("id=" + "a" * MAX_FILTER_CHARS, "longer than"),
        ("(" * (MAX_DEPTH + 1) + "id=a" + ")" * (MAX_DEPTH + 1), "nested deeper"),
        ("not " * (MAX_DEPTH + 1) + "id=a", "nested deeper"),
        (" or ".join(["id=a"] * (MAX_TERMS + 1)), f"more than {MAX_TERMS} terms"),
        ("(" * 100_000, "longer than"),
    ],
)
def test_hostile_filter_is_bounded(text, limit):
    with pytest.raises(FilterError) as caught:
        parse_filter(text)
    assert limit in caught.value.message


def test_glob_built_to_backtrack_finishes():
    # A naive glob-to-regex turns 500 stars into exponential backtracking on a long id that
    # does not match; fnmatch's translation (atomic groups) answers at once, so this returns.
    flt = parse_filter("id=" + "*a" * 500)
    assert not flt.matches(facts_of(Record("a" * 128 + "b", "ready")))


def test_limits_hold_exactly_at_the_bound():
    parse_filter("(" * MAX_DEPTH + "id=a" + ")" * MAX_DEPTH)
    parse_filter(" or ".join(["id=a"] * MAX_TERMS))


def test_parsed_filter_is_reused_without_parsing_again():
    flt = parse_filter("label:site=store-12 and ram_gib>=4")
    picks = [flt.matches(facts_of(record)) for record in FLEET * 100]
    assert picks.count(True) == 200  # store-12-till and store-12-kiosk, every time
    with pytest.raises(AttributeError):  # immutable: one parse may serve many threads
        flt.root = None  # type: ignore[misc]


def test_device_without_meta_matches_only_on_what_it_reported():
    facts = facts_of(Record("new-box", "starting", {}))
    assert parse_filter("state=starting").matches(facts)
    assert parse_filter("id=new-*").matches(facts)
    for text in ("ram_gib>=0", "ram_gib<1000", "vram_gib=0", "arch=*", "label:site", "flag:avx2"):
        assert not parse_filter(text).matches(facts), text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_parses_or_fails_with_bad_filter(text):
    try:
        flt = parse_filter(text)
    except FilterError as exc:
        assert exc.code == "bad_filter"
        return
    for record in FLEET:
        assert isinstance(flt.matches(facts_of(record)), bool)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["id=a", "flag:x", "(", ")", "and", "or", "not", "label:k=v",
                                 "ram_gib>1", "=", "\"q\""]), max_size=60))
def test_token_soup_parses_or_fails_with_bad_filter(words):
    try:
        parse_filter(" ".join(words))
    except FilterError as exc:
        assert exc.code == "bad_filter"


@pytest.mark.parametrize(
    "labels",
    [
        {f"k{n}": "v" for n in range(17)},  # more than a device config allows
        {"site": "x" * 65},
        {"site": "store 12"},
        {"site": "<script>"},
        {"": "x"},
        {"site": 12},
        {"site": {"nested": "x"}},
        ["site"],
    ],
)
def test_meta_with_labels_no_agent_sends_is_refused(labels):
    # The controller stores what passed the schema; a device cannot grow its row with labels.
    with pytest.raises(RequestError) as caught:
        schemas.validate("meta", {"labels": labels})
    assert caught.value.code == "bad_request" and "labels" in caught.value.message
