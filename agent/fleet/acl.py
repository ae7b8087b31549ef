"""A Mosquitto ACL generated from a device inventory (``edge-agent fleet acl``). Pure: text in,
text out; the command reads the file and prints the result.

Why per-user blocks and not ``pattern`` lines: a pattern substitutes only the username (%u) or
client id (%c). It cannot say which pool a device is in, so every device could read every
pool's prompts; it cannot leave out reserved usernames, so an account named ``all`` would write
``<prefix>/all/cmd``, which every device obeys, and one named ``pool`` would write pool prompts;
and mosquitto 2.0 substitutes usernames holding '/' as they are. An ACL listing each known
account grants nothing to an account it does not list.

The inventory (YAML)::

    topic_prefix: edge/v1            # the agents' mqtt.topic_prefix
    controllers: [controller]        # send prompts and commands anywhere, read everything
    applications: [app-1]            # send prompts to devices and pools, read status and replies
    home_assistant_prefix: null      # e.g. homeassistant: devices may write their discovery configs
    devices:
      - pi-kitchen-1                 # a device id (its MQTT username)
      - {id: pi-kitchen-2, pool: kitchen}
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import yaml

from agent.errors import ConfigError
from agent.mqtt.discovery import node_name
# Accounts and pools become words of an ACL file: every account must be a valid device id (the
# safe-name rule install.sh applies too, reserved words excluded), so one rule serves all three.
from agent.topic_rules import SAFE_NAME, device_id_problem, is_valid_filter


class InventoryDevice(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    pool: str | None = None  # the device's mqtt.pool


class Inventory(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    topic_prefix: str = "edge/v1"
    controllers: list[str] = msgspec.field(default_factory=lambda: ["controller"])
    applications: list[str] = []
    home_assistant_prefix: str | None = None
    devices: list[str | InventoryDevice]


def load_inventory(path: str | Path) -> Inventory:
    """The inventory file, validated; ConfigError names the file and the key path."""
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}", file=source) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {str(exc)[:300]}", file=source) from exc
    try:
        inventory = msgspec.convert(data, Inventory)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {str(exc)[:300]}", file=source) from exc
    problem = _problem(inventory)
    if problem:
        raise ConfigError(f"{source}: {problem}", file=source)
    return inventory


def _devices(inventory: Inventory) -> list[InventoryDevice]:
    return [InventoryDevice(id=d) if isinstance(d, str) else d for d in inventory.devices]


def _problem(inventory: Inventory) -> str | None:
    prefix = inventory.topic_prefix
    if not prefix or not is_valid_filter(prefix) or "+" in prefix or "#" in prefix or " " in prefix:
        return "topic_prefix: must be a topic without wildcards, spaces or a leading '$'"
    ha = inventory.home_assistant_prefix
    if ha is not None and (not is_valid_filter(ha) or "+" in ha or "#" in ha or " " in ha):
        return "home_assistant_prefix: must be a topic without wildcards, spaces or a leading '$'"
    seen: dict[str, str] = {}
    accounts = [(f"controllers[{i}]", name) for i, name in enumerate(inventory.controllers)]
    accounts += [(f"applications[{i}]", name) for i, name in enumerate(inventory.applications)]
    accounts += [(f"devices[{i}].id", d.id) for i, d in enumerate(_devices(inventory))]
    for key, name in accounts:
        problem = device_id_problem(name)
        if problem:
            return f"{key}: {problem}"
        if name in seen:
            return f"{key}: {name!r} is already {seen[name]}: one account, one role"
        seen[name] = key
    # Each device may write <ha prefix>/sensor/<its node name>/#, and the node name folds '-' and
    # '.' into '_': two ids with one node name would each write the other's discovery configs
    # (and Home Assistant would merge their sensors). Refused with or without
    # home_assistant_prefix, so that turning discovery on later needs no renaming.
    nodes: dict[str, str] = {}
    for i, device in enumerate(_devices(inventory)):
        node = node_name(device.id)
        if node in nodes:
            return (f"devices[{i}].id: {device.id!r} has the Home Assistant node name {node!r} "
                    f"of {nodes[node]}: one device could write the other's discovery configs; "
                    "rename one")
        nodes[node] = f"devices[{i}].id {device.id!r}"
        if device.pool is not None and not SAFE_NAME.fullmatch(device.pool):
            return f"devices[{i}].pool: {device.pool[:80]!r}: use letters, digits, '.', '_', '-'"
    if not inventory.controllers:
        return "controllers: at least one account must be able to send commands"
    return None


def render_acl(inventory: Inventory) -> str:
    """The ACL file's text: one ``user`` block per account, nothing for anyone else."""
    p = inventory.topic_prefix
    lines = [
        "# Mosquitto ACL generated by `edge-agent fleet acl` from a device inventory.",
        "# Regenerate it when the inventory changes; do not edit it by hand.",
        "#",
        "# Per-user blocks, not `pattern` lines: a pattern substitutes only the username, so it",
        "# cannot say which pool a device is in (every device could read every pool's prompts),",
        f"# cannot leave out reserved names (an account named `all` would write {p}/all/cmd,",
        "# which every device obeys), and mosquitto 2.0 substitutes a '/' in a username as it is.",
        "# An account not listed here may do nothing.",
        "#",
        f"# Pools: a device reads {p}/pool/<its pool>/prompt only; mosquitto checks the ACL of a",
        "# $share/<group>/<topic> subscription against <topic>. A device outside a pool cannot",
        "# read its prompts, but mosquitto 2.0 still lets it join the pool's share group",
        "# (the SUBACK grants it) and drops the prompts the broker hands to it.",
        "#",
        f"# Reply inboxes: {p}/reply/<account>/<key>. Any device may answer into one (a pool",
        "# prompt can reach any member); only the account itself reads it, so no controller",
        "# or application reads the replies another one asked for.",
    ]
    for name in inventory.controllers:
        lines += ["", f"# controller {name}: prompts and commands to any device, pool and all",
                  f"user {name}"]
        # Not {p}/#: that would include the other controllers' inboxes.
        lines += [f"topic read {p}/+/{kind}"
                  for kind in ("status", "meta", "telemetry", "events", "cmd/result", "reply/#")]
        lines += [f"topic read {p}/reply/{name}/+", f"topic write {p}/+/prompt",
                  f"topic write {p}/+/cmd", f"topic write {p}/pool/+/prompt",
                  f"topic write {p}/all/cmd"]
    for name in inventory.applications:
        lines += ["", f"# application {name}: prompts to devices and pools; status and replies",
                  f"user {name}", f"topic write {p}/+/prompt", f"topic write {p}/pool/+/prompt",
                  f"topic read {p}/+/status", f"topic read {p}/+/reply/#",
                  f"topic read {p}/reply/{name}/+"]
    for device in _devices(inventory):
        base = f"{p}/{device.id}"
        lines += ["", f"# device {device.id}" + (f", pool {device.pool}" if device.pool else ""),
                  f"user {device.id}"]
        lines += [f"topic write {base}/{kind}"
                  for kind in ("status", "meta", "telemetry", "events", "cmd/result")]
        lines += [f"topic write {base}/reply/#", f"topic write {p}/reply/+/+",
                  f"topic read {base}/prompt",
                  f"topic read {base}/cmd", f"topic read {p}/all/cmd"]
        if device.pool:
            lines.append(f"topic read {p}/pool/{device.pool}/prompt")
        if inventory.home_assistant_prefix:
            node = node_name(device.id)
            lines.append(f"topic write {inventory.home_assistant_prefix}/sensor/{node}/#")
    return "\n".join(lines) + "\n"
