"""What this install runs: edge-agent's version, llama-cpp-python's, and how the engine was built.

scripts/setup writes ``<venv>/edge-agent-build.json``: the engine's build key (the key the
controller's wheelhouse files wheels under), its CMAKE_ARGS, the Python tag and platform it
was built for, and where the wheel came from (``compiled``, or ``wheelhouse <URL>``). This
module reads that file and the installed distributions' versions from their metadata (not by
importing llama_cpp, which would load the library into the daemon; only the worker does).
An install setup did not make has no file: its build key and flags are None. A file that
names another llama-cpp-python version than the installed one is stale (the engine was
reinstalled by hand) and is not believed.

The daemon puts ``build_info()`` in the retained ``meta``; the controller shows it on the
device page and in /metrics (``edge_device_build_info``). Read once per process: the install
does not change under a running agent (an upgrade restarts it).
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
from pathlib import Path

import msgspec

from agent import __version__

BUILD_FILE = "edge-agent-build.json"
MAX_BUILD_FILE_BYTES = 16 * 1024


class BuildRecord(msgspec.Struct, kw_only=True):
    """The file scripts/setup writes (unknown fields are a newer setup's: tolerated)."""

    llama_cpp_python: str
    build_key: str
    cmake_args: str
    python: str
    platform: str
    wheel: str | None = None
    origin: str | None = None


class BuildInfo(msgspec.Struct, kw_only=True):
    agent_version: str
    llama_cpp_python: str | None  # None: not installed (a controller-only install)
    engine_key: str | None
    cmake_args: str | None
    python: str | None
    platform: str | None
    origin: str | None


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_record(path: Path) -> BuildRecord | None:
    """The build file at ``path``, or None when it is missing, too big or not one."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BUILD_FILE_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_BUILD_FILE_BYTES:
        return None
    try:
        return msgspec.json.decode(data, type=BuildRecord)
    except msgspec.DecodeError:
        return None


@functools.cache
def build_info() -> BuildInfo:
    llama = _installed_version("llama-cpp-python")
    record = read_record(Path(sys.prefix) / BUILD_FILE)
    if record is not None and record.llama_cpp_python != llama:
        record = None
    return BuildInfo(
        agent_version=__version__,
        llama_cpp_python=llama,
        engine_key=record.build_key if record else None,
        cmake_args=record.cmake_args if record else None,
        python=record.python if record else None,
        platform=record.platform if record else None,
        origin=record.origin if record else None,
    )
