"""The llama-cpp-python wheel scripts/setup built on this machine, described the way the
controller's wheelhouse files it: build key, CMAKE_ARGS, Python tag and platform."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EDGE_AGENT_CACHE", Path.home() / ".cache" / "edge-agent"))


def built_engine_wheel(scratch: Path) -> tuple[Path, dict[str, str]]:
    """The cached wheel for this machine's build key, and the query ``fleet wheels add`` sends.
    setup only prints here (``scratch`` stands in for its venv and cache, untouched)."""
    env = {**os.environ, "PYTHON": sys.executable, "EDGE_AGENT_VENV": str(scratch / "venv"),
           "EDGE_AGENT_CACHE": str(scratch)}
    env.pop("CMAKE_ARGS", None)

    def printed(flag: str) -> str:
        return subprocess.run([str(REPO / "scripts/setup"), flag], env=env, capture_output=True,
                              text=True, check=True, timeout=60).stdout.strip()

    key = printed("--print-build-key")
    wheels = sorted((CACHE / "wheels").glob(f"llama-cpp-python-*-{key}/llama_cpp_python-*.whl"))
    if not wheels:
        pytest.fail(f"no llama-cpp-python wheel for build key {key} under {CACHE / 'wheels'}: "
                    "run scripts/setup first")
    return wheels[0], {"key": key, "cmake_args": printed("--print-cmake-args"),
                       "python": sys.implementation.cache_tag,
                       "platform": sysconfig.get_platform()}
