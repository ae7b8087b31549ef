"""The model manifest (schema 1, DESIGN.md): which variants of which models exist, where.

Loads YAML or JSON from a local path or an http(s) URL and validates it strictly: unknown
keys are rejected and every error names the key path ("models[0].variants[2].sha256:
expected 64 hex characters"). A variant's ``file`` must be a bare, safe file name, because
the fetcher joins it to the store directory and to the manifest's location; file, quant and
model id also end up in logs, topics and systemd's STATUS line, so they are refused with
control characters or anything outside a small alphabet.

A manifest is hostile input until its signature is checked (and a signed one is still parsed
by the same code): YAML anchors and aliases are refused (a 300-byte alias bomb expands to
gigabytes), nesting is bounded, and error messages quote values only through
:func:`agent.errors.shown`, never whole.

A variant split into llama.cpp's parts (``<prefix>-00001-of-0000N.gguf`` …) lists them under
``parts``, each with its own size, sha256 and mirrors; its ``file``, ``size`` and ``sha256``
are then those of the whole set as the rest of the agent uses them: the first part's name
(what llama.cpp is given: it opens the others beside it by name), the parts' total size
(what selection and the disk check count) and the first part's sha256 (the variant's
identity in the store and the learned figures). Validation holds the two views together.

The URL read uses urllib from the standard library: httpx stays confined to agent/fetch
and the GGUF range reader, and a manifest is one small GET. This module does not fetch
models, check signatures (a later issue) or decide anything about the device.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlparse

import msgspec
import yaml

from agent.catalog.gguf import MAX_SPLIT_PARTS, split_name, split_part_name
from agent.catalog.signing import SIGNATURE_SUFFIX, verify_manifest
from agent.config import SigningConfig, is_chat_template_file
from agent.errors import ManifestError, shown

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # a manifest is text; more is a wrong URL, not a manifest
FETCH_TIMEOUT_S = 30.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_DEPTH = 16  # a manifest is five levels deep; deeper is an attack on the parser's stack
# Safe names: no separators, no whitespace or control characters, bounded.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,194}\.gguf")
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # family, arch and cpu flag names
MAX_URL_CHARS = 2048
MAX_PARTS = MAX_SPLIT_PARTS


class _ManifestLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases, and with bounded nesting: both only cost here
    (no manifest needs them), aliases can expand without bound, nesting can exhaust the stack."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML anchors and aliases are not allowed")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.YAMLError(f"line {event.start_mark.line + 1}: nested deeper than {MAX_DEPTH}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Requires(_Strict, kw_only=True):
    """Where a variant can run: empty lists mean anywhere."""

    arch: list[str] = []  # platform.machine() names as the probe reports them: x86_64, aarch64
    cpu_flags: list[str] = []  # all of these ISA flags must be present, e.g. ["avx2"]


class Part(_Strict, kw_only=True):
    """One file of a split variant."""

    file: str  # <prefix>-0000i-of-0000N.gguf, a bare file name
    size: int
    sha256: str
    urls: list[str] = []  # empty: next to the manifest


class Variant(_Strict, kw_only=True):
    quant: str
    file: str  # a bare file name, never a path; for a split variant its first part
    size: int  # for a split variant: all parts together
    sha256: str  # for a split variant: the first part's
    urls: list[str] = []  # empty: next to the manifest (same directory or URL prefix)
    # A split variant's files in order; empty for a single file. Its urls are per part.
    parts: list[Part] = []
    quality: float  # higher is better, 1.0 = the reference (e.g. exp(-mean KL vs F16))
    # measured: exp(-mean KL) against the model's highest-precision variant; prior: the
    # per-quant figure of agent.catalog.build.QUANT_PRIORS; None: the writer did not say.
    quality_source: Literal["measured", "prior"] | None = None
    requires: Requires = msgspec.field(default_factory=Requires)
    chat_format: str | None = None  # over the model's; see ModelEntry.chat_format


class ModelEntry(_Strict, kw_only=True):
    id: str
    family: str | None = None
    # One of llama-cpp-python's registered chat formats, for a GGUF without a usable
    # tokenizer.chat_template; the config's model.chat_format overrides it. A name only: a
    # manifest comes from a mirror, so it never names a template file on the device.
    chat_format: str | None = None
    variants: list[Variant]


class Manifest(_Strict, kw_only=True):
    schema: Literal[1]
    models: list[ModelEntry]
    # Where it was loaded from; set by load_manifest, not read from the document.
    source: str | None = None

    def model(self, model_id: str | None = None) -> ModelEntry:
        """The named model, or the first one when ``model_id`` is None."""
        if model_id is None:
            return self.models[0]
        for entry in self.models:
            if entry.id == model_id:
                return entry
        known = ", ".join(m.id for m in self.models)
        raise ManifestError(f"model {shown(model_id)} is not in the manifest (it has: {shown(known, 200)})")


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def location_next_to(manifest_source: str, file: str) -> str:
    """Where a variant without urls lives: beside the manifest (a URL or a local path)."""
    if is_url(manifest_source):
        return urljoin(manifest_source, file)
    return str(Path(manifest_source).parent / file)


def variant_locations(manifest: Manifest, variant: Variant | Part) -> list[str]:
    """The variant's (or part's) mirrors, or the place next to the manifest when it lists
    none. A split variant's own list is its first part's."""
    if isinstance(variant, Variant) and variant.parts:
        return variant_locations(manifest, variant.parts[0])
    if variant.urls:
        return list(variant.urls)
    if manifest.source is None:
        return []
    return [location_next_to(manifest.source, variant.file)]


def variant_files(variant: Variant) -> list[Part]:
    """The files a variant consists of: its parts, or the one file as a Part."""
    if variant.parts:
        return list(variant.parts)
    return [Part(file=variant.file, size=variant.size, sha256=variant.sha256, urls=variant.urls)]


def _file_name_problem(name: str) -> str | None:
    if not name:
        return "must not be empty"
    if "\x00" in name:
        return "must not contain NUL"
    if "/" in name or "\\" in name:
        return "must be a bare file name, not a path"
    if name in (".", ".."):
        return "must be a file name"
    if not _FILE_NAME.fullmatch(name):
        return "must be a .gguf file name of letters, digits, '.', '_' and '-' (at most 200)"
    return None


def _name_problem(name: str, pattern: re.Pattern[str], what: str) -> str | None:
    if not name:
        return "must not be empty"
    if not pattern.fullmatch(name):
        return f"must be a {what} of letters, digits and '._+-' (no spaces or control characters)"
    return None


def _chat_format_problem(name: str) -> str | None:
    # A manifest comes from a mirror: it names a registered format, never a file (the worker
    # opens a value that looks like a template file's path).
    if is_chat_template_file(name):
        return "must name a registered chat format, not a template file"
    return _name_problem(name, _TAG, "chat format name")


def _url_problem(url: str) -> str | None:
    if len(url) > MAX_URL_CHARS or any(c <= " " or c == "\x7f" for c in url):
        return f"must be at most {MAX_URL_CHARS} characters without spaces or control characters"
    if not is_url(url):
        return f"{shown(url)} is not an http(s) URL"
    return None


def _urls_problems(urls: list[str]) -> dict[str, str | None]:
    return {f"urls[{index}]": _url_problem(url) for index, url in enumerate(urls)}


def _parts_problems(variant: Variant) -> dict[str, str | None]:
    """What makes a split variant's parts not one set that agrees with the variant."""
    parts = variant.parts
    if len(parts) == 1 or len(parts) > MAX_PARTS:
        return {"parts": f"lists {len(parts)} parts; a split has 2 to {MAX_PARTS}"}
    if variant.urls:
        return {"urls": "must be empty for a split variant: each part lists its own"}
    named = split_name(parts[0].file)
    if named is None:
        return {"parts[0].file": "must be a split part name, <name>-00001-of-<count>.gguf"}
    prefix = named[0]
    problems: dict[str, str | None] = {}
    for index, part in enumerate(parts):
        at = f"parts[{index}]"
        expected = split_part_name(prefix, index + 1, len(parts))
        problems[f"{at}.file"] = _file_name_problem(part.file) or (
            None if part.file == expected else f"must be {shown(expected)} (part {index + 1} of "
            f"{len(parts)}, named as llama.cpp looks for it)")
        problems[f"{at}.size"] = "must be a positive number of bytes" if part.size <= 0 else None
        problems[f"{at}.sha256"] = None if _SHA256.fullmatch(part.sha256) else \
            "expected 64 hex characters (lower case)"
        problems.update({f"{at}.{key}": problem
                         for key, problem in _urls_problems(part.urls).items()})
    if not any(problems.values()):
        total = sum(part.size for part in parts)
        problems["file"] = None if variant.file == parts[0].file else \
            f"must be the first part's file, {shown(parts[0].file)}"
        problems["size"] = None if variant.size == total else \
            f"is {variant.size}, the parts add up to {total}"
        problems["sha256"] = None if variant.sha256 == parts[0].sha256 else \
            "must be the first part's sha256"
    return problems


def _validate(manifest: Manifest) -> None:
    """Checks msgspec's types cannot express; raise on the first, naming its key path."""
    if not manifest.models:
        raise ManifestError("models: must list at least one model", key="models")
    seen_ids: set[str] = set()
    for m, model in enumerate(manifest.models):
        where = f"models[{m}]"
        problem = _name_problem(model.id, _MODEL_ID, "model id")
        if problem:
            raise ManifestError(f"{where}.id: {problem}", key=f"{where}.id")
        problem = None if model.family is None else _name_problem(model.family, _TAG, "family name")
        if problem:
            raise ManifestError(f"{where}.family: {problem}", key=f"{where}.family")
        problem = None if model.chat_format is None else _chat_format_problem(model.chat_format)
        if problem:
            raise ManifestError(f"{where}.chat_format: {problem}", key=f"{where}.chat_format")
        if model.id in seen_ids:
            raise ManifestError(f"{where}.id: {shown(model.id)} is listed twice", key=f"{where}.id")
        seen_ids.add(model.id)
        if not model.variants:
            raise ManifestError(f"{where}.variants: must list at least one variant", key=f"{where}.variants")
        quants: set[str] = set()
        for v, variant in enumerate(model.variants):
            at = f"{where}.variants[{v}]"
            problems = {
                "quant": _name_problem(variant.quant, _QUANT, "quant name") or
                (f"{shown(variant.quant)} is listed twice" if variant.quant in quants else None),
                "file": _file_name_problem(variant.file),
                "size": "must be a positive number of bytes" if variant.size <= 0 else None,
                "sha256": None if _SHA256.fullmatch(variant.sha256) else
                "expected 64 hex characters (lower case)",
                "quality": None if 0.0 <= variant.quality <= 1.0 else "must be between 0 and 1",
                "chat_format": None if variant.chat_format is None else _chat_format_problem(
                    variant.chat_format),
            }
            problems.update(_urls_problems(variant.urls))
            if variant.parts:
                problems.update(_parts_problems(variant))
            elif (split_name(variant.file) or ("", 1, 1))[2] > 1:
                problems["file"] = "is a split part's name: list the split's files under parts"
            for field in ("arch", "cpu_flags"):
                for index, name in enumerate(getattr(variant.requires, field)):
                    problems[f"requires.{field}[{index}]"] = _name_problem(name, _TAG, "name")
            for key, problem in problems.items():
                if problem:
                    raise ManifestError(f"{at}.{key}: {problem}", key=f"{at}.{key}")
            quants.add(variant.quant)


def _key_path(error: msgspec.ValidationError) -> str:
    # msgspec quotes what it refused (an unknown key, an enum value): bound it.
    text = str(error)
    if len(text) > 400:
        text = text[:200] + " … " + text[-200:]
    # ... and does not escape it: a key with a newline would split log and STATUS lines.
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    message, marker, where = text.partition(" - at `$")
    if not marker:
        return text
    path = where.rstrip("`").lstrip(".") or "(top level)"
    return f"{path}: {message[0].lower()}{message[1:]}"


def _yaml_problem(exc: Exception) -> str:
    """yaml's message on one line and bounded: it quotes the document (which may be a local
    file that is not a manifest) and carries newlines into logs and STATUS lines."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    text = f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if problem and mark else str(exc)
    return " ".join(text.split())[:160]


def parse_manifest(text: str | bytes, source: str | None = None) -> Manifest:
    """Validate a manifest document (pure). ``source`` is kept to resolve bare files."""
    label = source or "manifest"
    # JSON first: YAML 1.1 is not quite a superset (it reads the JSON number 1e-05 as a
    # string), and a JSON document is the common case (manifest build, the controller).
    try:
        data = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        try:
            # ValueError: yaml's int() of a 5,000-digit number and its datetime() of
            # "2024-13-45" raise it past yaml's own error tree.
            data = yaml.load(text, Loader=_ManifestLoader)  # noqa: S506 (a SafeLoader subclass)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            raise ManifestError(f"{label}: neither valid YAML nor JSON: {_yaml_problem(exc)}",
                                source=label) from None
    if not isinstance(data, dict):
        raise ManifestError(f"{label}: the top level must be a mapping", source=label)
    if data.get("schema") != 1:
        raise ManifestError(
            f"{label}: schema: {shown(data.get('schema'))} is not supported (this agent reads schema 1)",
            key="schema", source=label,
        )
    if "source" in data:
        raise ManifestError(f"{label}: source: unknown field", key="source", source=label)
    try:
        manifest = msgspec.convert(data, Manifest)
    except msgspec.ValidationError as exc:
        raise ManifestError(f"{label}: {_key_path(exc)}", source=label) from exc
    try:
        _validate(manifest)
    except ManifestError as exc:
        raise ManifestError(f"{label}: {exc.message}", source=label, **exc.details) from None
    return msgspec.structs.replace(manifest, source=source)


def _read_url(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/json, application/yaml"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            body = response.read(MAX_MANIFEST_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise ManifestError(f"{url}: HTTP {exc.code}", source=url, status=exc.code) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ManifestError(f"{url}: cannot fetch the manifest: {reason}", source=url) from exc
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{url}: larger than {MAX_MANIFEST_BYTES} bytes", source=url)
    return body


def _read_source(source: str) -> bytes:
    if is_url(source):
        return _read_url(source)
    path = Path(source)
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{source}: larger than {MAX_MANIFEST_BYTES} bytes", source=source)
        return path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{source}: cannot read: {exc.strerror}", source=source) from exc


def _read_signature(source: str) -> bytes | None:
    try:
        return _read_source(source + SIGNATURE_SUFFIX)
    except ManifestError:
        return None


def load_manifest(source: str, signing: SigningConfig | None = None) -> Manifest:
    """Load and validate a manifest from a local path or an http(s) URL.

    With ``signing.required`` the detached ``<source>.sig`` must verify against the
    configured key before a single field of the manifest is trusted."""
    raw = _read_source(source)
    if signing is not None and signing.required:
        verify_manifest(raw, _read_signature(source), signing.public_key)
    return parse_manifest(raw, source if is_url(source) else str(Path(source).resolve()))
