"""``edge-agent prompt "..."``: one prompt through the engine, streamed to the terminal.

The model runs in a worker process exactly as under the daemon (canary, fallback ladder,
remembered settings), so this is also the quickest check that a device can serve.
``--manifest`` follows the daemon's signature rules (``signing`` in the config, or
``--public-key`` / ``--allow-unsigned``). ``--json`` prints the final record instead of the
stream. This module only parses arguments and prints; the work is agent.runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

import msgspec

from agent.config import AgentConfig, SigningConfig, load_config
from agent.errors import ConfigError, EdgeAgentError
from agent.log import configure_logging

HELP = "run one prompt locally and stream the reply"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="the prompt (a user message unless --raw)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a GGUF file to run")
    source.add_argument("--manifest", help="a manifest: run what `select` would choose")
    parser.add_argument("--config", help="agent config file (state dir, runtime settings)")
    parser.add_argument("--system", help="a system message before the prompt")
    parser.add_argument("--raw", action="store_true", help="complete the text as is, no chat template")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--n-ctx", type=int, default=None, help="context size (default: 4096 or the model's)")
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--json", action="store_true", help="print the final record as JSON")
    add_signing_arguments(parser)


def add_signing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--public-key`` / ``--allow-unsigned``: the config's ``signing`` section, per run."""
    signing = parser.add_mutually_exclusive_group()
    signing.add_argument("--public-key", help="Ed25519 key (base64) the manifest must be signed "
                         "with (default: signing.public_key of the config)")
    signing.add_argument("--allow-unsigned", action="store_true",
                         help="load a manifest without a signature (as signing.allow_unsigned)")


def with_signing_arguments(config: AgentConfig, args: argparse.Namespace) -> AgentConfig:
    """``config`` with its ``signing`` replaced by the flags, when any is given."""
    try:
        if args.public_key:
            signing = SigningConfig(public_key=args.public_key)
        elif args.allow_unsigned:
            signing = SigningConfig(allow_unsigned=True)
        else:
            return config
    except ValueError as exc:
        raise ConfigError(f"--public-key: {exc}", key="signing.public_key") from None
    return msgspec.structs.replace(config, signing=signing)


def _selection(args: argparse.Namespace, config):
    from agent.runtime.local import manifest_selections, next_smaller, selection_for_file

    if args.model:
        return selection_for_file(args.model, n_ctx=args.n_ctx, n_threads=args.threads), None
    source = args.manifest or config.model.manifest
    if not source:
        raise EdgeAgentError("give --model PATH or --manifest M (or model.manifest in the config)")
    try:
        from agent.catalog.select import plan_selection
    except ImportError:
        plan_selection = None
    _, local = manifest_selections(
        source, config.signing, n_ctx=args.n_ctx, n_threads=args.threads
    )
    if plan_selection is not None:
        chosen = plan_selection(config, manifest_source=source, state_dir=config.state_dir)
        match = next((s for s in local if s.sha256 == chosen.sha256), None)
        if match is not None:
            return msgspec.structs.replace(chosen, model_path=match.model_path), next_smaller(local)
    return local[0], next_smaller(local)


def run(args: argparse.Namespace) -> int:
    from agent.runtime.engine import Engine
    from agent.runtime.request import GenerateRequest, validate_request

    configure_logging(level=os.environ.get("EDGE_AGENT_LOG__LEVEL", "warning"))
    config = with_signing_arguments(load_config(args.config), args)
    selection, smaller = _selection(args, config)

    def on_event(event: dict) -> None:
        if event["event"] == "canary_fallback":
            print(f"edge-agent: {event['message']}", file=sys.stderr)

    messages = None
    if not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.text}
        ]
    request = msgspec.convert(
        {
            "id": uuid.uuid4().hex,
            "messages": messages,
            "prompt": args.text if args.raw else None,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
        },
        GenerateRequest,
    )
    validate_request(request)  # before the model loads: bad input costs nothing
    engine = Engine(config.runtime, state_dir=Path(config.state_dir), device_id=config.device_id, on_event=on_event)
    try:
        engine.load(selection, smaller=smaller)
        final: dict = {}
        for record in engine.generate(request):
            if record.get("done"):
                final = record
            elif not args.json:
                sys.stdout.write(record["delta"])
                sys.stdout.flush()
    finally:
        engine.close()
    if args.json:
        print(json.dumps(final, indent=2))
    elif "error" not in final:
        sys.stdout.write("\n")
    if "error" in final:
        error = final["error"]
        if not args.json:
            print(f"edge-agent: error [{error['code']}]: {error['message']}", file=sys.stderr)
        return 2
    return 0
