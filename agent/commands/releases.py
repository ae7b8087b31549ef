"""``edge-agent releases``: the agent versions an ``upgrade`` installed on this device.

``show`` prints the links (current, previous, installed), an open trial and the last outcome
as JSON. ``guard`` is edge-agent.service's ExecStartPre: it gives a new version one start and
brings the previous one back when that start did not reach ready (agent.upgrade.guard). It
runs from root's venv, never from the version it judges.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.log import configure_logging

HELP = "the agent versions on this device; `guard` is the unit's rollback check"
DEFAULT_RELEASES = "/opt/edge-agent/releases"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("show", "guard"))
    parser.add_argument("--dir", default=DEFAULT_RELEASES,
                        help=f"the releases directory (default {DEFAULT_RELEASES})")


def run(args: argparse.Namespace) -> int:
    from agent import upgrade

    root = Path(args.dir)
    if args.action == "show":
        print(json.dumps(upgrade.show(root), indent=2))
        return 0
    configure_logging("info", True)
    if not root.is_dir():
        return 0  # installed without releases (an older install.sh): nothing to guard
    print(f"releases guard: {upgrade.guard(root)}")
    return 0
