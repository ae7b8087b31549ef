"""``edge-agent run --config F``: the device daemon, as systemd's ExecStart runs it."""

from __future__ import annotations

import argparse
import os

from agent.config import load_config
from agent.log import configure_logging

DEFAULT_CONFIG = "/etc/edge-agent/agent.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help=f"agent YAML config (default: {DEFAULT_CONFIG} when it exists; EDGE_AGENT_* env overrides it)",
    )


def run(args: argparse.Namespace) -> int:
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    config = load_config(path)
    configure_logging(config.log.level, config.log.json)
    # Imported here: paho and the engine are only paid for by the subcommand that needs them.
    from agent.daemon import run_daemon

    return run_daemon(config)
