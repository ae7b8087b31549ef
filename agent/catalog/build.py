"""Build and check schema-1 manifests from GGUF files: what ``edge-agent manifest`` runs.

A source is a local GGUF file, a directory of them, or an http(s) URL. Each file's quant
comes from its own header (``general.file_type``, else the tensor type holding the most
bytes), never from its name, and files are grouped into models by ``general.name``,
architecture and parameter count. Size and sha256 are streamed once; for a URL whose server
states them (Hugging Face's ``X-Linked-Size`` / ``X-Linked-Etag`` on a resolve URL, which
is the LFS object's sha256) nothing but the header travels.

The parts of a split model (llama.cpp's ``<name>-00001-of-0000N.gguf`` …) become one variant
with its ``parts``: they are grouped by what their headers say (split.count, split.tensors.count
and the tensors they hold, with the shared name prefix), each part's ``split.no`` must match its
name, and a set with parts missing is refused naming them.

Without a measurement a variant's quality is a prior per quant type (QUANT_PRIORS, from
llama.cpp's published figures) and says so: ``quality_source: prior``. Merging into an
existing manifest keeps every entry whose file is unchanged, with its measured quality.

The HTTP here is urllib, like the manifest read (httpx stays in agent/fetch and the GGUF
range reader): one HEAD per URL, and a streamed GET only when the server states no sha256.
This module reads and hashes; it does not download into the store or run llama.cpp.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlparse

import msgspec

from agent.catalog.gguf import (
    GGML_TYPES,
    GGUFInfo,
    GGUFPart,
    merge_split,
    read_gguf_part_file,
    read_gguf_part_url,
    split_name,
    split_part_name,
)
from agent.catalog.manifest import (
    Manifest,
    Part,
    Variant,
    is_url,
    parse_manifest,
    variant_files,
    variant_locations,
)
from agent.errors import ChecksumError, EdgeAgentError, FetchError, GGUFError, ManifestError, shown

HTTP_TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 20
MAX_REDIRECTS = 5
_LINKED_ETAG = re.compile(r'(?:W/)?"?([0-9a-f]{64})"?')

# llama_ftype (llama.h) -> the name llama-quantize gives it. Bit 10 is LLAMA_FTYPE_GUESSED.
LLAMA_FTYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}
_FTYPE_GUESSED = 1024

# Quality priors: llama.cpp's own table of quant types, QUANT_OPTIONS in
# tools/quantize/quantize.cpp (printed by `llama-quantize --help`): file size in GiB and the
# perplexity increase over F16 for Llama-3-8B on wikitext-2, e.g. "Q4_K_M: 4.58G, +0.1754 ppl".
# A prior is F16's perplexity over the variant's, PPL_F16 / (PPL_F16 + delta): the exp(-Δ log
# PPL) that a measured exp(-mean KL) approximates (Δ log PPL is a cross-entropy difference,
# which tracks KL against F16 closely for these types). Llama-3-8B's F16 wikitext-2 PPL is
# about 6.23 (tools/perplexity/README.md). A measured figure always replaces the prior.
PRIOR_REFERENCE_PPL = 6.23
PRIOR_REFERENCE_PARAMS = 8.03e9  # Llama-3-8B: turns the table's GiB into bits per weight
QUANT_PRIORS: dict[str, tuple[float, float]] = {  # quant: (GiB at Llama-3-8B, +PPL)
    "Q2_K": (2.96, 3.5199), "Q2_K_S": (2.96, 3.1836), "Q3_K_S": (3.41, 1.6321),
    "Q3_K_M": (3.74, 0.6569), "Q3_K_L": (4.03, 0.5562), "Q4_0": (4.34, 0.4685),
    "Q4_1": (4.78, 0.4511), "Q4_K_S": (4.37, 0.2689), "Q4_K_M": (4.58, 0.1754),
    "Q5_0": (5.21, 0.1316), "Q5_1": (5.65, 0.1062), "Q5_K_S": (5.21, 0.1049),
    "Q5_K_M": (5.33, 0.0569), "Q6_K": (6.14, 0.0217), "Q8_0": (7.96, 0.0026),
}
# The reference precisions: the table measures against F16; F32 and BF16 are no worse.
_REFERENCE_QUANTS = {"F32": 0, "F16": 1, "BF16": 1}

Progress = Callable[[str, int, int], None]  # (file, bytes done, total)


class PartFacts(msgspec.Struct, kw_only=True):
    """One file as build saw it, before split parts are put together."""

    location: str  # local path or URL
    file: str  # bare file name
    size: int
    sha256: str
    header: GGUFPart


class FilePart(msgspec.Struct, kw_only=True):
    """One file of a split variant, as the manifest lists it."""

    location: str
    file: str
    size: int
    sha256: str


class FileFacts(msgspec.Struct, kw_only=True):
    """One variant as build saw it: a GGUF file, or the parts of a split one."""

    location: str  # local path or URL (a split's first part: llama.cpp opens the rest beside it)
    file: str  # bare file name
    size: int  # a split's parts together
    sha256: str  # a split's first part's
    quant: str
    architecture: str
    name: str  # general.name, or the file name when the writer set none
    parameters: int
    bits_per_weight: float
    parts: list[FilePart] = []  # a split's files in order; empty for one file


def quant_of(info: GGUFInfo) -> str:
    """The quant type a header says: general.file_type, else the dominant tensor type."""
    if info.file_type is not None:
        name = LLAMA_FTYPES.get(info.file_type & ~_FTYPE_GUESSED)
        if name:
            return name
    by_type: dict[int, int] = {}
    for tensor in info.tensors:
        if len(tensor.shape) >= 2:  # norms and biases stay F32 in every quant
            by_type[tensor.ggml_type] = by_type.get(tensor.ggml_type, 0) + tensor.nbytes
    if not by_type:
        raise GGUFError("the header names no file type and holds no weight matrices")
    return GGML_TYPES[max(by_type, key=by_type.__getitem__)][0]


def parameter_count(info: GGUFInfo) -> int:
    return sum(math.prod(t.shape) for t in info.tensors)


def prior_quality(quant: str, bits_per_weight: float) -> float:
    """The published-figure prior for ``quant``; a type the table lacks (IQ*, TQ*) is placed
    on the table's curve by its bits per weight, which is what its quality mostly follows."""
    if quant in _REFERENCE_QUANTS:
        return 1.0
    if quant in QUANT_PRIORS:
        delta = QUANT_PRIORS[quant][1]
        return round(PRIOR_REFERENCE_PPL / (PRIOR_REFERENCE_PPL + delta), 4)
    points = sorted(
        (gib * 2**30 * 8 / PRIOR_REFERENCE_PARAMS, PRIOR_REFERENCE_PPL / (PRIOR_REFERENCE_PPL + d))
        for gib, d in QUANT_PRIORS.values()
    )
    if bits_per_weight <= points[0][0]:
        return round(points[0][1] * bits_per_weight / points[0][0], 4)
    for (b0, q0), (b1, q1) in zip(points, points[1:]):
        if b0 <= bits_per_weight <= b1:
            return round(q0 + (q1 - q0) * (bits_per_weight - b0) / (b1 - b0 or 1), 4)
    return round(points[-1][1], 4)


def precision_rank(quant: str, bits_per_weight: float) -> float:
    """Higher is closer to the original weights: the reference for measured quality."""
    if quant in _REFERENCE_QUANTS:
        return 100.0 - _REFERENCE_QUANTS[quant]
    return bits_per_weight


def sha256_of_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(path.name, done, total)
    return digest.hexdigest()


def _facts(parts: list[PartFacts], info: GGUFInfo) -> FileFacts:
    parameters = parameter_count(info)
    name = info.metadata.get("general.name")
    first = parts[0]
    return FileFacts(
        location=first.location, file=first.file, size=sum(p.size for p in parts),
        sha256=first.sha256, quant=quant_of(info),
        architecture=info.architecture, name=name if isinstance(name, str) and name else first.file,
        parameters=parameters,
        bits_per_weight=info.tensor_bytes * 8 / parameters if parameters else 0.0,
        parts=[FilePart(location=p.location, file=p.file, size=p.size, sha256=p.sha256)
               for p in parts] if len(parts) > 1 else [],
    )


def inspect_part_file(path: Path, progress: Progress | None = None) -> PartFacts:
    """Header, size and sha256 of a local GGUF file (a whole model or a split part)."""
    header = read_gguf_part_file(path)
    return PartFacts(location=str(path), file=path.name, size=path.stat().st_size,
                     sha256=sha256_of_file(path, progress), header=header)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Hugging Face puts X-Linked-* on the resolve URL's redirect, not on the CDN's answer.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


class RemoteFacts(msgspec.Struct, kw_only=True):
    """What a server says about a URL without sending the body."""

    url: str  # after redirects
    status: int
    size: int | None
    sha256: str | None  # only when the server states it (X-Linked-Etag)


def head(url: str) -> RemoteFacts:
    """HEAD ``url``, following redirects by hand so the first hop's X-Linked-* are seen."""
    size = sha256 = None
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        request = urllib.request.Request(current, method="HEAD",
                                         headers={"Accept-Encoding": "identity"})
        try:
            response = _opener.open(request, timeout=HTTP_TIMEOUT_S)
            status, headers = response.status, response.headers
            response.close()
        except urllib.error.HTTPError as exc:  # 4xx/5xx, and the 3xx this opener leaves to us
            status, headers = exc.code, exc.headers
            exc.close()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError(f"{shown(url, 200)}: unreachable: {reason}", url=url) from exc
        linked_size = headers.get("X-Linked-Size", "")
        match = _LINKED_ETAG.fullmatch(headers.get("X-Linked-Etag", "").strip())
        if size is None and linked_size.isascii() and linked_size.isdigit():
            size = int(linked_size)
        if sha256 is None and match:
            sha256 = match.group(1)
        location = headers.get("Location")
        if status in (301, 302, 303, 307, 308) and location:
            current = urljoin(current, location)
            continue
        length = headers.get("Content-Length", "")
        if size is None and status == 200 and length.isascii() and length.isdigit():
            size = int(length)
        return RemoteFacts(url=current, status=status, size=size, sha256=sha256)
    raise FetchError(f"{shown(url, 200)}: more than {MAX_REDIRECTS} redirects", url=url)


def stream_sha256(url: str, progress: Progress | None = None) -> tuple[int, str]:
    """(size, sha256) of the body behind ``url``, read once and never kept."""
    digest = hashlib.sha256()
    done = 0
    name = _url_file_name(url)
    try:
        request = urllib.request.Request(url, headers={"Accept-Encoding": "identity"})
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(CHUNK_BYTES):
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(name, done, total)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"{shown(url, 200)}: cannot read: {reason}", url=url) from exc
    if total and done != total:  # a cut connection would hash a prefix
        raise FetchError(f"{shown(url, 200)}: {done} of {total} bytes arrived", url=url)
    return done, digest.hexdigest()


def _url_file_name(url: str) -> str:
    return unquote(urlparse(url).path.rsplit("/", 1)[-1]) or "model.gguf"


def inspect_part_url(url: str, progress: Progress | None = None) -> PartFacts:
    """Header by Range reads; size and sha256 from the server when it states them (so the
    body never travels), else from one streamed read."""
    remote = head(url)
    if remote.status >= 400:
        raise FetchError(f"{shown(url, 200)}: HTTP {remote.status}", url=url, status=remote.status)
    header = read_gguf_part_url(url)
    if remote.sha256 and remote.size:
        size, sha256 = remote.size, remote.sha256
    else:
        size, sha256 = stream_sha256(url, progress)
    return PartFacts(location=url, file=_url_file_name(url), size=size, sha256=sha256,
                     header=header)


def expand_sources(sources: Iterable[str]) -> list[str]:
    """Files and URLs, with each directory replaced by its *.gguf files in name order."""
    out: list[str] = []
    for source in sources:
        if is_url(source):
            out.append(source)
            continue
        path = Path(source)
        if path.is_dir():
            out += [str(p) for p in sorted(path.glob("*.gguf")) if p.is_file()]
        elif path.is_file():
            out.append(str(path))
        else:
            raise ManifestError(f"{shown(source, 200)}: no such file, directory or URL")
    if not out:
        raise ManifestError("no GGUF files in the sources given")
    return out


def inspect_part(source: str, progress: Progress | None = None) -> PartFacts:
    """One file's header, size and sha256, whether it is a whole model or a split part."""
    if is_url(source):
        return inspect_part_url(source, progress)
    return inspect_part_file(Path(source), progress)


def inspect(source: str, progress: Progress | None = None) -> FileFacts:
    """One whole GGUF file as a variant; a split part alone is refused (its set is not here)."""
    return combine_parts([inspect_part(source, progress)])[0]


def _split_key(facts: PartFacts) -> tuple[str, int, int] | None:
    """What the parts of one split share: the name prefix and, from their headers, the part
    and tensor counts. None for a file that is not a split part."""
    split = facts.header.split
    if split is None or split.count == 1:
        return None
    named = split_name(facts.file)
    if named is None or named[1:] != (split.no + 1, split.count):
        said = f"part {split.no + 1} of {split.count}"
        raise ManifestError(
            f"{facts.file}: the header says it is {said} of a split, the name does not "
            "(llama.cpp finds parts by name: "
            f"{split_part_name('<name>', split.no + 1, split.count)})")
    return (named[0], split.count, split.tensors_count)


def combine_parts(files: list[PartFacts]) -> list[FileFacts]:
    """Variants from inspected files: a whole GGUF is one, the parts of a split together
    are one (in order), grouped by their headers' split keys and name prefix. A set with a
    part missing or given twice is refused, naming what is wrong."""
    out: list[FileFacts] = []
    splits: dict[tuple[str, int, int], dict[int, PartFacts]] = {}
    for facts in files:
        key = _split_key(facts)
        if key is None:
            out.append(_facts([facts], merge_split([facts.header], facts.location)))
            continue
        assert facts.header.split is not None
        number = facts.header.split.no + 1
        have = splits.setdefault(key, {})
        if number in have and have[number].sha256 != facts.sha256:
            raise ManifestError(f"{facts.file}: two different files are part {number} of "
                                f"{key[1]} ({shown(have[number].location, 200)} and "
                                f"{shown(facts.location, 200)})")
        have[number] = facts
    for (prefix, count, tensors), have in splits.items():
        missing = [split_part_name(prefix, n, count) for n in range(1, count + 1) if n not in have]
        if missing:
            raise ManifestError(
                f"{prefix}: a split of {count} parts ({tensors} tensors) with {len(missing)} "
                f"missing: {shown(', '.join(missing), 300)}; give every part")
        parts = [have[n] for n in range(1, count + 1)]
        out.append(_facts(parts, merge_split([p.header for p in parts], parts[0].location)))
    return out


def model_id_of(facts: FileFacts) -> str:
    """A manifest id from general.name: lower case, runs of other characters as '-'."""
    slug = re.sub(r"[^a-z0-9._+]+", "-", facts.name.lower()).strip("-._+")
    return slug[:128] or facts.architecture


def group_key(facts: FileFacts) -> tuple[str, str, int]:
    """Files of one model share general.name, architecture and parameter count."""
    return (facts.name, facts.architecture, facts.parameters)


def build_manifest(
    files: list[FileFacts],
    existing: Manifest | None = None,
    *,
    model_id: str | None = None,
    url_base: str | None = None,
    measured: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A schema-1 manifest document (pure) for ``files``, merged into ``existing``.

    An existing variant of the same model and file name is kept as it is (quality and all)
    when its size and sha256 are the files'; a changed file's entry is rebuilt. ``measured``
    maps sha256 to a measured quality, which replaces a prior."""
    measured = measured or {}
    models = _existing_models(existing)
    for group in _group_by_model(files, model_id).values():
        mid = model_id or model_id_of(group[0])
        model = models.setdefault(mid, {"id": mid, "family": group[0].architecture, "variants": []})
        for facts in sorted(group, key=lambda f: -precision_rank(f.quant, f.bits_per_weight)):
            _merge_variant(model["variants"], facts, mid, url_base, measured)
    document = {"schema": 1, "models": list(models.values())}
    parse_manifest(_json(document))  # what we write must load: raise here, not on the device
    return document


def _existing_models(existing: Manifest | None) -> dict[str, dict[str, Any]]:
    """The existing manifest's models as documents, by id."""
    models: dict[str, dict[str, Any]] = {}
    for entry in existing.models if existing else []:
        models[entry.id] = msgspec.to_builtins(entry)
        # What the entry left unsaid stays unsaid (no nulls, no empty requires).
        if entry.family is None:
            models[entry.id].pop("family")
        if entry.chat_format is None:
            models[entry.id].pop("chat_format")
        for variant in models[entry.id]["variants"]:
            if variant["quality_source"] is None:
                variant.pop("quality_source")
            if variant["chat_format"] is None:
                variant.pop("chat_format")
            if not any(variant["requires"].values()):
                variant.pop("requires")
            if not variant["parts"]:
                variant.pop("parts")
    return models


def _group_by_model(
    files: list[FileFacts], model_id: str | None
) -> dict[tuple[str, str, int], list[FileFacts]]:
    groups: dict[tuple[str, str, int], list[FileFacts]] = {}
    for facts in files:
        groups.setdefault(group_key(facts), []).append(facts)
    if model_id and len(groups) > 1:
        names = ", ".join(sorted({f.name for f in files}))
        raise ManifestError(
            f"--model-id names one model, the files hold {len(groups)}: {shown(names, 200)}")
    return groups


def _urls_of(facts: FileFacts | FilePart, url_base: str | None) -> list[str]:
    """A URL source is its own mirror; a local file's is under ``url_base``, if given."""
    return [facts.location] if is_url(facts.location) else (
        [f"{url_base.rstrip('/')}/{facts.file}"] if url_base else [])


def _merge_variant(variants: list[dict[str, Any]], facts: FileFacts, mid: str,
                   url_base: str | None, measured: dict[str, float]) -> None:
    """Put ``facts`` into a model's variants: an unchanged file keeps its entry, a changed
    one's entry is rebuilt in place, a new one is appended."""
    parts = [{"file": p.file, "size": p.size, "sha256": p.sha256, "urls": _urls_of(p, url_base)}
             for p in facts.parts]
    old = next((v for v in variants if v["file"] == facts.file), None)
    same_parts = [(p["file"], p["size"], p["sha256"]) for p in old.get("parts", [])] == \
        [(p.file, p.size, p.sha256) for p in facts.parts] if old is not None else False
    if old is not None and old["sha256"] == facts.sha256 and old["size"] == facts.size \
            and same_parts:
        if facts.sha256 in measured:
            old.update(quality=measured[facts.sha256], quality_source="measured")
        return
    clash = next((v for v in variants if v["quant"] == facts.quant and v is not old), None)
    if clash is not None:
        raise ManifestError(
            f"{facts.file} and {clash['file']} are both {facts.quant} of model {mid}: "
            "give them separate --model-id runs or remove one")
    variant: dict[str, Any] = {
        "quant": facts.quant, "file": facts.file, "size": facts.size,
        "sha256": facts.sha256, "urls": [] if parts else _urls_of(facts, url_base),
    }
    if parts:
        variant["parts"] = parts
    if facts.sha256 in measured:
        variant.update(quality=measured[facts.sha256], quality_source="measured")
    else:
        variant.update(quality=prior_quality(facts.quant, facts.bits_per_weight),
                       quality_source="prior")
    if old is not None:
        variants[variants.index(old)] = variant
    else:
        variants.append(variant)


def _json(document: dict[str, Any]) -> bytes:
    return msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n"


def write_manifest(document: dict[str, Any], path: Path) -> None:
    """Write atomically: a reader sees the old manifest or the new one, never half."""
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(_json(document))
    os.replace(partial, path)


class Problem(msgspec.Struct, kw_only=True):
    """One thing ``manifest check`` found wrong, with a stable code from agent.errors."""

    model: str | None
    quant: str | None
    location: str | None
    code: str
    message: str


def check_location(
    expected: Variant | Part, location: str
) -> tuple[list[tuple[str, str]], GGUFPart | None]:
    """(code, message) for what is wrong with one mirror of a file, and the header read there
    (None when it could not be read).

    A URL costs a HEAD and the header's Range reads; size and sha256 are compared where the
    server states them. A local file is hashed: that is the one way to know it."""
    problems: list[tuple[str, str]] = []
    try:
        if is_url(location):
            remote = head(location)
            if remote.status >= 400:
                return [(FetchError.code, f"HTTP {remote.status}")], None
            header = read_gguf_part_url(location)
            size, sha256 = remote.size, remote.sha256
        else:
            path = Path(location)
            if not path.is_file():
                return [(FetchError.code, "no such file")], None
            header = read_gguf_part_file(path)
            size, sha256 = path.stat().st_size, sha256_of_file(path)
    except EdgeAgentError as exc:
        return [(exc.code, exc.message)], None
    if size is not None and size != expected.size:
        problems.append((ChecksumError.code, f"size is {size}, the manifest says {expected.size}"))
    if sha256 is not None and sha256 != expected.sha256:
        problems.append((ChecksumError.code,
                         f"sha256 is {sha256}, the manifest says {expected.sha256}"))
    return problems, header


def _header_problems(
    variant: Variant, headers: list[GGUFPart], label: str
) -> list[tuple[str, str]]:
    """What the headers of a variant's files, put together, say against the manifest."""
    try:
        quant = quant_of(merge_split(headers, label))
    except GGUFError as exc:
        return [(exc.code, exc.message)]
    if quant != variant.quant:
        return [(ManifestError.code, f"the header says {quant}, the manifest says {variant.quant}")]
    return []


def check_variants(manifest: Manifest) -> list[Problem]:
    """Every mirror of every file of every variant, checked; a file with no mirror at all is
    a problem. The quant is checked once per variant, on the first header each file gave."""
    found: list[Problem] = []
    for model in manifest.models:
        for variant in model.variants:
            files = variant_files(variant)
            headers: list[GGUFPart | None] = []
            first_location: str | None = None
            for file in files:
                locations = variant_locations(manifest, file)
                # A split variant's messages name the part they are about.
                part = f"{file.file}: " if variant.parts else ""
                if not locations:
                    found.append(Problem(model=model.id, quant=variant.quant, location=None,
                                         code=ManifestError.code,
                                         message=f"{part}no urls and no manifest location"))
                header = None
                for location in locations:
                    problems, read = check_location(file, location)
                    header = header or read
                    first_location = first_location or location
                    for code, message in problems:
                        found.append(Problem(model=model.id, quant=variant.quant,
                                             location=location, code=code,
                                             message=part + message))
                headers.append(header)
            complete = [h for h in headers if h is not None]
            if first_location is not None and len(complete) == len(files):
                for code, message in _header_problems(variant, complete, first_location):
                    found.append(Problem(model=model.id, quant=variant.quant,
                                         location=first_location, code=code, message=message))
    return found
