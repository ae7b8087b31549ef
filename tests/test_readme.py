"""The README stays true: every config key is documented, and its two commands exist."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from agent.config import AgentConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
REPO = Path(__file__).resolve().parents[1]


def key_paths(cls: type[msgspec.Struct], prefix: str = "") -> list[str]:
    paths = []
    for field in msgspec.structs.fields(cls):
        default = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
        if isinstance(default, msgspec.Struct):
            paths += key_paths(type(default), f"{prefix}{field.name}.")
        else:
            paths.append(prefix + field.name)
    return paths


def test_every_agent_config_key_is_in_the_reference() -> None:
    missing = [p for p in key_paths(AgentConfig) if f"`{p}`" not in README]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_the_two_commands_exist_and_are_executable() -> None:
    for command in ("scripts/quickstart", "scripts/test"):
        assert f"\n{command}" in README
        assert os.access(REPO / command, os.X_OK)
