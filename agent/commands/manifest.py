"""``edge-agent manifest build|check|sign``: make, verify and sign manifests of your models.

``build SOURCE…`` reads each GGUF (a file, a directory of them, or an http(s) URL) and writes
a schema-1 manifest, merging into the one at ``-o`` when it exists; ``--measure-quality``
replaces the quant priors with exp(-mean KL) against the highest-precision variant of each
model. ``check M`` validates the manifest, its signature and every mirror, printing one line
per problem (``model quant code: message``) and exiting 2 when there is any. ``sign M --key
FILE`` writes ``M.sig``; ``keygen FILE`` makes a key pair. The work is agent.catalog.build's,
agent.catalog.signing's and agent.runtime.quality's; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agent.catalog import build
from agent.catalog.manifest import Manifest, load_manifest, parse_manifest
from agent.catalog.signing import SIGNATURE_SUFFIX, generate_keypair, sign_manifest
from agent.config import SigningConfig, load_config
from agent.errors import EdgeAgentError, ManifestError, SignatureError
from agent.fetch.progress import ProgressReporter, TerminalProgressBar
from agent.log import configure_logging

HELP = "build a manifest from your GGUF files, check one, or sign one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("build", help="write a manifest for GGUF files, directories or URLs")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="GGUF file, directory or http(s) URL")
    p.add_argument("-o", "--output", default="manifest.json",
                   help="manifest to write; an existing one is merged into "
                   "(default: manifest.json)")
    p.add_argument("--model-id", help="model id for all the files (default: from general.name)")
    p.add_argument("--url-base",
                   help="mirror URL prefix for local files (default: next to the manifest)")
    p.add_argument("--measure-quality", action="store_true",
                   help="measure exp(-mean KL) against the highest-precision variant "
                   "(runs llama.cpp)")
    p.add_argument("--text", type=Path,
                   help="text to measure quality on (default: the shipped one)")
    p = sub.add_parser("check", help="validate a manifest, its signature and every mirror")
    p.add_argument("manifest", help="manifest path or http(s) URL")
    p.add_argument("--config", help="agent config file whose signing section applies")
    p.add_argument("--public-key", help="Ed25519 public key (base64) to verify the signature with")
    p = sub.add_parser("sign", help="write <MANIFEST>.sig with an Ed25519 private key")
    p.add_argument("manifest", type=Path)
    p.add_argument("--key", type=Path, required=True, help="file holding the base64 private key")
    p = sub.add_parser("keygen", help="write a private key file and print its public key")
    p.add_argument("key", type=Path)


def _progress() -> build.Progress:
    bar = TerminalProgressBar()
    reporters: dict[str, ProgressReporter] = {}

    def report(file: str, done: int, total: int) -> None:
        reporter = reporters.get(file)
        if reporter is None:
            reporter = reporters[file] = ProgressReporter(bar, file=file, total=total)
        if total and done >= total:
            reporter.state("complete", done)
        else:
            reporter.advance(done)

    return report


def _build(args: argparse.Namespace) -> int:
    output = Path(args.output)
    existing: Manifest | None = None
    if output.exists():
        existing = load_manifest(str(output))
    report = _progress()
    parts = [build.inspect_part(source, report) for source in build.expand_sources(args.sources)]
    files = build.combine_parts(parts)
    for facts in files:
        split = f" in {len(facts.parts)} parts" if facts.parts else ""
        print(f"{facts.file}: {facts.quant}, {facts.size} bytes{split}, {facts.name}",
              file=sys.stderr)
    measured = _measure(files, existing, args.text) if args.measure_quality else None
    document = build.build_manifest(files, existing, model_id=args.model_id, url_base=args.url_base,
                                    measured=measured)
    build.write_manifest(document, output)
    apart = [f.file for f in files if not build.is_url(f.location) and not args.url_base
             and Path(os.path.abspath(f.location)).parent != Path(os.path.abspath(output)).parent]
    if apart:
        print(f"note: {len(apart)} files (e.g. {apart[0]}) are not beside {output}, where devices "
              "look for a variant without urls: give --url-base, or write the manifest into "
              "their folder", file=sys.stderr)
    for model in document["models"]:
        for v in model["variants"]:
            print(f"{model['id']:24} {v['quant']:8} {v['quality']:.4f} "
                  f"{v.get('quality_source') or '-':8} {v['file']}")
    print(output)
    return 0


def _measure(files: list[build.FileFacts], existing: Manifest | None,
             text_path: Path | None) -> dict[str, float]:
    """sha256 -> quality for every local file of every model, against its best precision.
    A file already measured in ``existing`` (same sha256) is not measured again, unless the
    reference is new (a higher precision joined the folder): figures against another
    reference would not compare."""
    from agent.runtime.quality import Measurement, measure_quality

    done = {v.sha256 for m in (existing.models if existing else []) for v in m.variants
            if v.quality_source == "measured"}
    text = text_path.read_text() if text_path else None
    measured: dict[str, float] = {}
    groups: dict[tuple[str, str, int], list[build.FileFacts]] = {}
    for facts in files:
        groups.setdefault(build.group_key(facts), []).append(facts)
    for group in groups.values():
        if any(build.is_url(f.location) for f in group):
            raise ManifestError("--measure-quality needs local files (llama.cpp loads them)")
        reference = max(group, key=lambda f: build.precision_rank(f.quant, f.bits_per_weight))
        todo = [f for f in group if f.sha256 not in done or reference.sha256 not in done]
        if not todo:
            continue
        print(f"measuring {len(todo)} variants against {reference.quant}", file=sys.stderr)

        quants = {f.location: f.quant for f in todo}

        def report(m: Measurement) -> None:  # called before the loop moves on
            print(f"  {quants[m.path]:8} mean KL {m.mean_kl:.6f}  quality {m.quality:.4f}",
                  file=sys.stderr)

        results = measure_quality(Path(reference.location), [Path(f.location) for f in todo], text,
                                  progress=report)
        for facts, result in zip(todo, results):
            measured[facts.sha256] = result.quality
    return measured


def _signing(args: argparse.Namespace) -> SigningConfig | None:
    if args.public_key:
        return SigningConfig(public_key=args.public_key)
    if args.config:
        return load_config(args.config).signing
    return None


def _check(args: argparse.Namespace) -> int:
    source = args.manifest
    try:
        manifest = load_manifest(source)
    except EdgeAgentError as exc:
        print(f"- - {exc.code}: {exc.message}")
        return 2
    problems: list[build.Problem] = []
    signing = _signing(args)
    if signing is not None and signing.required:
        try:
            load_manifest(source, signing)
        except SignatureError as exc:
            problems.append(build.Problem(model=None, quant=None,
                                          location=source + SIGNATURE_SUFFIX,
                                          code=exc.code, message=exc.message))
    else:
        print("signature not checked: give --public-key or --config", file=sys.stderr)
    problems += build.check_variants(manifest)
    for p in problems:
        where = f" {p.location}:" if p.location else ""
        print(f"{p.model or '-'} {p.quant or '-'} {p.code}:{where} {p.message}")
    variants = sum(len(m.variants) for m in manifest.models)
    print(f"{source}: {variants} variants, {len(problems)} problems", file=sys.stderr)
    return 2 if problems else 0


def _sign(args: argparse.Namespace) -> int:
    try:
        key = args.key.read_text().strip()
        data = args.manifest.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    parse_manifest(data, str(args.manifest))  # sign only what devices will load
    target = Path(str(args.manifest) + SIGNATURE_SUFFIX)
    target.write_text(sign_manifest(data, key) + "\n")
    print(f"wrote {target}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    private, public = generate_keypair()
    try:
        fd = os.open(args.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ManifestError(f"cannot create {args.key}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as f:
        f.write(private + "\n")
    print(f"public key (put it in signing.public_key): {public}")
    return 0


def run(args: argparse.Namespace) -> int:
    configure_logging(level=os.environ.get("EDGE_AGENT_LOG__LEVEL", "warning"))
    return {"build": _build, "check": _check, "sign": _sign, "keygen": _keygen}[args.action](args)
