"""The test suite's manifest-signing key, and signing a manifest file with it.

The key is fixed (derived from a constant), not drawn per run: the model ladder is shared by
every run on a machine, and its ``manifest.json.sig`` must be the same bytes whichever run
wrote it last. Test-only: no controller or device outside the tests ever holds it."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from agent.catalog.signing import SIGNATURE_SUFFIX, public_key_of, sign_manifest

_SEED = hashlib.sha256(b"edge-agent tests: manifest key").digest()  # 32 bytes: an Ed25519 seed
TEST_PRIVATE_KEY = base64.b64encode(_SEED).decode()
TEST_PUBLIC_KEY = public_key_of(TEST_PRIVATE_KEY)


def sign_file(manifest: Path, private_key: str = TEST_PRIVATE_KEY) -> Path:
    """Write ``<manifest>.sig`` (atomically, unchanged when already right); returns its path."""
    signature = sign_manifest(Path(manifest).read_bytes(), private_key) + "\n"
    path = Path(f"{manifest}{SIGNATURE_SUFFIX}")
    if path.exists() and path.read_text() == signature:
        return path
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(signature)
    os.replace(temporary, path)
    return path
