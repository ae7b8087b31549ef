"""The controller's model directory: manifests and model files that devices fetch from /files.

Manifests are ``<name>.json`` (or .yaml) files next to the GGUF files they name, so a variant
with empty ``urls`` resolves to the same directory on this controller (DESIGN.md). Publishing
validates with agent.catalog.manifest.parse_manifest and writes atomically, so a device never
reads half a manifest. Serving (Range, ETag, If-Range) is Starlette's FileResponse, wired in
agent.fleet.web; this module only resolves names safely and must not serve anything itself.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from agent.catalog.manifest import parse_manifest
from agent.errors import EdgeAgentError, ManifestError, RequestError

MANIFEST_SUFFIXES = (".json", ".yaml", ".yml")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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
