"""Who may use the controller: hashed secrets, bearer tokens, dashboard sessions, CSRF tokens,
and the per-address limit on failed attempts.

Secrets are stored only as hashes (``hash_secret``, hashlib only, no extra dependency) and
compared in constant time. Two kinds, for two kinds of secret:

- the admin password is chosen by a person, so it gets a deliberately slow hash (scrypt
  N=2^17, ~128 MiB and a few hundred ms; PBKDF2-SHA256 as the alternative). Checking it is
  slow by design: callers run ``check_login`` in a worker thread, never on an event loop;
- API tokens are random (at least ``TOKEN_MIN_CHARS`` characters), so guessing one is hopeless
  and a slow hash buys nothing: they are stored as ``sha256$<digest>`` and a wrong token
  costs one SHA-256 (``token_matches``, fine on the loop).

Token hashes written before that (scrypt or PBKDF2 in ``api_token_hashes``) still verify, but
only through ``check_slow_token``, which callers run off the loop like a login; a token that
verified once is remembered by its SHA-256, so only wrong tokens pay for the slow hash again.
Re-hash such tokens with ``edge-agent fleet hash-secret --method sha256``.

``FailureLimiter`` counts failed logins and tokens per client address so that nobody can
guess for long or keep the slow hashes busy. Each session carries its own CSRF token,
checked on every POST.

Dashboard sessions live in the registry (``SessionStore``), keyed by the SHA-256 of the
cookie, so a login on one controller is valid on every controller sharing that database,
and a logout on one ends it on all within ``SESSION_RECHECK_S``. Each controller keeps the
sessions it has seen in memory; ``session`` reads only that copy (fine on the loop), and the
web side calls ``load_session`` (a query: off the loop) first when ``needs_load`` says the
copy is missing or older than ``SESSION_RECHECK_S``. ``open_session`` and ``close_session``
write the store: off the loop too. This module knows nothing about HTTP frameworks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from agent.errors import ConfigError, RequestError

# 2^17 * 8 * 128 bytes = 128 MiB per check: costly for anyone holding a leaked hash, and
# affordable for one login at a time (the web side runs one slow check at a time).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
PBKDF2_ITERATIONS = 600_000
TOKEN_MIN_CHARS = 32  # e.g. secrets.token_urlsafe(24); anything shorter may be a password
# What a stored hash may ask for: a config with n=2^30 must fail at start, not eat 128 GiB.
SCRYPT_MAX_BYTES = 2**30
PBKDF2_MAX_ITERATIONS = 100_000_000
SLOW_SCHEMES = ("scrypt", "pbkdf2_sha256")
SESSION_RECHECK_S = 5.0  # a session seen here is re-read from the store after this long
SESSION_ID_CHARS = 43  # secrets.token_urlsafe(32): anything else is not worth a query
_URLSAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _scrypt_maxmem(n: int, r: int) -> int:
    # scrypt needs 128*r*n bytes (plus a little); hashlib's default cap (32 MiB) is below N=2^17.
    return 128 * r * n + 2**20


def hash_secret(secret: str, *, method: str = "scrypt") -> str:
    """The config-file form of ``secret``: ``scrypt`` or ``pbkdf2_sha256`` for
    auth.admin_password_hash, ``sha256`` for auth.api_token_hashes (random tokens only)."""
    if method == "sha256":
        if len(secret) < TOKEN_MIN_CHARS:
            raise RequestError(
                f"secret: an API token must be random and at least {TOKEN_MIN_CHARS} characters "
                "(python3 -c 'import secrets; print(secrets.token_urlsafe(32))'); hash a "
                "password with scrypt",
                field="secret",
            )
        return f"sha256${_b64(hashlib.sha256(secret.encode()).digest())}"
    salt = secrets.token_bytes(16)
    if method == "scrypt":
        digest = hashlib.scrypt(
            secret.encode(),
            salt=salt,
            n=SCRYPT_N,
            r=SCRYPT_R,
            p=SCRYPT_P,
            maxmem=_scrypt_maxmem(SCRYPT_N, SCRYPT_R),
        )
        return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"
    if method == "pbkdf2_sha256":
        digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, PBKDF2_ITERATIONS)
        return f"pbkdf2_sha256${PBKDF2_ITERATIONS}${_b64(salt)}${_b64(digest)}"
    raise ConfigError(f"unknown hash method {method!r}; use scrypt, pbkdf2_sha256 or sha256")


@dataclass(frozen=True)
class _Stored:
    """A stored hash, parsed and bounded; ``params`` are the scheme's numbers."""

    scheme: str
    params: tuple[int, ...]
    salt: bytes
    digest: bytes


def _parse(stored: str) -> _Stored:
    """Parse without hashing, so a malformed hash fails at start at no cost."""
    parts = stored.split("$")
    try:
        if parts[0] == "sha256" and len(parts) == 2:
            digest = base64.b64decode(parts[1], validate=True)
            if len(digest) != 32:
                raise ValueError("a SHA-256 digest is 32 bytes")
            return _Stored("sha256", (), b"", digest)
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16:
                raise ValueError("n must be a power of 2, r 1..64, p 1..16")
            if 128 * r * n * p > SCRYPT_MAX_BYTES:
                raise ValueError("scrypt parameters ask for more than 1 GiB")
            params: tuple[int, ...] = (n, r, p)
            salt, digest = parts[4], parts[5]
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            iterations = int(parts[1])
            if not 1 <= iterations <= PBKDF2_MAX_ITERATIONS:
                raise ValueError("iterations out of range")
            params = (iterations,)
            salt, digest = parts[2], parts[3]
        else:
            raise ValueError("unknown scheme")
        decoded = _Stored(
            parts[0],
            params,
            base64.b64decode(salt, validate=True),
            base64.b64decode(digest, validate=True),
        )
        if not 16 <= len(decoded.digest) <= 64:
            raise ValueError("digest length")
        return decoded
    except (ValueError, binascii.Error) as exc:
        raise ConfigError(
            "auth: a stored hash is malformed; make one with `edge-agent fleet hash-secret`",
            key="fleet.auth",
        ) from exc


def _compute(secret: str, stored: _Stored) -> bytes:
    if stored.scheme == "sha256":
        return hashlib.sha256(secret.encode()).digest()
    if stored.scheme == "scrypt":
        n, r, p = stored.params
        return hashlib.scrypt(
            secret.encode(),
            salt=stored.salt,
            n=n,
            r=r,
            p=p,
            maxmem=_scrypt_maxmem(n, r) * p,
            dklen=len(stored.digest),
        )
    return hashlib.pbkdf2_hmac(
        "sha256", secret.encode(), stored.salt, stored.params[0], len(stored.digest)
    )


def verify_secret(secret: str, stored: str) -> bool:
    """True when ``secret`` matches the stored hash; a malformed hash is a ConfigError.
    Slow for scrypt and PBKDF2 hashes: never call it on an event loop."""
    return _verify(secret, _parse(stored))


def _verify(secret: str, stored: _Stored) -> bool:
    return hmac.compare_digest(_compute(secret, stored), stored.digest)


def _fingerprint(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass
class Session:
    id: str
    csrf: str
    user: str
    expires: float


class SessionStore(Protocol):
    """Where sessions outlive one controller (agent.fleet.registry.Registry). Blocking."""

    def save_session(self, key: str, csrf: str, user: str, expires: float) -> None: ...
    def load_session(self, key: str) -> tuple[str, str, float] | None: ...
    def delete_session(self, key: str) -> None: ...


def _store_key(session_id: str) -> str:
    # Whoever reads the database learns no cookie that logs in.
    return hashlib.sha256(session_id.encode()).hexdigest()


class Authenticator:
    """Checks passwords and tokens, keeps sessions. Thread-safe: ``check_login`` and
    ``check_slow_token`` run in worker threads while the loop calls the rest."""

    def __init__(
        self,
        password_hash: str | None,
        token_hashes: list[str],
        *,
        session_max_age_s: int = 43200,
        sessions: SessionStore | None = None,
    ) -> None:
        # Parsed here: a malformed hash fails at start, not at first login.
        self._password = _parse(password_hash) if password_hash else None
        if self._password is not None and self._password.scheme not in SLOW_SCHEMES:
            # A person's password under one fast unsalted hash falls to a dictionary at once.
            raise ConfigError(
                f"auth.admin_password_hash: a {self._password.scheme}$ hash is for random API "
                "tokens; hash the password with `edge-agent fleet hash-secret` (scrypt)",
                key="fleet.auth.admin_password_hash",
            )
        parsed = [_parse(stored) for stored in token_hashes]
        self._slow_tokens = [p for p in parsed if p.scheme in SLOW_SCHEMES]
        # SHA-256 of every token that may pass the fast check: the sha256$ hashes plus the
        # old-style ones that verified once (at most one entry per stored hash).
        self._token_digests = [p.digest for p in parsed if p.scheme == "sha256"]
        self.session_max_age_s = session_max_age_s
        self._store = sessions
        self._sessions: dict[str, tuple[Session, float]] = {}  # id -> (session, when checked)
        self._lock = threading.Lock()

    @property
    def has_slow_tokens(self) -> bool:
        """Whether old-style (scrypt/PBKDF2) token hashes are configured."""
        return bool(self._slow_tokens)

    def token_matches(self, token: str) -> bool:
        """The fast check: one SHA-256 and a constant-time compare per known digest."""
        if not token:
            return False
        offered = _fingerprint(token)
        with self._lock:
            known = list(self._token_digests)
        matched = False
        for digest in known:  # no short cut: the time does not depend on which one matched
            matched |= hmac.compare_digest(offered, digest)
        return matched

    def check_slow_token(self, token: str) -> bool:
        """The fast check, then every old-style token hash. Slow: run it off the loop."""
        if self.token_matches(token):
            return True
        if not token or not any(_verify(token, stored) for stored in self._slow_tokens):
            return False
        with self._lock:
            self._token_digests.append(_fingerprint(token))
        return True

    def check_login(self, secret: str) -> str | None:
        """The user a password or token logs in as, or None. Slow: run it off the loop."""
        if self._password is not None and secret and _verify(secret, self._password):
            return "admin"
        if self.check_slow_token(secret):
            return "token"
        return None

    def open_session(self, user: str) -> Session:
        """A new session, written to the store: run it off the loop."""
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            user=user,
            expires=time.time() + self.session_max_age_s,
        )
        if self._store is not None:
            self._store.save_session(
                _store_key(session.id), session.csrf, session.user, session.expires
            )
        self._remember(session)
        return session

    def _remember(self, session: Session) -> None:
        with self._lock:
            now = time.time()
            for key in [k for k, (s, _) in self._sessions.items() if s.expires < now]:
                del self._sessions[key]
            self._sessions[session.id] = (session, time.monotonic())

    def needs_load(self, session_id: str | None) -> bool:
        """Whether ``load_session`` should run before ``session``: a store is configured, the
        id could be one, and this controller has not seen it within ``SESSION_RECHECK_S``."""
        if self._store is None or not session_id or len(session_id) != SESSION_ID_CHARS:
            return False
        if not _URLSAFE.issuperset(session_id):
            return False
        with self._lock:
            found = self._sessions.get(session_id)
        return found is None or time.monotonic() - found[1] >= SESSION_RECHECK_S

    def load_session(self, session_id: str) -> Session | None:
        """Read a session from the store into memory (a query: run it off the loop); a session
        the store no longer has (logged out elsewhere, expired) is forgotten here too."""
        if self._store is None:
            return self.session(session_id)
        stored = self._store.load_session(_store_key(session_id))
        if stored is None:
            with self._lock:
                self._sessions.pop(session_id, None)
            return None
        csrf, user, expires = stored
        session = Session(id=session_id, csrf=csrf, user=user, expires=expires)
        self._remember(session)
        return session

    def session(self, session_id: str | None) -> Session | None:
        """The session as this controller last read it: memory only, fine on the loop."""
        if not session_id:
            return None
        with self._lock:
            found = self._sessions.get(session_id)
        if found is None or found[0].expires < time.time():
            return None
        return found[0]

    def close_session(self, session_id: str | None) -> None:
        """End a session here and in the store: run it off the loop."""
        with self._lock:
            self._sessions.pop(session_id or "", None)
        if self._store is not None and session_id:
            self._store.delete_session(_store_key(session_id))

    @staticmethod
    def csrf_matches(session: Session, offered: str | None) -> bool:
        # Bytes, not str: compare_digest raises TypeError on non-ASCII str.
        return bool(offered) and hmac.compare_digest(
            session.csrf.encode(), offered.encode("utf-8", "surrogatepass")
        )


def address_key(host: str | None) -> str:
    """The unit a limit applies to: an IPv4 address, or an IPv6 /64 (one subscriber usually
    holds a whole /64, so per-address keys there would be free to rotate)."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return host or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class FailureLimiter:
    """A token bucket per client address for failed logins and tokens: ``limit`` failures at
    once, then one more per ``window_s / limit`` seconds. At most ``max_addresses`` buckets
    are kept, least recently used dropped first, so a flood of addresses cannot grow it.

    A check ``take``s an attempt before it runs and gets it back (``refund``) when it passes:
    counting only after a slow check would let every concurrent try pass a spent budget.

    Not thread-safe: one owner, the web server's event loop. Every call is O(1)."""

    def __init__(self, limit: int, window_s: float, *, max_addresses: int = 4096) -> None:
        self.limit = limit
        self.rate = limit / window_s  # attempts regained per second
        self.max_addresses = max_addresses
        # key: (attempts left, when, whether "rate limited" was logged since it was last full)
        self._buckets: OrderedDict[str, tuple[float, float, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _state(self, key: str, now: float) -> tuple[float, bool]:
        left, at, logged = self._buckets.get(key, (float(self.limit), now, False))
        left = min(float(self.limit), left + (now - at) * self.rate)
        return left, logged and left < self.limit

    def _store(self, key: str, left: float, now: float, logged: bool) -> None:
        self._buckets[key] = (left, now, logged)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)

    def retry_after(self, host: str | None, now: float | None = None) -> int:
        """0 when ``host`` may try; else the whole seconds until it may try again."""
        now = time.monotonic() if now is None else now
        left = self._state(address_key(host), now)[0] + 1e-9  # refill arithmetic is not exact
        return 0 if left >= 1.0 else max(1, math.ceil((1.0 - left) / self.rate))

    def take(self, host: str | None, now: float | None = None) -> int:
        """Debit one attempt before a check: 0 when taken, else (nothing taken) the whole
        seconds until ``host`` may try again."""
        now = time.monotonic() if now is None else now
        if wait := self.retry_after(host, now):
            return wait
        key = address_key(host)
        left, logged = self._state(key, now)
        self._store(key, max(0.0, left - 1.0), now, logged)
        return 0

    def refund(self, host: str | None, now: float | None = None) -> None:
        """Give back the attempt ``take`` debited: the check passed (or never ran)."""
        now = time.monotonic() if now is None else now
        key = address_key(host)
        left, logged = self._state(key, now)
        self._store(key, min(float(self.limit), left + 1.0), now, logged)

    def failed(self, host: str | None, now: float | None = None) -> bool:
        """The check ``take`` debited for failed. True only when that left ``host`` with no
        attempts for the first time since its bucket was last full: one log line per episode
        of guessing, however slowly the guesses keep pace with the refill."""
        now = time.monotonic() if now is None else now
        key = address_key(host)
        left, logged = self._state(key, now)
        if logged or left + 1e-9 >= 1.0:
            return False
        self._store(key, left, now, True)
        return True
