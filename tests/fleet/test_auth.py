"""Hashed secrets, sessions and the failure limiter: what logs in, what does not, what a
malformed hash does, what old hashes still do. Attacks on the running controller are in
test_auth_attacks.py."""

from __future__ import annotations

import base64
import hashlib
import io
import secrets

import pytest

from agent.cli import main
from agent.errors import ConfigError, RequestError
from agent.fleet.auth import Authenticator, FailureLimiter, address_key, hash_secret, verify_secret


@pytest.mark.parametrize("method", ["scrypt", "pbkdf2_sha256", "sha256"])
def test_hash_verifies_only_the_same_secret(method):
    secret = "s3cret-" + secrets.token_urlsafe(32)
    stored = hash_secret(secret, method=method)
    assert stored.startswith(method + "$") and secret not in stored
    assert verify_secret(secret, stored)
    assert not verify_secret(secret + " ", stored)


def test_a_short_secret_is_not_accepted_as_a_token():
    with pytest.raises(RequestError) as caught:
        hash_secret("hunter2", method="sha256")
    assert caught.value.code == "bad_request"


def old_n_scrypt_hash(secret: str) -> str:
    """What hash_secret stored before the cost was raised: scrypt N=2^14."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1)
    b64 = base64.b64encode
    return f"scrypt${2**14}$8$1${b64(salt).decode()}${b64(digest).decode()}"


def test_new_password_hashes_cost_n_2_17_and_old_ones_still_verify():
    new = hash_secret("correct horse")
    assert int(new.split("$")[1]) >= 2**17 and verify_secret("correct horse", new)
    old = old_n_scrypt_hash("correct horse")
    assert verify_secret("correct horse", old) and not verify_secret("wrong", old)
    auth = Authenticator(old, [])
    assert auth.check_login("correct horse") == "admin" and auth.check_login("wrong") is None


@pytest.mark.parametrize(
    "stored",
    [
        "scrypt$not-a-hash",
        f"scrypt${2**30}$8$1$AAAA$AAAA",  # 128 GiB per check: refused, not attempted
        "scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",  # n not a power of 2
        "sha256$c2hvcnQ=",
        "md5$abc",
    ],
)
def test_a_malformed_hash_is_a_config_error_at_start(stored):
    with pytest.raises(ConfigError) as caught:
        Authenticator(stored, [])
    assert caught.value.code == "config_invalid"
    with pytest.raises(ConfigError):
        Authenticator(None, [stored])


def test_tokens_sha256_fast_and_old_style_off_the_fast_path(credentials):
    token = secrets.token_urlsafe(32)
    auth = Authenticator(None, [hash_secret(token, method="sha256"), credentials.token_hash])
    assert auth.token_matches(token) and not auth.token_matches(token[:-1])
    assert not auth.token_matches("") and not auth.token_matches("é\udcff")
    # The old-style (PBKDF2) token passes only the slow check, then the fast one as well.
    assert auth.has_slow_tokens and not auth.token_matches(credentials.token)
    assert auth.check_slow_token(credentials.token)
    assert auth.token_matches(credentials.token)
    assert not auth.check_slow_token("wrong")
    assert not Authenticator(None, [hash_secret(token, method="sha256")]).has_slow_tokens


def test_login_sessions_and_csrf(credentials):
    auth = Authenticator(credentials.password_hash, [credentials.token_hash])
    assert auth.check_login("wrong") is None
    assert auth.check_login(credentials.password) == "admin"
    assert auth.check_login(credentials.token) == "token"
    session = auth.open_session("admin")
    assert auth.session(session.id) is session
    assert auth.csrf_matches(session, session.csrf) and not auth.csrf_matches(session, "x")
    assert not auth.csrf_matches(session, "jeton-é")  # False, not TypeError
    auth.close_session(session.id)
    assert auth.session(session.id) is None


def test_failure_limiter_buckets_refill_and_stay_bounded():
    limiter = FailureLimiter(3, 30.0, max_addresses=5)
    for _ in range(3):
        assert limiter.take("10.0.0.1", now=0.0) == 0
        limiter.failed("10.0.0.1", now=0.0)
    wait = limiter.retry_after("10.0.0.1", now=0.0)
    assert wait >= 1 and limiter.take("10.0.0.1", now=0.0) == wait
    assert limiter.retry_after("10.0.0.2", now=0.0) == 0
    assert limiter.take("10.0.0.1", now=float(wait)) == 0  # one attempt back
    for i in range(100):
        limiter.take(f"10.1.0.{i}", now=1.0)
    assert len(limiter) == 5


def test_concurrent_checks_cannot_pass_a_spent_budget():
    # Three logins in flight at once (each a slow hash): the fourth is refused before its
    # check runs, whatever the three turn out to be.
    limiter = FailureLimiter(3, 30.0)
    assert [limiter.take("10.0.0.1", now=0.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.take("10.0.0.1", now=0.0) >= 1
    limiter.refund("10.0.0.1", now=0.0)  # one of them was the right password
    assert limiter.take("10.0.0.1", now=0.0) == 0
    assert limiter.take("10.0.0.1", now=0.0) >= 1
    # Successes never build credit beyond the limit.
    fresh = FailureLimiter(3, 30.0)
    for _ in range(10):
        fresh.refund("10.0.0.9", now=0.0)
    assert [fresh.take("10.0.0.9", now=0.0) == 0 for _ in range(4)] == [True] * 3 + [False]


def test_rate_limited_is_reported_once_per_episode_not_per_refill():
    limiter = FailureLimiter(3, 30.0)  # one attempt back every 10 s
    reported = []
    for _ in range(3):
        limiter.take("10.0.0.1", now=0.0)
        reported.append(limiter.failed("10.0.0.1", now=0.0))
    assert reported == [False, False, True]
    # A guesser keeping pace with the refill: still that one report.
    for step in range(1, 10):
        assert limiter.take("10.0.0.1", now=10.0 * step) == 0
        assert not limiter.failed("10.0.0.1", now=10.0 * step)
    # Once the address has left it alone long enough to be full again, a new episode counts.
    later = 10.0 * 9 + 60.0
    for i in range(3):
        limiter.take("10.0.0.1", now=later)
        assert limiter.failed("10.0.0.1", now=later) == (i == 2)


def test_a_fast_hash_is_refused_for_the_admin_password():
    # sha256$ suits a random token; for a person's password it is a dictionary attack away.
    secret = secrets.token_urlsafe(32)
    stored = hash_secret(secret, method="sha256")
    with pytest.raises(ConfigError) as caught:
        Authenticator(stored, [])
    assert caught.value.code == "config_invalid"
    assert "admin_password_hash" in caught.value.message
    assert "edge-agent fleet hash-secret" in caught.value.message
    assert Authenticator(None, [stored]).token_matches(secret)  # the same hash is fine as a token


def test_ipv6_addresses_are_limited_per_64():
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.7") == address_key("192.0.2.7") == "192.0.2.7"
    assert address_key(None) == "unknown"


def test_hash_secret_command_makes_token_hashes(monkeypatch, capsys):
    token = secrets.token_urlsafe(32)
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    assert main(["fleet", "hash-secret", "--method", "sha256"]) == 0
    stored = capsys.readouterr().out.strip()
    assert stored.startswith("sha256$") and Authenticator(None, [stored]).token_matches(token)
