"""The one ``edge-agent`` command. Subcommands live in agent/commands/<name>.py.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so
``edge-agent probe`` never pays for importing llama_cpp or paho.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from agent import __version__
from agent.errors import EdgeAgentError

SUBCOMMANDS = {
    "probe": "hardware report: CPU and ISA flags, memory, GPU, board, llama.cpp build",
    "select": "choose the best-fitting variant of a manifest and explain why",
    "fetch": "select and download a model with resume and sha256 check",
    "prompt": "run one prompt locally and stream the reply",
    "bench": "prefill/decode tok/s, TTFT and peak RSS per variant",
    "run": "the device daemon (systemd ExecStart)",
    "fleet": "fleet controller, dashboard and its API client",
    "manifest": "build a manifest from your GGUF files, check one, or sign one",
    "releases": "the agent versions on this device; `guard` is the unit's rollback check",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, help_text in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"agent.commands.{name}")
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except EdgeAgentError as exc:
        print(f"edge-agent: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
