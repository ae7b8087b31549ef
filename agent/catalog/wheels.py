"""The controller's wheel index: which engine and agent wheels it hosts, signed like a manifest.

An engine wheel (llama-cpp-python) is identified by its build key: the first 16 hex digits of
sha256("<version>|<CMAKE_ARGS>|<cache tag> <platform>"), which is what scripts/setup computes
for its local wheel cache (``engine_key`` is the same formula, and tests hold the two to it).
The agent's own wheels (edge-agent) are identified by their version.

The index is JSON (``encode_index``: deterministic bytes, so a ``.sig`` fetched a moment after
the index matches it), served as ``/files/wheels/index.json`` with a detached Ed25519
signature at ``index.json.sig``, by the key devices pin for manifests (signing.public_key).
``parse_index`` checks the signature before it reads anything, then bounds every field. A
wheel is trusted through its entry: the signed index vouches for its size and sha256, and
the fetcher (agent.fetch.wheels) refuses a file that does not match them.

Pure: bytes in, structs or errors out; no I/O.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated

import msgspec

from agent.catalog.signing import verify_signature
from agent.errors import WheelIndexError

INDEX_NAME = "index.json"
MAX_INDEX_BYTES = 1 << 20  # thousands of entries; a bigger index is not one this controller made
MAX_ENTRIES = 4096
KEY_CHARS = 16
ENGINE_PACKAGE = "llama-cpp-python"
AGENT_PACKAGE = "edge-agent"
# PEP 427 file names: distribution-version(-build)?-python-abi-platform.whl, no path parts.
_WHEEL_NAME = re.compile(
    r"(?P<dist>[A-Za-z0-9_.]+)-(?P<version>[0-9][A-Za-z0-9_.!+]{0,63})(-[0-9][A-Za-z0-9_.]*)?"
    r"-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl"
)
_KEY = re.compile(r"[0-9a-f]{16}")

Key = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
Version = Annotated[str, msgspec.Meta(pattern=r"^[0-9][A-Za-z0-9_.!+]{0,63}$")]
FileName = Annotated[str, msgspec.Meta(max_length=255, pattern=r"^[A-Za-z0-9_.!+-]+\.whl$")]
RelPath = Annotated[str, msgspec.Meta(max_length=400, pattern=r"^[A-Za-z0-9_.!+/-]+\.whl$")]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Size = Annotated[int, msgspec.Meta(ge=1, le=1 << 40)]
Short = Annotated[str, msgspec.Meta(max_length=128)]
Flags = Annotated[str, msgspec.Meta(max_length=2048)]


class EngineWheel(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A llama-cpp-python wheel built for one hardware class."""

    key: Key
    package: Short = ENGINE_PACKAGE
    version: Version
    python: Short  # sys.implementation.cache_tag of the building interpreter, e.g. cpython-311
    platform: Short  # sysconfig.get_platform(), e.g. linux-x86_64
    cmake_args: Flags  # what scripts/setup --print-cmake-args printed there
    file: FileName
    path: RelPath  # under /files/wheels/
    size: Size
    sha256: Sha256


class AgentWheel(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An edge-agent wheel (what the ``upgrade`` op installs)."""

    version: Version
    file: FileName
    path: RelPath
    size: Size
    sha256: Sha256


class WheelIndex(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    schema: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    engine: Annotated[list[EngineWheel], msgspec.Meta(max_length=MAX_ENTRIES)] = []
    agent: Annotated[list[AgentWheel], msgspec.Meta(max_length=MAX_ENTRIES)] = []

    def engine_for(self, key: str) -> EngineWheel | None:
        return next((wheel for wheel in self.engine if wheel.key == key), None)

    def agent_wheel(self, version: str) -> AgentWheel | None:
        return next((wheel for wheel in self.agent if wheel.version == version), None)


def engine_key(version: str, cmake_args: str, python: str, platform: str) -> str:
    """scripts/setup's build key for a llama-cpp-python build (see the module docstring)."""
    text = f"{version}|{cmake_args}|{python} {platform}"
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def is_key(text: str) -> bool:
    return bool(_KEY.fullmatch(text))


def wheel_name_parts(name: str) -> tuple[str, str] | None:
    """(distribution as PEP 503 normalises it, version) of a wheel file name, else None."""
    match = _WHEEL_NAME.fullmatch(name) if len(name) <= 255 else None
    if match is None:
        return None
    return re.sub(r"[-_.]+", "-", match["dist"]).lower(), match["version"]


def encode_index(index: WheelIndex) -> bytes:
    """The index's bytes: entries sorted, so the same wheels always give the same bytes."""
    ordered = WheelIndex(
        engine=sorted(index.engine, key=lambda w: (w.key, w.file)),
        agent=sorted(index.agent, key=lambda w: (w.version, w.file)),
    )
    return msgspec.json.format(msgspec.json.encode(ordered), indent=1) + b"\n"


def parse_index(data: bytes, signature: str | bytes | None, public_key: str | None) -> WheelIndex:
    """The index, once its signature checks out with ``public_key``.

    SignatureError (bad_signature) for a missing, wrong or unverifiable signature, before
    anything in ``data`` is read; WheelIndexError (wheel_index_invalid) for a signed document
    that is not an index."""
    if len(data) > MAX_INDEX_BYTES:
        raise WheelIndexError(f"the wheel index is larger than {MAX_INDEX_BYTES} bytes")
    verify_signature(data, signature, public_key, what="wheel index")
    try:
        return msgspec.json.decode(data, type=WheelIndex)
    except msgspec.DecodeError as exc:
        raise WheelIndexError(f"the wheel index is not valid: {exc}") from exc
