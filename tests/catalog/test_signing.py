"""Ed25519 manifest signatures: a signed manifest passes, any tampering is refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.catalog.signing import generate_keypair, sign_manifest, verify_manifest
from agent.errors import SignatureError

REPO = Path(__file__).resolve().parents[2]


def test_signed_manifest_verifies_and_tampering_is_refused(ladder_dir: Path) -> None:
    data = (ladder_dir / "manifest.json").read_bytes()
    private, public = generate_keypair()
    signature = sign_manifest(data, private)
    verify_manifest(data, signature, public)

    tampered = data.replace(b'"quality": 1.0', b'"quality": 1.5', 1)
    assert tampered != data
    with pytest.raises(SignatureError) as err:
        verify_manifest(tampered, signature, public)
    assert err.value.code == "bad_signature"

    _, other_public = generate_keypair()
    with pytest.raises(SignatureError, match="does not match"):
        verify_manifest(data, signature, other_public)


@pytest.mark.parametrize(
    ("signature", "public", "message"),
    [
        (None, "k", "no signature"),
        ("sig", None, "public_key is empty"),
        ("!!!", "A" * 43 + "=", "not valid base64"),
        ("AAAA", "AAAA", "32 raw bytes"),
    ],
)
def test_missing_or_malformed_inputs_are_clear(signature, public, message) -> None:
    with pytest.raises(SignatureError, match=message):
        verify_manifest(b"{}", signature, public)


def test_operator_tool_signs_a_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"schema": 1, "models": []}\n')
    key = tmp_path / "private.key"
    out = subprocess.run([REPO / "scripts/sign-manifest", "keygen", key], capture_output=True,
                         text=True, check=True).stdout
    public = out.rsplit(" ", 1)[1].strip()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    subprocess.run([REPO / "scripts/sign-manifest", "sign", manifest, key], check=True,
                   capture_output=True)
    verify_manifest(manifest.read_bytes(), (tmp_path / "manifest.json.sig").read_text(), public)


def test_load_manifest_enforces_signatures_when_required(tmp_path: Path, ladder_dir: Path, range_server) -> None:
    from agent.catalog.manifest import load_manifest
    from agent.config import SigningConfig

    private, public = generate_keypair()
    required = SigningConfig(required=True, public_key=public)
    manifest = range_server.root / "manifest.json"
    manifest.write_bytes((ladder_dir / "manifest.json").read_bytes())

    for source in (str(manifest), f"{range_server.url}/manifest.json"):
        with pytest.raises(SignatureError, match="no signature"):
            load_manifest(source, required)
        assert load_manifest(source, SigningConfig()).models  # not required: unsigned is fine

    (range_server.root / "manifest.json.sig").write_text(sign_manifest(manifest.read_bytes(), private))
    for source in (str(manifest), f"{range_server.url}/manifest.json"):
        assert load_manifest(source, required).models[0].id == "smollm2-135m-instruct"

    manifest.write_bytes(manifest.read_bytes().replace(b"Q2_K", b"Q2_X"))
    for source in (str(manifest), f"{range_server.url}/manifest.json"):
        with pytest.raises(SignatureError, match="tampered"):
            load_manifest(source, required)
