"""``edge-agent fetch``: select the variant for this device and put it in the model store.

Selection is agent.catalog.select's (the same choice as ``edge-agent select``, with the
same ``--memory``/``--pin``/``--profile`` overrides); the download, resume, sha256 check
and install are agent.fetch.store's. This module parses arguments, draws the progress bar
on a TTY and prints where the file is: the path, then ``sha256 <hex>`` (or one JSON
object with --json).
"""

from __future__ import annotations

import argparse
import os
import sys

import msgspec

from agent.catalog.select import plan_selection
from agent.commands.select import size_arg
from agent.config import load_config
from agent.fetch.progress import TerminalProgressBar
from agent.fetch.store import ModelStore
from agent.log import configure_logging

HELP = "select and download a model with resume and sha256 check"



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", help="manifest path or http(s) URL (default: model.manifest)")
    parser.add_argument("--config", help="agent config file (YAML)")
    parser.add_argument("--memory", type=size_arg,
                        help="RAM budget instead of the probed one, e.g. 2GiB")
    parser.add_argument("--vram", type=size_arg, help="free VRAM instead of the probed one")
    parser.add_argument("--profile", help="use this profile instead of matching one")
    parser.add_argument("--pin", help="fetch this quant, e.g. Q4_K_M (an error if it does not fit)")
    parser.add_argument("--model", help="which model of the manifest (default: the first)")
    parser.add_argument("--store", help="model store directory (default: cache_dir of the config)")
    parser.add_argument("--json", action="store_true",
                        help="print {path, sha256, quant, size} as JSON")


def run(args: argparse.Namespace) -> int:
    configure_logging(level=os.environ.get("EDGE_AGENT_LOG__LEVEL", "warning"))
    config = load_config(args.config)
    model_overrides = {
        key: value for key, value in (("pin", args.pin), ("model_id", args.model)) if value
    }
    if model_overrides:
        config = msgspec.structs.replace(
            config, model=msgspec.structs.replace(config.model, **model_overrides)
        )
    if args.store:
        # The selector reads GGUF headers from the store first, so it must see the same one.
        config = msgspec.structs.replace(config, cache_dir=args.store)

    selection = plan_selection(
        config, manifest_source=args.manifest, memory_bytes=args.memory, vram_bytes=args.vram,
        profile=args.profile,
    )
    store = ModelStore(config.cache_dir, fetch=config.fetch)
    path = store.ensure(selection, on_progress=TerminalProgressBar(sys.stderr))

    if args.json:
        result = {"path": str(path), "sha256": selection.sha256, "quant": selection.quant,
                  "size": selection.size}
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    else:
        print(path)
        print(f"sha256 {selection.sha256}")
    return 0
