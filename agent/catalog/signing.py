"""Ed25519 signatures on manifests: a detached ``<manifest>.sig`` file beside the manifest.

The signature is over the manifest's exact bytes, base64-encoded; the public key in config
(``signing.public_key``) is the raw 32-byte key, base64-encoded. Signatures are required
unless the config opts out with ``signing.allow_unsigned: true`` (see
agent.config.SigningConfig): an unsigned or tampered manifest is refused (SignatureError,
code ``bad_signature``) before anything in it is trusted. The fleet controller's key
(agent.fleet.hosting.ControllerKey) makes the signatures devices pin.

``cryptography`` is imported only when a key is used, so importing this module costs nothing.
This module signs and verifies bytes; it never reads manifests or decides policy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from agent.errors import SignatureError

SIGNATURE_SUFFIX = ".sig"
KEY_BYTES = 32  # raw Ed25519 public and private keys
KEY_ID_CHARS = 16  # hex of sha256(public key): short enough to read out, long enough to compare


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
            "manifest signatures need the 'cryptography' package: pip install cryptography"
        ) from exc
    return ed25519, InvalidSignature


def public_key_bytes(public_key: str) -> bytes:
    """The raw key of a base64 ``signing.public_key``; SignatureError when it is not one."""
    key = _b64(public_key, "signing.public_key")
    if len(key) != KEY_BYTES:
        raise SignatureError("signing.public_key must be 32 raw bytes (base64)")
    return key


def key_id(public_key: str) -> str:
    """A short fingerprint of a public key, shown in meta, logs and by the controller."""
    return hashlib.sha256(public_key_bytes(public_key)).hexdigest()[:KEY_ID_CHARS]


def verify_manifest(data: bytes, signature: str | bytes | None, public_key: str | None) -> None:
    """Raise SignatureError unless ``signature`` is a valid Ed25519 signature of ``data``."""
    verify_signature(data, signature, public_key, what="manifest")


def verify_signature(
    data: bytes, signature: str | bytes | None, public_key: str | None, *, what: str
) -> None:
    """verify_manifest for any document the controller signs (``what`` names it in errors:
    a manifest, the wheel index)."""
    if not public_key:
        raise SignatureError(
            f"{what} signatures are required and signing.public_key is empty: pin the fleet "
            "controller's key (edge-agent fleet signing-key)"
            + (" or set signing.allow_unsigned: true" if what == "manifest" else "")
        )
    if signature is None:
        raise SignatureError(f"the {what} has no signature file (expected <{what}>.sig)")
    ed25519, invalid_signature = _ed25519()
    key = ed25519.Ed25519PublicKey.from_public_bytes(public_key_bytes(public_key))
    try:
        key.verify(_b64(signature, "signature"), data)
    except invalid_signature as exc:
        raise SignatureError(
            f"the {what} signature does not match: refusing a tampered {what}"
        ) from exc


def _private_key(private_key: str):
    ed25519, _ = _ed25519()
    try:
        return ed25519.Ed25519PrivateKey.from_private_bytes(_b64(private_key, "private key"))
    except ValueError as exc:  # cryptography's word for "not 32 bytes"
        raise SignatureError("the private key must be 32 raw bytes (base64)") from exc


def sign_manifest(data: bytes, private_key: str) -> str:
    """Base64 Ed25519 signature of ``data`` with a base64 raw 32-byte private key."""
    return base64.b64encode(_private_key(private_key).sign(data)).decode()


def public_key_of(private_key: str) -> str:
    """The base64 public key that verifies what ``private_key`` signs."""
    key = _private_key(private_key)  # first, so a missing package is a SignatureError
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def generate_keypair() -> tuple[str, str]:
    """(private, public), each base64 of the raw 32-byte key."""
    ed25519, _ = _ed25519()
    from cryptography.hazmat.primitives import serialization

    private = ed25519.Ed25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    private_bytes = private.private_bytes(
        raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    private_b64 = base64.b64encode(private_bytes).decode()
    return private_b64, public_key_of(private_b64)
