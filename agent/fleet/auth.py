"""Who may use the controller: hashed secrets, bearer tokens, dashboard sessions, CSRF tokens.

Secrets are stored only as hashes (``hash_secret``; scrypt, or PBKDF2-SHA256, both from
hashlib so there is no extra dependency) and compared in constant time. A bearer token
that verified once is remembered by its SHA-256 so an API call does not pay for scrypt.
Dashboard sessions live in memory: a controller restart logs everyone out, which is the
safe direction. Each session carries its own CSRF token, checked on every POST; the
cookie is HttpOnly and SameSite=Strict. This module knows nothing about HTTP frameworks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from agent.errors import ConfigError

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # ~16 MiB and ~50 ms per check: fine for a login
PBKDF2_ITERATIONS = 600_000


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_secret(secret: str, *, method: str = "scrypt") -> str:
    """The config-file form of ``secret``; put it in auth.admin_password_hash or api_token_hashes."""
    salt = secrets.token_bytes(16)
    if method == "scrypt":
        digest = hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
        return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"
    if method == "pbkdf2_sha256":
        digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, PBKDF2_ITERATIONS)
        return f"pbkdf2_sha256${PBKDF2_ITERATIONS}${_b64(salt)}${_b64(digest)}"
    raise ConfigError(f"unknown hash method {method!r}; use scrypt or pbkdf2_sha256")


def verify_secret(secret: str, stored: str) -> bool:
    """True when ``secret`` matches the stored hash; a malformed hash is a ConfigError."""
    parts = stored.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, expected = base64.b64decode(parts[4]), base64.b64decode(parts[5])
            digest = hashlib.scrypt(
                secret.encode(),
                salt=salt,
                n=n,
                r=r,
                p=p,
                maxmem=256 * r * n + 2**20,
                dklen=len(expected),
            )
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            salt, expected = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            digest = hashlib.pbkdf2_hmac(
                "sha256", secret.encode(), salt, int(parts[1]), len(expected)
            )
        else:
            raise ValueError("unknown scheme")
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            "auth: a stored hash is malformed; make one with `edge-agent fleet hash-secret`",
            key="fleet.auth",
        ) from exc
    return hmac.compare_digest(digest, expected)


@dataclass
class Session:
    id: str
    csrf: str
    user: str
    expires: float


class Authenticator:
    def __init__(
        self, password_hash: str | None, token_hashes: list[str], *, session_max_age_s: int = 43200
    ) -> None:
        self.password_hash = password_hash
        self.token_hashes = list(token_hashes)
        self.session_max_age_s = session_max_age_s
        self._sessions: dict[str, Session] = {}
        self._verified_tokens: set[bytes] = set()
        self._lock = threading.Lock()
        for stored in [password_hash, *token_hashes]:
            if stored:
                verify_secret("", stored)  # a malformed hash fails at start, not at first login

    def check_token(self, token: str) -> bool:
        if not token:
            return False
        fingerprint = hashlib.sha256(token.encode()).digest()
        with self._lock:
            if fingerprint in self._verified_tokens:
                return True
        if any(verify_secret(token, stored) for stored in self.token_hashes):
            with self._lock:
                self._verified_tokens.add(fingerprint)
            return True
        return False

    def check_login(self, secret: str) -> str | None:
        """The user a password or token logs in as, or None."""
        if self.password_hash and secret and verify_secret(secret, self.password_hash):
            return "admin"
        if self.check_token(secret):
            return "token"
        return None

    def open_session(self, user: str) -> Session:
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            user=user,
            expires=time.time() + self.session_max_age_s,
        )
        with self._lock:
            now = time.time()
            for key in [k for k, s in self._sessions.items() if s.expires < now]:
                del self._sessions[key]
            self._sessions[session.id] = session
        return session

    def session(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            found = self._sessions.get(session_id)
        if found is None or found.expires < time.time():
            return None
        return found

    def close_session(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    @staticmethod
    def csrf_matches(session: Session, offered: str | None) -> bool:
        return bool(offered) and hmac.compare_digest(session.csrf, offered)
