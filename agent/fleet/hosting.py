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

Building: ``build_from_folder`` and ``build_from_uploads`` run agent.catalog.build (what
``edge-agent manifest build`` runs: quant from each header, sha256 streamed) over GGUF files
and publish the result, merged into the manifest of that name when there is one (measured
quality kept). A folder must lie, after symlinks and "..", inside one of the configured
source roots, and so must every file in it: the client names a folder, never a path the
controller would not otherwise expose. Its files are linked into this directory, not copied.
Uploads (``Upload``) are written to a temporary file here chunk by chunk and appear under
their name only once complete and readable as GGUF. All of this is file work: call it in a
thread.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from agent.catalog import build
from agent.catalog.gguf import read_gguf_part_file
from agent.catalog.manifest import MAX_MANIFEST_BYTES, Manifest, Variant, parse_manifest
from agent.catalog.signing import (
    SIGNATURE_SUFFIX,
    generate_keypair,
    key_id,
    public_key_of,
    sign_manifest,
)
from agent.errors import (
    ConfigError,
    EdgeAgentError,
    GGUFError,
    ManifestError,
    RequestError,
    SignatureError,
    TooLargeError,
    shown,
)

MANIFEST_SUFFIXES = (".json", ".yaml", ".yml")
GGUF_SUFFIX = ".gguf"
MAX_BUILD_FILES = 256  # GGUF files one build may take: a folder of quants, not a file share
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


def _hosted(directory: "ModelDirectory", variant: Variant) -> bool:
    """Whether devices can fetch every file of ``variant``: each here or with a URL."""
    files = [(p.file, p.urls) for p in variant.parts] or [(variant.file, variant.urls)]
    return all(urls or directory.resolve(name) for name, urls in files)


class ModelDirectory:
    def __init__(self, root: str | Path, *, source_roots: list[str] | None = None,
                 upload_max_bytes: int = 0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Resolved once: a root that is itself a symlink counts as where it points.
        self.source_roots = [Path(os.path.realpath(r)) for r in source_roots or []]
        self.upload_max_bytes = upload_max_bytes

    def resolve(self, name: str) -> Path | None:
        """The file ``name`` inside the directory, or None (no paths, no dot files, no escapes)."""
        if not _NAME.fullmatch(name):
            return None
        path = self.root / name
        if path.is_symlink() and self._escaped(path):
            return None
        return path if path.is_file() else None

    def _escaped(self, link: Path) -> bool:
        """A link a folder build made (it points into a publish root) whose target has since
        become a link out of the roots. The operator's own links elsewhere are theirs."""
        made_by_a_build = any(Path(os.readlink(link)).is_relative_to(r) for r in self.source_roots)
        return made_by_a_build and self._source_root_of(str(link)) is None

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
                            "quality_source": v.quality_source,
                            "hosted": _hosted(self, v),
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
        self._check_manifest_name(name)
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

    # --- building manifests from GGUF files ---------------------------------------------

    def _source_root_of(self, path: str) -> Path | None:
        real = Path(os.path.realpath(path))
        return next((r for r in self.source_roots if real == r or real.is_relative_to(r)), None)

    def folder_files(self, folder: str) -> list[tuple[str, Path]]:
        """The GGUF files of ``folder`` (name, resolved path); RequestError unless the folder
        and each file lie inside a source root after symlinks and ".." are resolved."""
        if not self.source_roots:
            raise RequestError("model_dir: this controller builds from no folders "
                               "(fleet.publish_roots is empty)", field="model_dir")
        if not os.path.isabs(folder) or "\0" in folder:
            raise RequestError(f"model_dir: {shown(folder)} is not an absolute path",
                               field="model_dir")
        if self._source_root_of(folder) is None:
            raise RequestError(f"model_dir: {shown(folder)} is not inside an allowed root "
                               "(fleet.publish_roots)", field="model_dir")
        real = Path(os.path.realpath(folder))
        if not real.is_dir():
            raise RequestError(f"model_dir: {shown(folder)} is not a folder", field="model_dir")
        files = []
        for entry in sorted(os.scandir(real), key=lambda e: e.name):
            if not entry.name.endswith(GGUF_SUFFIX) or entry.name.startswith("."):
                continue
            if not _NAME.fullmatch(entry.name):
                raise RequestError(f"model_dir: {shown(entry.name)}: a GGUF file name of letters, "
                                   "digits, . _ - only", field="model_dir")
            if self._source_root_of(entry.path) is None:
                raise RequestError(f"model_dir: {shown(entry.name)} links outside the allowed "
                                   "roots", field="model_dir")
            target = Path(os.path.realpath(entry.path))
            if not target.is_file():
                raise RequestError(f"model_dir: {shown(entry.name)} is not a regular file",
                                   field="model_dir")
            files.append((entry.name, target))
        if not files:
            raise RequestError(f"model_dir: {shown(folder)} holds no .gguf file", field="model_dir")
        if len(files) > MAX_BUILD_FILES:
            raise RequestError(f"model_dir: more than {MAX_BUILD_FILES} GGUF files",
                               field="model_dir")
        return files

    def _host(self, name: str, target: Path) -> Path:
        """``target`` served here as ``name``: a symlink to it, or the file already there when
        it is the same one. A different file of that name is never replaced: devices may be
        fetching it."""
        here = self.root / name
        if here.exists() or here.is_symlink():
            if here.exists() and os.path.samefile(here, target):
                return here
            raise RequestError(f"{shown(name)}: a different file of that name is already hosted "
                               "here; rename one of them", field="model_dir")
        temp = self.root / f".{name}.{os.getpid()}.link"
        temp.unlink(missing_ok=True)
        temp.symlink_to(target)
        os.replace(temp, here)
        return here

    def uploaded_files(self, names: list[str]) -> list[Path]:
        if not names or len(names) > MAX_BUILD_FILES:
            raise RequestError(f"files: 1 to {MAX_BUILD_FILES} uploaded GGUF file names",
                               field="files")
        paths = []
        for name in names:
            path = self.resolve(name) if name.endswith(GGUF_SUFFIX) else None
            if path is None:
                raise RequestError(f"files: {shown(name)} is not a GGUF file uploaded here",
                                   field="files")
            paths.append(path)
        return paths

    def build_from_folder(self, name: str, folder: str) -> Path:
        """Host the folder's files here (symlinks) and build; a build that fails takes back
        the links it made, so no file is served without the manifest that lists it."""
        made: list[Path] = []
        try:
            hosted = []
            for file_name, target in self.folder_files(folder):
                existed = (self.root / file_name).is_symlink() or (self.root / file_name).exists()
                hosted.append(self._host(file_name, target))
                if not existed:
                    made.append(hosted[-1])
            return self._build(name, hosted)
        except BaseException:
            for link in made:
                link.unlink(missing_ok=True)
            raise

    def build_from_uploads(self, name: str, files: list[str]) -> Path:
        return self._build(name, self.uploaded_files(files))

    def _build(self, name: str, paths: list[Path]) -> Path:
        """What ``edge-agent manifest build`` does, over files hosted here, then publish."""
        self._check_manifest_name(name)
        existing: Manifest | None = None
        if (current := self.resolve(name)) is not None:
            try:
                existing = parse_manifest(current.read_bytes(), source=name)
            except EdgeAgentError:
                existing = None  # an invalid manifest of that name is replaced, not merged
        try:
            parts = [build.inspect_part(str(path)) for path in paths]
            document = build.build_manifest(build.combine_parts(parts), existing)
        except EdgeAgentError as exc:
            raise RequestError(f"build: {exc.message}", field="model_dir") from exc
        return self.publish(name, document)

    def start_upload(self, name: str) -> "Upload":
        if not _NAME.fullmatch(name) or not name.endswith(GGUF_SUFFIX):
            raise RequestError("file: a bare .gguf file name (letters, digits, . _ -)",
                               field="file")
        if self.resolve(name) is not None or (self.root / name).is_symlink():
            raise RequestError(f"{shown(name)} is already hosted here; uploads never replace "
                               "a file devices may be fetching", field="file")
        return Upload(self.root, name, self.upload_max_bytes)

    @staticmethod
    def _check_manifest_name(name: str) -> None:
        if not _NAME.fullmatch(name) or Path(name).suffix not in MANIFEST_SUFFIXES:
            raise RequestError(
                "name: a bare file name ending in .json, .yaml or .yml (letters, digits, . _ -)",
                field="name",
            )


class SpooledUpload:
    """A file arriving chunk by chunk (write() from a thread per chunk): spooled to a temporary
    file in ``root`` and hashed as it goes, never more than ``limit`` bytes on disk. A
    subclass's finish() checks it and puts it in place; abort() removes it."""

    def __init__(self, root: Path, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.received = 0
        self._hash = hashlib.sha256()
        fd, temp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".upload")
        self._temp = Path(temp)
        self._out = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if self.received + len(data) > self.limit:
            raise TooLargeError(f"{shown(self.name)}: larger than this controller takes "
                                 f"({self.limit} bytes, fleet.upload_max_bytes)", field="file")
        self._out.write(data)
        self._hash.update(data)
        self.received += len(data)

    def _close_synced(self) -> None:
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()

    def abort(self) -> None:
        if not self._out.closed:
            self._out.close()
        self._temp.unlink(missing_ok=True)


class Upload(SpooledUpload):
    """One GGUF file arriving, linked under its name by finish() once complete and readable
    as GGUF."""

    def __init__(self, root: Path, name: str, limit: int) -> None:
        super().__init__(root, name, limit)
        self.path = root / name

    def finish(self) -> Path:
        self._close_synced()
        try:
            read_gguf_part_file(self._temp)
        except GGUFError as exc:
            raise RequestError(f"{shown(self.name)}: not a GGUF file ({exc.message})",
                               field="file") from exc
        try:
            os.link(self._temp, self.path)  # never replaces: a racing upload of the name loses
        except FileExistsError:
            raise RequestError(f"{shown(self.name)} is already hosted here", field="file") from None
        self._temp.unlink()
        return self.path
