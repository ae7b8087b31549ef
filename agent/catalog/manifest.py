"""The model manifest (schema 1, DESIGN.md): which variants of which models exist, where.

Loads YAML or JSON from a local path or an http(s) URL and validates it strictly: unknown
keys are rejected and every error names the key path ("models[0].variants[2].sha256:
expected 64 hex characters"). A variant's ``file`` must be a bare file name, because the
fetcher joins it to the store directory and to the manifest's location.

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
from typing import Literal
from urllib.parse import urljoin, urlparse

import msgspec
import yaml

from agent.catalog.signing import SIGNATURE_SUFFIX, verify_manifest
from agent.config import SigningConfig
from agent.errors import ManifestError

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # a manifest is text; more is a wrong URL, not a manifest
FETCH_TIMEOUT_S = 30.0
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Requires(_Strict, kw_only=True):
    """Where a variant can run: empty lists mean anywhere."""

    arch: list[str] = []  # platform.machine() names as the probe reports them: x86_64, aarch64
    cpu_flags: list[str] = []  # all of these ISA flags must be present, e.g. ["avx2"]


class Variant(_Strict, kw_only=True):
    quant: str
    file: str  # a bare file name, never a path
    size: int
    sha256: str
    urls: list[str] = []  # empty: next to the manifest (same directory or URL prefix)
    quality: float  # higher is better, 1.0 = the reference (e.g. exp(-mean KL vs F16))
    requires: Requires = msgspec.field(default_factory=Requires)


class ModelEntry(_Strict, kw_only=True):
    id: str
    family: str | None = None
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
        raise ManifestError(f"model {model_id!r} is not in the manifest (it has: {known})")


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def location_next_to(manifest_source: str, file: str) -> str:
    """Where a variant without urls lives: beside the manifest (a URL or a local path)."""
    if is_url(manifest_source):
        return urljoin(manifest_source, file)
    return str(Path(manifest_source).parent / file)


def variant_locations(manifest: Manifest, variant: Variant) -> list[str]:
    """The variant's mirrors, or the place next to the manifest when it lists none."""
    if variant.urls:
        return list(variant.urls)
    if manifest.source is None:
        return []
    return [location_next_to(manifest.source, variant.file)]


def _file_name_problem(name: str) -> str | None:
    if not name:
        return "must not be empty"
    if "\x00" in name:
        return "must not contain NUL"
    if "/" in name or "\\" in name:
        return "must be a bare file name, not a path"
    if name in (".", ".."):
        return "must be a file name"
    return None


def _validate(manifest: Manifest) -> None:
    """Checks msgspec's types cannot express; raise on the first, naming its key path."""
    if not manifest.models:
        raise ManifestError("models: must list at least one model", key="models")
    seen_ids: set[str] = set()
    for m, model in enumerate(manifest.models):
        where = f"models[{m}]"
        if not model.id:
            raise ManifestError(f"{where}.id: must not be empty", key=f"{where}.id")
        if model.id in seen_ids:
            raise ManifestError(f"{where}.id: {model.id!r} is listed twice", key=f"{where}.id")
        seen_ids.add(model.id)
        if not model.variants:
            raise ManifestError(f"{where}.variants: must list at least one variant", key=f"{where}.variants")
        quants: set[str] = set()
        for v, variant in enumerate(model.variants):
            at = f"{where}.variants[{v}]"
            problems = {
                "quant": "must not be empty" if not variant.quant else
                f"{variant.quant!r} is listed twice" if variant.quant in quants else None,
                "file": _file_name_problem(variant.file),
                "size": "must be a positive number of bytes" if variant.size <= 0 else None,
                "sha256": None if _SHA256.fullmatch(variant.sha256) else
                "expected 64 hex characters (lower case)",
                "quality": None if 0.0 <= variant.quality <= 1.0 else "must be between 0 and 1",
            }
            for index, url in enumerate(variant.urls):
                if not is_url(url):
                    problems[f"urls[{index}]"] = f"{url!r} is not an http(s) URL"
            for key, problem in problems.items():
                if problem:
                    raise ManifestError(f"{at}.{key}: {problem}", key=f"{at}.{key}")
            quants.add(variant.quant)


def _key_path(error: msgspec.ValidationError) -> str:
    text = str(error)
    message, marker, where = text.partition(" - at `$")
    if not marker:
        return text
    path = where.rstrip("`").lstrip(".") or "(top level)"
    return f"{path}: {message[0].lower()}{message[1:]}"


def parse_manifest(text: str | bytes, source: str | None = None) -> Manifest:
    """Validate a manifest document (pure). ``source`` is kept to resolve bare files."""
    label = source or "manifest"
    try:
        data = yaml.safe_load(text)  # JSON is YAML, so one parser reads both
    except yaml.YAMLError as exc:
        try:
            data = json.loads(text)
        except (ValueError, TypeError):
            raise ManifestError(f"{label}: neither valid YAML nor JSON: {exc}", source=label) from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{label}: the top level must be a mapping", source=label)
    if data.get("schema") != 1:
        raise ManifestError(
            f"{label}: schema: {data.get('schema')!r} is not supported (this agent reads schema 1)",
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
