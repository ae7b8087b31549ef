"""``edge-agent fleet``: run the controller (``serve``) or drive one through its HTTP API.

Client subcommands take the controller URL from ``--url`` or EDGE_AGENT_FLEET_URL and the
API token from ``--token-file`` or EDGE_AGENT_FLEET_TOKEN (never from argv: it would show
in ps and shell history). ``hash-secret`` reads a secret from stdin and prints the hash for
the config's auth section.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from agent.config import read_secret
from agent.errors import RequestError

HELP = "fleet controller, dashboard and its API client"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    _add_local_commands(sub)
    _add_device_commands(sub)
    _add_hosting_commands(sub)
    _add_rollout_command(sub)


_Subparsers = argparse._SubParsersAction  # what add_subparsers returns


def _add_local_commands(sub: _Subparsers) -> None:
    """The subcommands that run here, without a controller URL."""
    serve = sub.add_parser("serve", help="run the controller, dashboard, API and model hosting")
    serve.add_argument("--config", help="fleet YAML config (FleetConfig)")

    key = sub.add_parser(
        "signing-key", help="print the controller's manifest-signing public key (for install.sh)"
    )
    key.add_argument("--config", help="fleet YAML config (FleetConfig)")
    key.add_argument("--json", action="store_true", help="print JSON")

    hashing = sub.add_parser(
        "hash-secret", help="hash a password or token (read from stdin) for the config"
    )
    hashing.add_argument(
        "--method",
        choices=["scrypt", "pbkdf2_sha256", "sha256"],
        default="scrypt",
        help="scrypt (default) or pbkdf2_sha256 for the admin password; sha256 for a random "
        "API token (api_token_hashes): a wrong token then costs the controller almost nothing",
    )

    acl = sub.add_parser(
        "acl", help="print a Mosquitto ACL for the devices, pools and accounts of an inventory"
    )
    acl.add_argument("--inventory", required=True, help="inventory YAML (see agent/fleet/acl.py)")


def _client_parser(sub: _Subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand that talks to a controller's API: its URL, token file and --json."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument(
        "--url", default=os.environ.get("EDGE_AGENT_FLEET_URL"), help="controller URL"
    )
    p.add_argument(
        "--token-file", help="file holding the API token (default: $EDGE_AGENT_FLEET_TOKEN)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _add_device_commands(sub: _Subparsers) -> None:
    """List devices, show one, prompt one and send one a command."""
    devices = _client_parser(sub, "devices", "list devices with state, model and throughput")
    devices.add_argument("--state", help="only devices in this state (ready, stale, lost …)")

    device = _client_parser(sub, "device", "one device's status, meta and latest telemetry")
    device.add_argument("device")

    prompt = _client_parser(
        sub, "prompt", "send a prompt to a device, a model or a pool and stream the reply"
    )
    prompt.add_argument(
        "device",
        metavar="target",
        help="a device id, model/<model id> (the least busy ready device that has it) or "
        "pool/<name> (the pool's shared subscription)",
    )
    prompt.add_argument("text")
    prompt.add_argument("--max-tokens", type=int, default=128)
    prompt.add_argument("--temperature", type=float, default=0.7)
    prompt.add_argument("--system", help="a system message before the prompt")

    cmd = _client_parser(
        sub,
        "cmd",
        "send a command (reload, drain, resume, rebirth, bench, pin, select, fetch, "
        "set_manifest, upgrade)",
    )
    cmd.add_argument("device")
    cmd.add_argument("op")
    cmd.add_argument(
        "--args", default="{}", help='the op\'s args as JSON, e.g. \'{"quant": "Q4_K_M"}\''
    )
    cmd.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for cmd/result (0: do not wait)"
    )


def _add_hosting_commands(sub: _Subparsers) -> None:
    """The manifests and wheels the controller hosts."""
    manifests = _client_parser(
        sub, "manifests", "list manifests hosted by the controller, or publish one"
    )
    manifests.add_argument(
        "--publish", metavar="FILE", help="publish this manifest file (its name is kept)"
    )

    wheels = _client_parser(
        sub, "wheels", "list the wheelhouse, or add an engine or edge-agent wheel to it"
    )
    wheels.add_argument("action", choices=["list", "add"])
    wheels.add_argument("wheel", nargs="?", help="the .whl file (add)")
    wheels.add_argument(
        "--key", help="an engine wheel's build key (scripts/setup --print-build-key where built)"
    )
    wheels.add_argument("--cmake-args", help="its CMAKE_ARGS (checked against --key)")
    wheels.add_argument("--python", help="the builder's sys.implementation.cache_tag (cpython-311)")
    wheels.add_argument("--platform", help="the builder's sysconfig.get_platform() (linux-x86_64)")


def _add_rollout_command(sub: _Subparsers) -> None:
    rollout = _client_parser(sub, "rollout", "plan, start, watch or roll back a rollout")
    rollout.add_argument(
        "action", choices=["plan", "start", "status", "events", "list", "rollback"]
    )
    rollout.add_argument("rollout_id", nargs="?", help="for status, events and rollback")
    rollout.add_argument("--manifest", help="hosted manifest name or URL (plan, start)")
    rollout.add_argument("--pin", help="pin this quant after the manifest is set")
    rollout.add_argument("--group", help="glob on device ids, e.g. 'store-*'")
    rollout.add_argument("--pool", help="devices of this pool")
    rollout.add_argument(
        "--filter", help="inventory filter, e.g. 'ram_gib>=4 and label:site=store-12'"
    )
    rollout.add_argument("--device", action="append", default=[], help="a device id (repeatable)")
    rollout.add_argument("--rate", type=float, help="devices started per minute (default 10)")
    rollout.add_argument("--base-rate", type=float, help="a ramp instead: its first rate")
    rollout.add_argument("--increment-factor", type=float, help="the ramp's step (x2)")
    rollout.add_argument("--ramp-every", type=int, help="successes per ramp step (5)")
    rollout.add_argument("--max-rate", type=float, help="the ramp's ceiling")
    rollout.add_argument("--max-in-progress", type=int, help="devices in progress at once")
    rollout.add_argument("--pinned", action="store_true", help="no devices join once started")
    rollout.add_argument(
        "--abort-percent", type=float, help="abort when more than this %% fail (20)"
    )
    rollout.add_argument("--min-devices", type=int, help="finished devices before that (5)")
    rollout.add_argument("--max-failures", type=int, help="abort past this many failures")
    rollout.add_argument("--soak", type=float, help="seconds healthy after the canary (30)")
    rollout.add_argument("--device-timeout", type=float, help="seconds to pass the health gate")


def run(args: argparse.Namespace) -> int:
    if args.fleet_command == "serve":
        return _serve(args)
    if args.fleet_command == "signing-key":
        return _signing_key(args)
    if args.fleet_command == "hash-secret":
        from agent.fleet.auth import hash_secret

        secret = (
            sys.stdin.readline().rstrip("\n")
            if not sys.stdin.isatty()
            else getpass.getpass("secret: ")
        )
        if not secret:
            raise RequestError("secret: empty", field="secret")
        print(hash_secret(secret, method=args.method))
        return 0
    if args.fleet_command == "acl":
        from agent.fleet.acl import load_inventory, render_acl

        print(render_acl(load_inventory(args.inventory)), end="")
        return 0
    from agent.fleet.client import FleetClient

    token = (
        read_secret(args.token_file, "fleet-token")
        if args.token_file
        else os.environ.get("EDGE_AGENT_FLEET_TOKEN")
    )
    client = FleetClient(args.url, token)
    return {
        "devices": _devices,
        "device": _device,
        "prompt": _prompt,
        "cmd": _cmd,
        "manifests": _manifests,
        "rollout": _rollout,
        "wheels": _wheels,
    }[args.fleet_command](client, args)


def _serve(args: argparse.Namespace) -> int:
    from agent.config import load_fleet_config
    from agent.fleet.service import FleetService
    from agent.log import configure_logging

    config = load_fleet_config(args.config)
    configure_logging(config.log.level, config.log.json)
    FleetService(config).serve_forever()
    return 0


def _signing_key(args: argparse.Namespace) -> int:
    """Read on the controller's host, from its own file: no network to trust for the key."""
    from agent.config import load_fleet_config
    from agent.errors import ConfigError
    from agent.fleet.controller import signing_key_path
    from agent.fleet.hosting import ControllerKey

    path = signing_key_path(load_fleet_config(args.config))
    if not path.exists():
        raise ConfigError(f"no signing key at {path} yet: start the controller once (it makes it)")
    key = ControllerKey.load(path)
    if args.json:
        _print_json({"algorithm": "ed25519", "public_key": key.public_key, "key_id": key.key_id})
    else:
        print(key.public_key)
        print(f"key_id {key.key_id}  (install.sh --signing-key {key.public_key})", file=sys.stderr)
    return 0


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _devices(client, args) -> int:
    data = client.devices(args.state)
    if args.json:
        _print_json(data)
        return 0
    summary = data["summary"]
    counts = ", ".join(f"{n} {state}" for state, n in summary["counts"].items() if n)
    print(
        f"{summary['devices']} devices ({counts or 'none'}), {summary['decode_tps_total']} tok/s total"
    )
    header = f"{'DEVICE':24} {'STATE':9} {'MODEL':24} {'QUANT':8} {'TOK/S':>7} {'TEMP':>6}  BOARD"
    print(header)
    for row in data["devices"]:
        print(
            f"{row['id'][:24]:24} {row['state']:9} {row['model'][:24]:24} {row['quant']:8} "
            f"{_fmt(row['decode_tps'], '.1f'):>7} {_fmt(row['temp_c'], '.0f'):>6}  {row['board']}"
        )
    return 0


def _device(client, args) -> int:
    _print_json(client.device(args.device))
    return 0


def _prompt(client, args) -> int:
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.text}
    ]
    request = {"messages": messages, "max_tokens": args.max_tokens, "temperature": args.temperature}
    streamed = False
    kind, slash, name = args.device.partition("/")
    if slash and kind == "model":
        records = client.prompt_target(name, request)
    elif slash:
        records = client.prompt_target(args.device, request)  # pool/<name>, device/<id>
    else:
        records = client.prompt(args.device, request)
    for record in records:
        if args.json:
            print(json.dumps(record), flush=True)
        elif "delta" in record:
            streamed = True
            print(record["delta"], end="", flush=True)
        if record.get("done"):
            if "error" in record:
                error = record["error"]
                print(
                    f"\nedge-agent: error [{error.get('code')}]: {error.get('message')}",
                    file=sys.stderr,
                )
                return 1
            if not args.json:
                if not streamed:
                    print(record.get("text", ""), end="")
                print()
    return 0


def _cmd(client, args) -> int:
    try:
        command_args = json.loads(args.args)
    except ValueError as exc:
        raise RequestError(f"--args: not valid JSON ({exc})", field="args") from None
    result = client.command(args.device, args.op, command_args, wait_s=args.wait)
    _print_json(result)
    if result.get("pending"):
        return 0 if args.wait == 0 else 3  # no cmd/result in time; the command may still complete
    return 0 if result.get("ok") else 1


def _manifests(client, args) -> int:
    if args.publish:
        with open(args.publish, encoding="utf-8") as handle:
            _print_json(client.publish_manifest(os.path.basename(args.publish), handle.read()))
        return 0
    data = client.manifests()
    if args.json:
        _print_json(data)
        return 0
    for manifest in data["manifests"]:
        for model in manifest.get("models", []):
            quants = " ".join(v["quant"] for v in model["variants"])
            print(f"{manifest['name']:32} {model['id']:28} {quants}")
        if "error" in manifest:
            print(f"{manifest['name']:32} INVALID: {manifest['error']}")
    return 0


# RolloutSpec field -> option, each sent only when given (the controller has the defaults).
ROLLOUT_OPTIONS = {
    "rate_per_min": "rate",
    "base_rate": "base_rate",
    "increment_factor": "increment_factor",
    "ramp_every": "ramp_every",
    "max_rate": "max_rate",
    "max_in_progress": "max_in_progress",
    "abort_percent": "abort_percent",
    "min_devices": "min_devices",
    "max_failures": "max_failures",
    "soak_s": "soak",
    "device_timeout_s": "device_timeout",
}


def _rollout(client, args) -> int:
    if args.action == "list":
        _print_json(client.rollouts())
        return 0
    if args.action in ("status", "events", "rollback"):
        if not args.rollout_id:
            raise RequestError(f"rollout {args.action}: give the rollout id", field="rollout_id")
        if args.action == "events":
            for event in client.rollout_events(args.rollout_id)["events"]:
                print(f"{event['ts']:.3f} {event['device_id'] or '-':24} {event['decision']:16}"
                      f" {event['reason']}")
            return 0
        _print_json(
            client.rollout(args.rollout_id)
            if args.action == "status"
            else client.rollback(args.rollout_id)
        )
        return 0
    if not args.manifest:
        raise RequestError(f"rollout {args.action}: --manifest is required", field="manifest")
    spec: dict[str, Any] = {"manifest": args.manifest, "devices": args.device}
    if args.pinned:
        spec["pinned"] = True
    for key, option in ROLLOUT_OPTIONS.items():
        if getattr(args, option) is not None:
            spec[key] = getattr(args, option)
    for key in ("pin", "group", "pool", "filter"):
        if getattr(args, key):
            spec[key] = getattr(args, key)
    if args.action == "plan":
        plan = client.start_rollout({**spec, "dry_run": True})
        _print_json(plan) if args.json else _print_plan(plan)
        return 0
    _print_json(client.start_rollout(spec))
    return 0


def _print_plan(plan: dict[str, Any]) -> None:
    """One line per device, then the counts: what each would run, or why it cannot."""
    print(f"{'device':24} {'verdict':13} {'variant':8} {'n_ctx':>6} {'kv':5} {'gpu':>4} "
          f"{'RAM':>9} {'tok/s':>6}  now")
    for device in plan["devices"]:
        tps = device["predicted_tokens_per_s"]
        ram = device["ram_bytes"]
        now = device["current"]
        print(f"{device['device_id'][:24]:24} {device['verdict']:13} {device['quant'] or '-':8} "
              f"{device['n_ctx'] or '-':>6} {device['kv_type'] or '-':5} "
              f"{'-' if device['n_gpu_layers'] is None else device['n_gpu_layers']:>4} "
              f"{'-' if ram is None else f'{ram / 2**20:.0f} MiB':>9} "
              f"{'-' if tps is None else f'{tps:.1f}':>6}  "
              f"{now['quant'] or '-'} {now['n_ctx'] or ''}".rstrip())
        if device["verdict"] == "no_fit":
            print(f"    {device['reason']}")
    summary = plan["summary"]
    by_variant = sorted(summary["by_variant"].items())
    variants = ", ".join(f"{quant} {count}" for quant, count in by_variant)
    print(f"{summary['devices']} devices: {variants or 'no variant'}; no_fit {summary['no_fit']}, "
          f"unknown probe {summary['unknown_probe']}, changing {summary['changes']}")


def _wheels(client, args) -> int:
    if args.action == "add":
        from pathlib import Path

        if not args.wheel:
            raise RequestError("wheels add: give the .whl file", field="wheel")
        query = {name: getattr(args, name) for name in ("key", "cmake_args", "python", "platform")
                 if getattr(args, name) is not None}
        _print_json(client.add_wheel(Path(args.wheel), query))
        return 0
    data = client.wheels()
    if args.json:
        _print_json(data)
        return 0
    for wheel in data["engine"]:
        print(f"engine {wheel['key']}  {wheel['file']}  {wheel['size']:>11}  "
              f"{wheel['cmake_args']}")
    for wheel in data["agent"]:
        print(f"agent  {wheel['version']:16}  {wheel['file']}  {wheel['size']:>11}")
    return 0
