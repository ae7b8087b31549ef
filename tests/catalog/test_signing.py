"""Ed25519 manifest signatures: a signed manifest passes, any tampering is refused."""

from __future__ import annotations

import base64
import subprocess
import sys
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


def test_load_manifest_enforces_signatures_unless_opted_out(ladder_dir: Path, range_server) -> None:
    from agent.catalog.manifest import load_manifest
    from agent.config import SigningConfig

    private, public = generate_keypair()
    required = SigningConfig(public_key=public)  # a pinned key alone makes them required
    manifest = range_server.root / "manifest.json"
    manifest.write_bytes((ladder_dir / "manifest.json").read_bytes())

    for source in (str(manifest), f"{range_server.url}/manifest.json"):
        with pytest.raises(SignatureError, match="no signature"):
            load_manifest(source, required)
        with pytest.raises(SignatureError, match="allow_unsigned"):  # no key, no opt-out
            load_manifest(source, SigningConfig())
        assert load_manifest(source, SigningConfig(allow_unsigned=True)).models

    (range_server.root / "manifest.json.sig").write_text(sign_manifest(manifest.read_bytes(), private))
    for source in (str(manifest), f"{range_server.url}/manifest.json"):
        assert load_manifest(source, required).models[0].id == "smollm2-135m-instruct"

    manifest.write_bytes(manifest.read_bytes().replace(b"Q2_K", b"Q2_X"))
    for source in (str(manifest), f"{range_server.url}/manifest.json"):
        with pytest.raises(SignatureError, match="tampered"):
            load_manifest(source, required)


@pytest.mark.parametrize(
    ("section", "required"),
    [({}, True), ({"public_key": "A" * 43 + "="}, True), ({"allow_unsigned": True}, False),
     ({"required": True, "public_key": "A" * 43 + "="}, True)],
)
def test_signing_config_derives_required(tmp_path: Path, section: dict, required: bool) -> None:
    import yaml

    from agent.config import load_config

    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"signing": section}))
    assert load_config(path, env={}).signing.required is required


@pytest.mark.parametrize(
    ("section", "complaint"),
    [
        ({"required": False}, "allow_unsigned: true"),  # the old switch no longer turns it off
        ({"public_key": "A" * 43 + "=", "allow_unsigned": True}, "contradicts public_key"),
        ({"required": True, "allow_unsigned": True}, "contradicts"),
        ({"public_key": "not a key"}, "32-byte"),
    ],
)
def test_contradictory_signing_config_is_refused_naming_the_key(tmp_path, section, complaint) -> None:
    import yaml

    from agent.config import load_config
    from agent.errors import ConfigError

    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"signing": section}))
    with pytest.raises(ConfigError, match=complaint) as err:
        load_config(path, env={})
    assert str(path) in err.value.message and "signing" in err.value.message


def test_key_id_is_a_stable_short_fingerprint() -> None:
    from agent.catalog.signing import key_id, public_key_of

    private, public = generate_keypair()
    assert public_key_of(private) == public
    assert key_id(public) == key_id(public) and len(key_id(public)) == 16
    assert key_id(public) != key_id(generate_keypair()[1])


NO_CRYPTOGRAPHY = """
import sys
sys.modules["cryptography"] = None  # what an install without the package looks like to import
from agent.catalog.signing import public_key_of, generate_keypair
from agent.errors import SignatureError
for call in (lambda: public_key_of(sys.argv[1]), generate_keypair):
    try:
        call()
    except SignatureError as exc:
        print(exc.code, exc.message)
"""


def test_key_errors_are_signature_errors_even_without_cryptography() -> None:
    from agent.catalog.signing import public_key_of

    private, _ = generate_keypair()
    for broken in (base64.b64encode(b"x" * 31).decode(), "not base64!"):
        with pytest.raises(SignatureError) as caught:
            public_key_of(broken)
        assert caught.value.code == "bad_signature"
        with pytest.raises(SignatureError):
            sign_manifest(b"{}", broken)
    shown = subprocess.run([sys.executable, "-c", NO_CRYPTOGRAPHY, private], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 2 and all("pip install cryptography" in line for line in lines)
