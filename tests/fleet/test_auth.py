"""Hashed secrets and sessions: what logs in, what does not, what a malformed hash does."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from agent.fleet.auth import Authenticator, hash_secret, verify_secret


@pytest.mark.parametrize("method", ["scrypt", "pbkdf2_sha256"])
def test_hash_verifies_only_the_same_secret(method):
    stored = hash_secret("s3cret", method=method)
    assert stored.startswith(method + "$") and "s3cret" not in stored
    assert verify_secret("s3cret", stored)
    assert not verify_secret("s3cret ", stored)


def test_a_malformed_hash_is_a_config_error_at_start():
    with pytest.raises(ConfigError) as caught:
        Authenticator("scrypt$not-a-hash", [])
    assert caught.value.code == "config_invalid"


def test_login_sessions_and_csrf(credentials):
    auth = Authenticator(credentials.password_hash, [credentials.token_hash])
    assert auth.check_login("wrong") is None
    assert auth.check_login(credentials.password) == "admin"
    assert auth.check_login(credentials.token) == "token"
    session = auth.open_session("admin")
    assert auth.session(session.id) is session
    assert auth.csrf_matches(session, session.csrf) and not auth.csrf_matches(session, "x")
    auth.close_session(session.id)
    assert auth.session(session.id) is None
