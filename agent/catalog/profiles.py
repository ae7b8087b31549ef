"""Device profiles: YAML files in profiles/ that match a probed device and set policy.

A profile has match rules against the DeviceInfo (board substring, architecture, ISA
flags, memory range, GPU vendor) and a Policy of defaults for the selector (memory
headroom, context sizes, KV cache type, threads, minimum tokens/s, batch size). The
most specific profile whose rules all hold wins; ``default`` has no rules and always
matches. Loading rejects unknown keys and names the file and the key path.

Profiles are read from EDGE_AGENT_PROFILES when set, else the repository's profiles/.
This module reads YAML files and nothing else; matching is pure.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from agent.errors import ConfigError
from agent.hardware.device import DeviceInfo

PROFILES_ENV = "EDGE_AGENT_PROFILES"
DEFAULT_PROFILE = "default"
GIB = 1024**3

# How much each kind of rule says about a device; the highest total is the most specific.
_WEIGHT_BOARD = 100
_WEIGHT_GPU = 50
_WEIGHT_FLAG = 2
_WEIGHT_ARCH = 1
_WEIGHT_MEMORY = 1


class Match(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    board_contains: list[str] = []  # any of these substrings of the board name
    arch: list[str] = []  # any of: x86_64, aarch64, armv7l
    flags: list[str] = []  # all of these normalised ISA flags (agent.hardware.cpu)
    memory_min_gib: float | None = None  # total RAM at least this
    memory_max_gib: float | None = None  # total RAM at most this
    gpu_vendor: list[str] = []  # any GPU of these vendors: nvidia, amd, apple, jetson


class Policy(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    memory_headroom_bytes: int  # kept free for the OS and other services
    n_ctx_target: int  # context to aim for when memory allows
    n_ctx_floor: int  # never load with less context than this
    kv_type: Literal["f16", "q8_0", "q4_0"]  # preferred KV cache type
    n_threads: int | None  # None: the device's performance cores
    min_tokens_per_s: float  # a variant predicted slower than this loses
    n_batch: int  # prompt-processing batch


class Profile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    name: str
    description: str
    match: Match = Match()
    policy: Policy


def default_profiles_dir() -> Path:
    """EDGE_AGENT_PROFILES, else the checkout's profiles/ (editable install), else the copy a
    normal install puts under <prefix>/share/edge-agent/profiles."""
    if env := os.environ.get(PROFILES_ENV):
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "profiles"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "edge-agent" / "profiles"


def _key_path(error: msgspec.ValidationError) -> str:
    """msgspec's "message - at `$.a.b`" → "a.b: message"; an unknown key is named in full."""
    message, marker, where = str(error).partition(" - at `$")
    path = where.rstrip("`").lstrip(".") if marker else ""
    if unknown := re.fullmatch(r"Object contains unknown field `(.+)`", message):
        return f"{path + '.' if path else ''}{unknown.group(1)}: unknown key"
    return f"{path or '(top level)'}: {message}"


def load_profile(path: Path) -> Profile:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", file=str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}", file=str(path)) from exc
    try:
        profile = msgspec.convert(data, Profile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_key_path(exc)}", file=str(path)) from exc
    if profile.name != path.stem:
        raise ConfigError(
            f"{path}: name: {profile.name!r} differs from the file name {path.stem!r}",
            file=str(path),
        )
    if profile.policy.n_ctx_floor > profile.policy.n_ctx_target:
        raise ConfigError(f"{path}: policy.n_ctx_floor: larger than n_ctx_target", file=str(path))
    return profile


def load_profiles(directory: Path | None = None) -> list[Profile]:
    """Every profiles/*.yaml, sorted by name. There must be a ``default``."""
    directory = Path(directory) if directory is not None else default_profiles_dir()
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        raise ConfigError(f"{directory}: no profiles (*.yaml) found", file=str(directory))
    profiles = [load_profile(p) for p in paths]
    if not any(p.name == DEFAULT_PROFILE for p in profiles):
        raise ConfigError(f"{directory}: no {DEFAULT_PROFILE}.yaml profile", file=str(directory))
    return profiles


def _fmt_gib(value: float) -> str:
    return f"{value:g}"


def evaluate(device: DeviceInfo, match: Match) -> tuple[int, list[str]] | None:
    """(specificity, reasons) when every rule holds, else None. Pure."""
    score = 0
    reasons: list[str] = []
    if match.board_contains:
        board = device.board or ""
        hit = next((s for s in match.board_contains if s.lower() in board.lower()), None)
        if hit is None:
            return None
        score += _WEIGHT_BOARD
        reasons.append(f"board contains {hit!r}")
    if match.gpu_vendor:
        vendors = sorted({g.vendor for g in device.gpus} & set(match.gpu_vendor))
        if not vendors:
            return None
        score += _WEIGHT_GPU
        reasons.append(f"gpu vendor {', '.join(vendors)}")
    if match.arch:
        if device.cpu.arch not in match.arch:
            return None
        score += _WEIGHT_ARCH
        reasons.append(f"arch {device.cpu.arch}")
    if match.flags:
        if not set(match.flags) <= set(device.cpu.flags):
            return None
        score += _WEIGHT_FLAG * len(match.flags)
        reasons.append(f"flags {', '.join(match.flags)}")
    if match.memory_min_gib is not None or match.memory_max_gib is not None:
        total_gib = device.memory.total_bytes / GIB
        if not device.memory.total_bytes:
            return None  # unknown memory cannot satisfy a memory rule
        if match.memory_min_gib is not None and total_gib < match.memory_min_gib:
            return None
        if match.memory_max_gib is not None and total_gib > match.memory_max_gib:
            return None
        low = _fmt_gib(match.memory_min_gib) if match.memory_min_gib is not None else "0"
        high = _fmt_gib(match.memory_max_gib) if match.memory_max_gib is not None else "∞"
        score += _WEIGHT_MEMORY
        reasons.append(f"memory {total_gib:.1f} GiB within [{low}, {high}] GiB")
    return score, reasons


def match_profile(
    device: DeviceInfo, profiles: list[Profile], forced: str | None = None
) -> tuple[Profile, list[str]]:
    """The most specific profile whose rules all hold, with the reasons it matched.

    ``forced`` names a profile to use regardless (config ``model.profile``); an unknown
    name is a ConfigError listing the known ones.
    """
    by_name = {p.name: p for p in profiles}
    if forced is not None:
        if forced not in by_name:
            raise ConfigError(
                f"model.profile: no profile named {forced!r} (known: {', '.join(sorted(by_name))})",
                profile=forced,
            )
        return by_name[forced], [f"forced by configuration (model.profile={forced})"]
    best: tuple[int, str, Profile, list[str]] | None = None
    for profile in profiles:
        result = evaluate(device, profile.match)
        if result is None:
            continue
        score, reasons = result
        # Ties go to the alphabetically first name so the choice never depends on file order.
        if best is None or score > best[0] or (score == best[0] and profile.name < best[1]):
            best = (score, profile.name, profile, reasons)
    if best is None:
        raise ConfigError(f"no profile matches and no {DEFAULT_PROFILE!r} profile is loaded")
    _, _, profile, reasons = best
    return profile, reasons or ["no more specific profile matched"]
