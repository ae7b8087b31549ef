"""Property-based fuzzing of the manifest parser (issue 10, finding 8), YAML and JSON.

Oracle independent of the parser: manifests built valid here must load and round-trip;
ones with a defect put in on purpose (an alias, an unsafe name, a huge number, deep nesting)
must be manifest_invalid; arbitrary text may do either, but nothing else, cheaply, and with
a bounded message.
"""

from __future__ import annotations

import json

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.catalog.manifest import Manifest, parse_manifest
from agent.errors import ManifestError
from tests.support.cpu import thread_cpu

MAX_CPU_S = 1.0
MAX_MESSAGE = 1000


def fuzz(examples: int) -> settings:
    """Derandomized for CI. The tests below run 5,100 inputs together (issue 10: >= 5,000)."""
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def parse_bounded(text: str | bytes) -> Manifest | ManifestError:
    with thread_cpu() as spent:
        try:
            outcome: Manifest | ManifestError = parse_manifest(text, "fuzz.yaml")
        except ManifestError as exc:
            outcome = exc
    if isinstance(outcome, ManifestError):
        assert outcome.code == "manifest_invalid" and len(outcome.message) < MAX_MESSAGE
        assert "\n" not in outcome.message and "\r" not in outcome.message
    assert spent.seconds < MAX_CPU_S
    return outcome


safe = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=1).flatmap(
    lambda first: st.text("abcXYZ019._-", max_size=20).map(lambda rest: first + rest))
sha = st.text("0123456789abcdef", min_size=64, max_size=64)


@st.composite
def variant(draw, quant: str) -> dict:
    out = {"quant": quant, "file": draw(safe) + ".gguf", "size": draw(st.integers(1, 2**63)),
           "sha256": draw(sha), "quality": draw(st.floats(0, 1))}
    if draw(st.booleans()):
        out["urls"] = [f"https://{draw(safe)}.example/{out['file']}"]
    if draw(st.booleans()):
        out["requires"] = {"arch": draw(st.lists(st.sampled_from(["x86_64", "aarch64"]), max_size=2)),
                           "cpu_flags": draw(st.lists(st.sampled_from(["avx2", "fma", "dotprod"]), max_size=2))}
    return out


@st.composite
def document(draw) -> dict:
    ids = draw(st.lists(safe, min_size=1, max_size=3, unique=True))
    models = []
    for model_id in ids:
        quants = draw(st.lists(st.sampled_from(["F16", "Q8_0", "Q4_K_M", "Q2_K", "IQ4_XS", "BF16"]),
                               min_size=1, max_size=4, unique=True))
        models.append({"id": model_id, "variants": [draw(variant(q)) for q in quants]})
    return {"schema": 1, "models": models}


def render(doc: dict, as_yaml: bool) -> str:
    return yaml.safe_dump(doc) if as_yaml else json.dumps(doc)


@fuzz(1500)
@given(document(), st.booleans())
def test_a_valid_manifest_loads_and_round_trips(doc: dict, as_yaml: bool):
    manifest = parse_bounded(render(doc, as_yaml))
    assert isinstance(manifest, Manifest), manifest
    for model, written in zip(manifest.models, doc["models"]):
        assert model.id == written["id"]
        for got, want in zip(model.variants, written["variants"]):
            assert (got.quant, got.file, got.size, got.sha256, got.quality) == (
                want["quant"], want["file"], want["size"], want["sha256"], want["quality"])
            assert got.urls == want.get("urls", [])


UNSAFE = st.one_of(
    st.text(min_size=1, max_size=20).filter(lambda t: any(c in t for c in "/\\ \n\r\t\x00\x7f#")),
    st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=5).map(lambda t: "a" + t),
    st.just(""), st.just(".."), st.just("a" * 300),
)


@fuzz(1500)
@given(document(), st.sampled_from(["quant", "file", "id"]), UNSAFE, st.booleans())
def test_an_unsafe_name_is_manifest_invalid_at_its_key_path(doc: dict, field: str, name: str, as_yaml: bool):
    model = doc["models"][0]
    (model if field == "id" else model["variants"][0])[field] = name
    outcome = parse_bounded(render(doc, as_yaml))
    assert isinstance(outcome, ManifestError), name
    assert f".{field}:" in outcome.message or f"{field}:" in outcome.message


def alias_bomb(depth: int, width: int) -> str:
    lines = [f"a0: &a0 [{','.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join([*lines, f"schema: *a{depth - 1}", "models: []"])


DEFECTS = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 12)).map(lambda dw: alias_bomb(*dw)),
    st.integers(4301, 20000).map(lambda n: f"schema: {'9' * n}\nmodels: []\n"),
    st.integers(4301, 20000).map(lambda n: '{"schema": 1, "models": [], "x": ' + "9" * n + "}"),
    st.integers(17, 3000).map(lambda n: "schema: 1\nmodels: " + "[" * n + "]" * n),
    st.integers(1000, 200_000).map(lambda n: '{"schema": 1, "models": ' + "[" * n + "]" * n + "}"),
    st.tuples(st.integers(1, 12), st.integers(1, 28)).map(lambda md: f"schema: 1\nmodels: 2024-{md[0] + 12}-{md[1]}\n"),
    st.text(max_size=200).map(lambda t: "schema: " + json.dumps(t * 1000) + "\nmodels: []\n"),
)


@fuzz(600)
@given(DEFECTS)
def test_aliases_huge_numbers_deep_nesting_and_bad_dates_are_manifest_invalid(text: str):
    assert isinstance(parse_bounded(text), ManifestError)


@fuzz(1500)
@given(st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                 max_leaves=20).map(lambda v: json.dumps({"schema": 1, "models": v})),
))
def test_arbitrary_input_is_a_manifest_or_manifest_invalid(text):
    parse_bounded(text)
