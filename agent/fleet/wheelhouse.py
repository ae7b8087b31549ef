"""The controller's wheelhouse: the engine and agent wheels devices install from /files/wheels.

Layout under ``fleet.wheel_dir``::

    engine/<build key>/entry.json            its index entry (agent.catalog.wheels.EngineWheel)
    engine/<build key>/<sha256[:16]>/<file>  the wheel
    agent/<version>/entry.json               agent.catalog.wheels.AgentWheel
    agent/<version>/<sha256[:16]>/<file>

A wheel's path holds its digest, so one URL always names the same bytes. Adding a wheel for
a key (or version) that has one writes the new file beside the old, then swaps entry.json
(a rename), then removes the old file: a device reads either index, and one mid-download of
the old file keeps its open file. The sha256 is computed as the bytes arrive, so the index
is built from the small entry files only; it is built and signed when asked (like a
manifest's ``.sig``, agent.fleet.hosting), never stored, so no stale signature outlives a
change. Only a file that opens as a wheel of the distribution and version its name says is
added. All of this is file work: call it in a thread.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import zipfile
import zlib
from pathlib import Path

import msgspec

from agent.atomic_file import atomic_write
from agent.catalog.wheels import (
    AGENT_PACKAGE,
    ENGINE_PACKAGE,
    AgentWheel,
    EngineWheel,
    WheelIndex,
    encode_index,
    engine_key,
    is_key,
    wheel_name_parts,
)
from agent.errors import RequestError, shown
from agent.fleet.hosting import ControllerKey, SpooledUpload
from agent.log import get_logger

log = get_logger(__name__)

ENTRY = "entry.json"
DIGEST_CHARS = 16
MAX_METADATA_BYTES = 1 << 20  # real METADATA (with a long description) is tens of KiB
_SERVED = re.compile(
    r"(engine/[0-9a-f]{16}|agent/[0-9][A-Za-z0-9_.!+]{0,63})/[0-9a-f]{16}/[A-Za-z0-9_.!+-]{1,255}\.whl"
)


class WheelHouse:
    def __init__(self, root: str | Path, *, upload_max_bytes: int) -> None:
        self.root = Path(root)  # made by the first add: a controller that hosts none has none
        self.upload_max_bytes = upload_max_bytes

    def index(self) -> WheelIndex:
        """Every wheel whose entry reads back; an unreadable entry is logged and left out."""
        engine = [self._entry(path, EngineWheel) for path in self.root.glob(f"engine/*/{ENTRY}")]
        agent = [self._entry(path, AgentWheel) for path in self.root.glob(f"agent/*/{ENTRY}")]
        return WheelIndex(engine=[e for e in engine if e], agent=[a for a in agent if a])

    def index_bytes(self) -> bytes:
        return encode_index(self.index())

    def signature(self, key: ControllerKey) -> str:
        return key.sign(self.index_bytes())

    def resolve(self, path: str) -> Path | None:
        """The hosted wheel at ``path`` (as the index names it), or None."""
        if not _SERVED.fullmatch(path) or {".", ".."} & set(path.split("/")):
            return None
        found = self.root / path
        return found if found.is_file() and not found.is_symlink() else None

    @staticmethod
    def _entry(path: Path, kind: type) -> EngineWheel | AgentWheel | None:
        try:
            return msgspec.json.decode(path.read_bytes(), type=kind)
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("wheel_entry_unreadable", path=str(path), error=str(exc))
            return None

    def start_add(self, name: str, *, key: str | None = None, cmake_args: str | None = None,
                  python: str | None = None, platform: str | None = None) -> "WheelUpload":
        """Check what an upload says it is before any byte is written."""
        parts = wheel_name_parts(name)
        if parts is None:
            raise RequestError(f"file: {shown(name)} is not a wheel file name", field="file")
        dist, version = parts
        if dist == ENGINE_PACKAGE:
            if key is None or not is_key(key):
                raise RequestError("key: the 16 hex digits of the build key "
                                   "(scripts/setup --print-build-key on the device)", field="key")
            for field, value in (("cmake_args", cmake_args), ("python", python),
                                 ("platform", platform)):
                if value is not None and (len(value) > (2048 if field == "cmake_args" else 128)
                                          or not value.isprintable()):
                    raise RequestError(f"{field}: printable text, bounded", field=field)
            described = (cmake_args, python, platform)
            if any(v is not None for v in described):
                if None in described:
                    raise RequestError("cmake_args, python and platform: all three or none",
                                       field="key")
                computed = engine_key(version, cmake_args or "", python or "", platform or "")
                if computed != key:
                    raise RequestError(f"key: {key} is not the build key of that version, "
                                       f"CMAKE_ARGS, Python and platform ({computed})",
                                       field="key")
            folder = self.root / "engine" / key
        elif dist == AGENT_PACKAGE:
            if key is not None:
                raise RequestError("key: only engine (llama-cpp-python) wheels have a build key",
                                   field="key")
            folder = self.root / "agent" / version
        else:
            raise RequestError(f"file: {shown(name)}: this controller hosts {ENGINE_PACKAGE} and "
                               f"{AGENT_PACKAGE} wheels only", field="file")
        self.root.mkdir(parents=True, exist_ok=True)
        return WheelUpload(self, folder, name, dist, version,
                           {"key": key, "cmake_args": cmake_args or "", "python": python or "",
                            "platform": platform or ""})


class WheelUpload(SpooledUpload):
    """One wheel arriving, hashed as it goes, added by finish() once it is a wheel of the
    distribution and version its name says."""

    def __init__(self, house: WheelHouse, folder: Path, name: str, dist: str, version: str,
                 described: dict[str, str | None]) -> None:
        super().__init__(house.root, name, house.upload_max_bytes)
        self.house = house
        self.folder = folder
        self.dist = dist
        self.version = version
        self.described = described

    def finish(self) -> EngineWheel | AgentWheel:
        self._close_synced()
        self._check_wheel()
        sha256 = self._hash.hexdigest()
        relative = self.folder.relative_to(self.house.root) / sha256[:DIGEST_CHARS] / self.name
        common = dict(version=self.version, file=self.name, path=relative.as_posix(),
                      size=self.received, sha256=sha256)
        if self.dist == ENGINE_PACKAGE:
            entry: EngineWheel | AgentWheel = EngineWheel(
                key=str(self.described["key"]), python=str(self.described["python"]),
                platform=str(self.described["platform"]),
                cmake_args=str(self.described["cmake_args"]), **common)
        else:
            entry = AgentWheel(**common)
        target = self.house.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        previous = self.house._entry(self.folder / ENTRY, type(entry)) \
            if (self.folder / ENTRY).exists() else None
        os.chmod(self._temp, 0o644)  # mkstemp's 0600: a web server in front may serve it too
        os.replace(self._temp, target)
        atomic_write(self.folder / ENTRY, msgspec.json.encode(entry), mode=0o644)
        if previous is not None and previous.path != entry.path:
            shutil.rmtree((self.house.root / previous.path).parent, ignore_errors=True)
        log.info("wheel_added", file=self.name, path=entry.path, size=self.received,
                 sha256=sha256, replaced=previous.path if previous else None)
        return entry

    def _check_wheel(self) -> None:
        """The file is a zip with the ``.dist-info/METADATA`` of the name's distribution and
        version: a wheel, not whatever bytes a client sent under a wheel's name."""
        try:
            with zipfile.ZipFile(self._temp) as archive:
                metadata = next((n for n in archive.namelist()
                                 if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
                if metadata is None:
                    raise RequestError(f"{shown(self.name)}: no .dist-info/METADATA in it",
                                       field="file")
                # A small upload may inflate to gigabytes: refuse what the member's header
                # says is over the bound, and bound the read too, since a header may lie.
                too_big = RequestError(f"{shown(self.name)}: its METADATA is over "
                                       f"{MAX_METADATA_BYTES} bytes", field="file")
                if archive.getinfo(metadata).file_size > MAX_METADATA_BYTES:
                    raise too_big
                with archive.open(metadata) as member:
                    text = member.read(MAX_METADATA_BYTES + 1)
                if len(text) > MAX_METADATA_BYTES:
                    raise too_big
                headers = email.parser.BytesHeaderParser().parsebytes(text)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as exc:
            raise RequestError(f"{shown(self.name)}: not a wheel ({exc})", field="file") from exc
        name = re.sub(r"[-_.]+", "-", headers.get("Name", "")).lower()
        if name != self.dist or headers.get("Version") != self.version:
            raise RequestError(f"{shown(self.name)}: its METADATA says "
                               f"{shown(headers.get('Name'))} {shown(headers.get('Version'))}",
                               field="file")
