"""``edge-agent select``: the chosen variant and settings, and with --explain every candidate.

``--memory``/``--vram`` replace the probed budget so an operator can ask what a smaller
device would get; sizes read like 2GiB, 512MiB, 1.5G or plain bytes. ``--json`` prints
the Selection (candidates included). This module parses arguments and formats; the
choice is agent.catalog.select's.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import msgspec

from agent.catalog.manifest import load_manifest
from agent.catalog.select import format_bytes, plan_selection
from agent.catalog.selection import Selection
from agent.catalog.speed import typical_context
from agent.config import AgentConfig, load_config
from agent.errors import ConfigError
from agent.log import configure_logging

HELP = "choose the best-fitting variant of a manifest and explain why"

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
# "1.5G" is what people type for memory sizes and they mean binary units; "GB" stays decimal.
_BINARY_SHORT = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5G' (binary), '2GB' (decimal), '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(f"{text!r} is not a size (examples: 2GiB, 512MiB, 1.5G, 1048576)")
    factor = _BINARY_SHORT.get(unit, _UNITS[unit])
    return int(float(match.group(1)) * factor)


def size_arg(text: str) -> int:
    """argparse type for sizes such as 2GiB, 512MiB, 1.5G."""
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", help="manifest path or http(s) URL (default: model.manifest)")
    parser.add_argument("--config", help="agent config file (YAML)")
    parser.add_argument("--explain", action="store_true", help="show every candidate and why it won or lost")
    parser.add_argument("--json", action="store_true", help="print the Selection as JSON")
    parser.add_argument("--memory", type=size_arg, help="RAM budget instead of the probed one, e.g. 2GiB")
    parser.add_argument("--vram", type=size_arg, help="free VRAM instead of the probed one, e.g. 4GiB")
    parser.add_argument("--headroom", type=size_arg, help="RAM kept free, instead of the profile's")
    parser.add_argument("--profile", help="use this profile instead of matching one")
    parser.add_argument("--pin", help="force a variant by quant, e.g. Q4_K_M (an error if it does not fit)")
    parser.add_argument("--model", help="which model of the manifest (default: the first)")


def quality_sources(selection: Selection, config: AgentConfig) -> dict[str, str]:
    """quant -> where its quality figure came from (measured, prior, or '-' when the manifest
    does not say); read from the manifest again, which the Selection does not carry."""
    if selection.manifest_url is None:
        return {}
    model = load_manifest(selection.manifest_url, config.signing).model(selection.model_id)
    return {v.quant: v.quality_source or "-" for v in model.variants}


def _speed_line(selection: Selection) -> str:
    if not selection.predicted_tokens_per_s:
        return "not predicted (no measured bandwidth, nothing learned yet)"
    line = (f"{selection.predicted_tokens_per_s:.1f} tok/s predicted "
            f"at {typical_context(selection.n_ctx)} tokens of context")
    chosen = next((c for c in selection.candidates if c.verdict == "chosen"), None)
    if chosen is not None and chosen.measured_tokens_per_s:
        line += f", {chosen.measured_tokens_per_s:.1f} measured here"
    return line


def render(selection: Selection, explain: bool, sources: dict[str, str] | None = None) -> str:
    sources = sources or {}
    est = selection.estimate
    ram = est.learned_ram_bytes or est.ram_bytes
    lines = [
        f"model      {selection.model_id}",
        f"variant    {selection.quant}  ({selection.file}, {format_bytes(selection.size)}, "
        f"quality {selection.quality:.4f}"
        + (f" {sources[selection.quant]}" if selection.quant in sources else "") + ")",
        f"settings   n_ctx {selection.n_ctx}, KV {selection.kv_type}, GPU layers {selection.n_gpu_layers}, "
        f"threads {selection.n_threads}, batch {selection.n_batch}, flash_attn {selection.flash_attn}",
        f"memory     needs {format_bytes(ram)} RAM"
        + (f" (learned; raw estimate {format_bytes(est.ram_bytes)})" if est.learned_ram_bytes else "")
        + (f" + {format_bytes(est.vram_bytes)} VRAM" if est.vram_bytes else "")
        + f", budget {format_bytes(selection.budget_bytes)}"
        + (f" + {format_bytes(selection.vram_budget_bytes)} VRAM" if selection.vram_budget_bytes else ""),
        f"           weights {format_bytes(est.weights_bytes)}, KV {format_bytes(est.kv_bytes)}, "
        f"compute {format_bytes(est.compute_bytes)}, overhead {format_bytes(est.overhead_bytes)}, "
        f"process {format_bytes(est.process_bytes)}",
        "speed      " + _speed_line(selection),
        f"profile    {selection.profile}",
        # gguf / manifest:<name> / config:<name> / none: how messages become a prompt
        f"template   {selection.chat_template or '-'}",
    ]
    if explain:
        header = f"{'quant':8} {'quality':>7} {'source':8} {'n_ctx':>6} {'KV':5} {'gpu':>3} {'RAM':>10} {'VRAM':>9} " \
                 f"{'tok/s':>7} {'meas.':>7}  {'verdict':9} reason"
        lines += ["", header, "-" * len(header)]
        for c in selection.candidates:
            need = c.estimate.learned_ram_bytes or c.estimate.ram_bytes
            tps = f"{c.predicted_tokens_per_s:.1f}" if c.predicted_tokens_per_s else "-"
            measured = f"{c.measured_tokens_per_s:.1f}" if c.measured_tokens_per_s else "-"
            lines.append(
                f"{c.quant:8} {c.quality:7.4f} {sources.get(c.quant, '-'):8} {c.n_ctx or '-':>6} {c.kv_type:5} {c.n_gpu_layers:>3} "
                f"{format_bytes(need) if need else '-':>10} "
                f"{format_bytes(c.estimate.vram_bytes) if c.estimate.vram_bytes else '-':>9} "
                f"{tps:>7} {measured:>7}  {c.verdict:9} {c.reason}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    configure_logging(level=os.environ.get("EDGE_AGENT_LOG__LEVEL", "warning"))
    config = load_config(args.config)
    overrides = {}
    if args.pin:
        overrides["pin"] = args.pin
    if args.model:
        overrides["model_id"] = args.model
    if args.headroom is not None:
        overrides["memory_headroom_bytes"] = args.headroom
    if overrides:
        config = msgspec.structs.replace(config, model=msgspec.structs.replace(config.model, **overrides))
    selection = plan_selection(
        config, manifest_source=args.manifest, memory_bytes=args.memory, vram_bytes=args.vram,
        profile=args.profile,
    )
    if args.json:
        sys.stdout.write(msgspec.json.encode(selection).decode() + "\n")
    else:
        print(render(selection, args.explain,
                     quality_sources(selection, config) if args.explain else None))
    return 0
