"""The wheel index: scripts/setup's build key, and what a device accepts as a signed index."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from agent.catalog.signing import generate_keypair, sign_manifest
from agent.catalog.wheels import (
    AgentWheel,
    EngineWheel,
    WheelIndex,
    encode_index,
    engine_key,
    parse_index,
    wheel_name_parts,
)
from agent.errors import SignatureError, WheelIndexError

REPO = Path(__file__).resolve().parents[2]
LLAMA_VERSION = re.search(r'"llama-cpp-python==([0-9.]+)"',
                          (REPO / "pyproject.toml").read_text())[1]
PRIVATE, PUBLIC = generate_keypair()


def setup_build_key(cmake_args: str) -> str:
    return subprocess.run(
        [str(REPO / "scripts/setup"), "--print-build-key"],
        env={**os.environ, "CMAKE_ARGS": cmake_args, "PYTHON": sys.executable},
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()


@pytest.mark.parametrize("cmake_args", ["-DGGML_NATIVE=OFF -DGGML_AVX2=ON", "-DGGML_CUDA=ON"])
def test_engine_key_is_the_key_setup_computes(cmake_args: str) -> None:
    python, platform = sys.implementation.cache_tag, sysconfig.get_platform()
    assert engine_key(LLAMA_VERSION, cmake_args, python, platform) == setup_build_key(cmake_args)


def index() -> WheelIndex:
    engine = EngineWheel(
        key=engine_key(LLAMA_VERSION, "-DGGML_NATIVE=ON", "cpython-311", "linux-aarch64"),
        version=LLAMA_VERSION, python="cpython-311", platform="linux-aarch64",
        cmake_args="-DGGML_NATIVE=ON", file=f"llama_cpp_python-{LLAMA_VERSION}-py3-none-any.whl",
        path="engine/x.whl", size=10, sha256="a" * 64)
    agent = AgentWheel(version="0.2.0", file="edge_agent-0.2.0-py3-none-any.whl",
                       path="agent/0.2.0/edge_agent-0.2.0-py3-none-any.whl", size=5,
                       sha256="b" * 64)
    return WheelIndex(engine=[engine], agent=[agent])


def test_a_signed_index_reads_back() -> None:
    data = encode_index(index())
    parsed = parse_index(data, sign_manifest(data, PRIVATE), PUBLIC)
    assert parsed == index()
    assert parsed.engine_for(index().engine[0].key) == index().engine[0]
    assert parsed.agent_wheel("0.2.0") == index().agent[0]
    assert encode_index(parsed) == data  # the same wheels give the same bytes (and signature)


def test_a_changed_byte_unsigned_or_other_key_is_refused() -> None:
    data = encode_index(index())
    signature = sign_manifest(data, PRIVATE)
    tampered = data.replace(b'"a' + b"a" * 63, b'"c' + b"a" * 63)
    assert tampered != data
    with pytest.raises(SignatureError):
        parse_index(tampered, signature, PUBLIC)
    with pytest.raises(SignatureError):
        parse_index(data, None, PUBLIC)
    with pytest.raises(SignatureError):
        parse_index(data, signature, generate_keypair()[1])
    with pytest.raises(SignatureError):
        parse_index(data, signature, None)


def test_a_signed_document_that_is_not_an_index_is_refused() -> None:
    data = b'{"schema": 1, "engine": [{"key": "../../etc"}]}'
    with pytest.raises(WheelIndexError):
        parse_index(data, sign_manifest(data, PRIVATE), PUBLIC)


def test_wheel_names() -> None:
    assert wheel_name_parts("llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl") == (
        "llama-cpp-python", "0.3.36")
    assert wheel_name_parts("edge_agent-0.2.0-py3-none-any.whl") == ("edge-agent", "0.2.0")
    for bad in ("../x-1-py3-none-any.whl", "x.whl", "a/b-1-py3-none-any.whl", "x-1-py3-none-any",
                "edge_agent-..-py3-none-any.whl", "edge_agent-.-py3-none-any.whl"):
        assert wheel_name_parts(bad) is None
