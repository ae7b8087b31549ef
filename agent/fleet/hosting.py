"""The controller's model directory and signing key: what devices fetch from /files.

Manifests are ``<name>.json`` (or .yaml) files next to the GGUF files they name, so a variant
with empty ``urls`` resolves to the same directory on this controller (DESIGN.md). Publishing
validates with agent.catalog.manifest.parse_manifest and writes atomically, so a device never
reads half a manifest. Serving (Range, ETag, If-Range) is Starlette's FileResponse, wired in
agent.fleet.web; this module only resolves names safely and must not serve anything itself.

Signing: ``ControllerKey`` is made on the controller's first start and never replaced.
``<manifest>.sig`` is computed when asked for (``ModelDirectory.signature``), over the bytes
on disk at that moment, rather than written beside each manifest: a manifest copied into the
directory by hand is signed like a published one, and no stale ``.sig`` can outlive an edit.
Only a manifest that validates is signed, so the key vouches for nothing the agent would
refuse anyway.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from agent.catalog.manifest import MAX_MANIFEST_BYTES, parse_manifest
from agent.catalog.signing import (
    SIGNATURE_SUFFIX,
    generate_keypair,
    key_id,
    public_key_of,
    sign_manifest,
)
from agent.errors import ConfigError, EdgeAgentError, ManifestError, RequestError, SignatureError

MANIFEST_SUFFIXES = (".json", ".yaml", ".yml")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
KEY_FILE_BYTES = 128  # base64 of 32 bytes and a newline; more is not a key file


class ControllerKey:
    """The controller's Ed25519 manifest-signing key, kept in one file of mode 0600.

    ``load_or_create`` writes a new key to a temporary file beside it and hard-links that into
    place, so the key file appears complete or not at all: two controllers starting together
    on one state directory end up with one key (the loser of the link reads the winner's), a
    crash mid-creation leaves no key file, and an existing key is never overwritten: every
    device pins it at install, and a new key would orphan the fleet."""

    def __init__(self, private_key: str, path: Path, *, created: bool) -> None:
        self._private = private_key
        self.path = path
        self.created = created
        self.public_key = public_key_of(private_key)
        self.key_id = key_id(self.public_key)

    @classmethod
    def load_or_create(cls, path: str | Path) -> "ControllerKey":
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            return cls(_read_key(path), path, created=False)
        private, _ = generate_keypair()
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(private + "\n")
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(temp, path)  # atomic, and unlike rename it never replaces a key
            except FileExistsError:
                return cls(_read_key(path), path, created=False)
        finally:
            os.unlink(temp)
        _fsync_dir(path.parent)
        return cls(private, path, created=True)

    @classmethod
    def load(cls, path: str | Path) -> "ControllerKey":
        """The existing key (for ``edge-agent fleet signing-key``); never creates one."""
        return cls(_read_key(Path(path)), Path(path), created=False)

    def sign(self, data: bytes) -> str:
        return sign_manifest(data, self._private)


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key(path: Path) -> str:
    """The private key in ``path``; ConfigError for a link, a loose mode or a broken file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ConfigError(
            f"signing key {path}: cannot open: {exc.strerror}", file=str(path)
        ) from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"signing key {path}: not a regular file", file=str(path))
        if info.st_mode & 0o077:
            raise ConfigError(
                f"signing key {path}: readable or writable by others "
                f"(mode {info.st_mode & 0o777:o}): chmod 600 it", file=str(path),
            )
        text = handle.read(KEY_FILE_BYTES + 1)
    try:
        if len(text) > KEY_FILE_BYTES:
            raise SignatureError("too long")
        private = text.decode("ascii").strip()
        public_key_of(private)  # proves it is a 32-byte Ed25519 key
    except (UnicodeDecodeError, ValueError, SignatureError) as exc:
        raise ConfigError(
            f"signing key {path}: not a base64 Ed25519 private key. It is never replaced on its "
            "own; restore it from a backup (devices pin its public key)", file=str(path),
        ) from exc
    return private


class ModelDirectory:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, name: str) -> Path | None:
        """The file ``name`` inside the directory, or None (no paths, no dot files, no escapes)."""
        if not _NAME.fullmatch(name):
            return None
        path = self.root / name
        return path if path.is_file() else None

    def signature(self, name: str, key: ControllerKey) -> str | None:
        """``<manifest>.sig`` for ``name`` (a manifest here that validates), else None.

        Reads the file, so call it off the event loop."""
        if Path(name).suffix not in MANIFEST_SUFFIXES or (path := self.resolve(name)) is None:
            return None
        with open(path, "rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            return None
        try:
            parse_manifest(data, source=name)
        except EdgeAgentError:
            return None
        return key.sign(data)

    @staticmethod
    def signed_name(name: str) -> str | None:
        """The manifest a ``<manifest>.sig`` name is the signature of, else None."""
        return name[: -len(SIGNATURE_SUFFIX)] if name.endswith(SIGNATURE_SUFFIX) else None

    def manifests(self) -> list[dict[str, Any]]:
        """Every manifest here with its models and variants (and whether each file is present)."""
        found = []
        for path in sorted(self.root.iterdir()):
            if path.suffix not in MANIFEST_SUFFIXES or not path.is_file():
                continue
            entry: dict[str, Any] = {"name": path.name, "modified": path.stat().st_mtime}
            try:
                manifest = parse_manifest(path.read_bytes(), source=str(path))
            except EdgeAgentError as exc:
                entry["error"] = exc.message
                found.append(entry)
                continue
            entry["models"] = [
                {
                    "id": model.id,
                    "variants": [
                        {
                            "quant": v.quant,
                            "file": v.file,
                            "size": v.size,
                            "quality": v.quality,
                            "hosted": bool(self.resolve(v.file)) or bool(v.urls),
                        }
                        for v in model.variants
                    ],
                }
                for model in manifest.models
            ]
            found.append(entry)
        return found

    def publish(self, name: str, document: str | bytes | dict[str, Any]) -> Path:
        """Validate and write a manifest atomically; returns its path."""
        if not _NAME.fullmatch(name) or Path(name).suffix not in MANIFEST_SUFFIXES:
            raise RequestError(
                "name: a bare file name ending in .json, .yaml or .yml (letters, digits, . _ -)",
                field="name",
            )
        data = msgspec.json.encode(document) if isinstance(document, dict) else document
        if isinstance(data, str):
            data = data.encode()
        try:
            parse_manifest(data, source=name)
        except ManifestError as exc:
            raise RequestError(f"manifest: {exc.message}", field="manifest") from exc
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.root / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.root / name
