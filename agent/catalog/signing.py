"""Ed25519 signatures on manifests: a detached ``<manifest>.sig`` file beside the manifest.

The signature is over the manifest's exact bytes, base64-encoded; the public key in config
(``signing.public_key``) is the raw 32-byte key, base64-encoded. With
``signing.required: true`` an unsigned or tampered manifest is refused (SignatureError,
code ``bad_signature``) before anything in it is trusted.

Uses ``cryptography`` (the ``signing`` extra), imported only when a signature is checked,
so devices that do not require signatures do not need it.
"""

from __future__ import annotations

import base64
import binascii

from agent.errors import SignatureError

SIGNATURE_SUFFIX = ".sig"


def _b64(text: str | bytes, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what} is not valid base64") from exc


def _ed25519():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SignatureError(
            "manifest signatures are required but the 'cryptography' package is missing: "
            "pip install 'edge-agent[signing]'"
        ) from exc
    return ed25519, InvalidSignature


def verify_manifest(data: bytes, signature: str | bytes | None, public_key: str | None) -> None:
    """Raise SignatureError unless ``signature`` is a valid Ed25519 signature of ``data``."""
    if not public_key:
        raise SignatureError("signing.required is set but signing.public_key is empty")
    if signature is None:
        raise SignatureError("the manifest has no signature file (expected <manifest>.sig)")
    ed25519, invalid_signature = _ed25519()
    key_bytes = _b64(public_key, "signing.public_key")
    if len(key_bytes) != 32:
        raise SignatureError("signing.public_key must be 32 raw bytes (base64)")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(key_bytes).verify(_b64(signature, "signature"), data)
    except invalid_signature as exc:
        raise SignatureError("the manifest signature does not match: refusing a tampered manifest") from exc


def sign_manifest(data: bytes, private_key: str) -> str:
    """Base64 Ed25519 signature of ``data`` with a base64 raw 32-byte private key."""
    ed25519, _ = _ed25519()
    key = ed25519.Ed25519PrivateKey.from_private_bytes(_b64(private_key, "private key"))
    return base64.b64encode(key.sign(data)).decode()


def generate_keypair() -> tuple[str, str]:
    """(private, public), each base64 of the raw 32-byte key."""
    from cryptography.hazmat.primitives import serialization

    ed25519, _ = _ed25519()
    private = ed25519.Ed25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    private_bytes = private.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public_bytes = private.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    return base64.b64encode(private_bytes).decode(), base64.b64encode(public_bytes).decode()
